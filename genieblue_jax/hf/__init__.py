"""Hugging Face interoperability: name tables, config translation, safetensors import."""
from genieblue_jax.hf.configs import UnsupportedConfigError, architecture_of
from genieblue_jax.hf.importer import PARTIAL_IMPORTS, config_from_hf_dir, import_hf, load_hf_params, read_hf_config

__all__ = ["import_hf", "load_hf_params", "config_from_hf_dir", "UnsupportedConfigError", "architecture_of",
           "read_hf_config", "PARTIAL_IMPORTS"]
