"""The repository's command scripts: `tools/NAME.py` runs the library command
`genieblue_jax.cli.NAME` (`python tools/NAME.py` from anywhere, `python -m tools.NAME` from the
repository root; installed, `genieblue-NAME`). This package is not installed: it exists so that
`python -m tools.NAME` works from the repository root."""
