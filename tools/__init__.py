"""Command-line tools, each runnable as `python -m tools.NAME`."""


def start(argv) -> None:
    """The model tools' common prologue: no positional arguments, and Orbax's INFO log line
    per checkpoint read silenced unless the user asked for a `--verbosity`."""
    from absl import app, flags, logging
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
