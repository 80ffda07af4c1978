"""The commands: one module per command (`genieblue_jax.cli.NAME`), each run three ways with
the same flags and `--help`: `python -m tools.NAME` (from the repository root),
`python tools/NAME.py` (from anywhere; `tools/` holds thin scripts over these modules, not
installed) and the installed console script `genieblue-NAME` (`genieblue_jax.cli.console`).

A command defines its absl flags only when it runs (`define_flags()` under `__main__`), so
importing any number of them defines none. It imports the library when it runs, not when
imported, so `--help` starts no jax and a command can set jax's environment first
(`aot_memory`'s device count). The layer sits at the top: it may import anything, nothing in
the library imports it (tests/test_layers.py).
"""
import os

# The directory holding genieblue_jax, data_pipelines and experiments: the repository root in a
# checkout, site-packages when installed. Subprocesses that import the packages (`python -m
# experiments.run`, `python -c ...`) start there, so they run this process's code even when the
# command was run as `python tools/NAME.py` without an install.
PACKAGES_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


GOOGLE_PCI_VENDOR = "0x1ae0"  # a TPU chip on the PCI bus (how JAX's cloud_tpu_init counts them)


def cpu_only_without_accelerators() -> None:
    """JAX on the CPU alone where that is all there is: no TPU chip on this machine and no CUDA
    plugin installed, while libtpu is (the `tpu` extra, e.g. for `tools.aot_memory` on a
    laptop). Otherwise libtpu starts with every program and prints `E0000 ... TPU_WORKER_HOSTNAMES`
    errors. A JAX_PLATFORMS the user set is kept; on a TPU VM or a CUDA machine nothing changes."""
    import glob
    import importlib.util
    import sys
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")):
        return
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if open(vendor).read().strip() == GOOGLE_PCI_VENDOR:
                return
        except OSError:
            continue
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: its config read the variable at import
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def start(argv) -> None:
    """The model commands' common prologue: no positional arguments (`app.UsageError`
    otherwise), Orbax's INFO log line per checkpoint read silenced unless the user asked
    for a `--verbosity`, and JAX kept off an absent TPU (`cpu_only_without_accelerators`)."""
    from absl import app, flags, logging
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    cpu_only_without_accelerators()
