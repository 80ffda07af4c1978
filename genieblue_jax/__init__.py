"""genieblue_jax: train, evaluate and export GenieBlue-style multimodal LLMs in JAX/Flax."""
import importlib

__version__ = "0.1.0"
__all__ = ["GenieBlue", "load", "__version__"]


def __getattr__(name: str):
    """`genieblue_jax.load` / `genieblue_jax.GenieBlue` (from `genieblue_jax.api`) and the
    subpackages, imported when first used: importing the package imports no jax, so a command
    (`genieblue_jax.cli`) can set jax's environment (JAX_PLATFORMS, XLA_FLAGS) before jax reads
    it, and its `--help` starts in a fraction of a second. Raises AttributeError for other names."""
    if name.startswith("__"):  # dunder probes (inspect, doctest, pickle) are never submodules
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in ("GenieBlue", "load"):
        from genieblue_jax import api
        return getattr(api, name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":  # the submodule exists and failed to import: say why
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
