"""Runs the command `genieblue_jax.cli.benchmark_train` (its docstring and flags are the `--help`):
`python tools/benchmark_train.py` from anywhere, `python -m tools.benchmark_train` from the repository root."""
import os
import sys

if __name__ == "__main__":
    if not __package__:  # run as a file: the repository root, not tools/, goes first on sys.path
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from genieblue_jax.cli.console import run_command
    run_command("genieblue_jax.cli.benchmark_train")
