"""Hugging Face interoperability: name tables, config translation, safetensors import."""
from genieblue_jax.hf.configs import UnsupportedConfigError
from genieblue_jax.hf.importer import config_from_hf_dir, import_hf, load_hf_params

__all__ = ["import_hf", "load_hf_params", "config_from_hf_dir", "UnsupportedConfigError"]
