"""Export to other formats: Hugging Face `config.json` + safetensors (`hf_writer`)."""
from genieblue_jax.export.hf_writer import (
                                            Exported,
                                            hf_names,
                                            hf_tensors,
                                            llm_config_to_hf,
                                            save_llm,
                                            save_vision,
                                            vision_config_extras,
                                            vision_config_to_hf,
                                            write_safetensors,
)

__all__ = ["Exported", "hf_names", "hf_tensors", "llm_config_to_hf", "vision_config_to_hf",
           "vision_config_extras", "write_safetensors", "save_llm", "save_vision"]
