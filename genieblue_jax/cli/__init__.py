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


def start(argv) -> None:
    """The model commands' common prologue: no positional arguments (`app.UsageError`
    otherwise), and Orbax's INFO log line per checkpoint read silenced unless the user asked
    for a `--verbosity`."""
    from absl import app, flags, logging
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
