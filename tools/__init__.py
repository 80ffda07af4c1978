"""Command-line tools, each runnable as `python -m tools.NAME`."""
