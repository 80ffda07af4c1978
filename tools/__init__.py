"""Command-line tools. Each runs three ways, with the same flags and `--help`:
`python -m tools.NAME`, `python tools/NAME.py` (from anywhere: the file puts the repository
root first on `sys.path`) and the installed console script `genieblue-NAME` (`tools.console`)."""


def start(argv) -> None:
    """The model tools' common prologue: no positional arguments, and Orbax's INFO log line
    per checkpoint read silenced unless the user asked for a `--verbosity`."""
    from absl import app, flags, logging
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
