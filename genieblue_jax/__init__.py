"""genieblue_jax: train, evaluate and export GenieBlue-style multimodal LLMs in JAX/Flax."""
from genieblue_jax.api import GenieBlue, load

__version__ = "0.1.0"
__all__ = ["GenieBlue", "load", "__version__"]
