"""Recipes: one small `get_config(arg)` file per recipe (stage1, stage2_skip, ...).

`expand_config_arg` lets every entry point take `--config=NAME[:scale]` for a recipe here.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def recipes() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(_HERE) if f.endswith(".py") and f not in ("__init__.py", "common.py"))


def expand_config_arg(argv: list[str]) -> list[str]:
    """`--config=stage2_skip[:paper]` -> `--config=<this folder>/stage2_skip.py[:paper]`;
    paths to config files pass through. An unknown recipe exits naming the known ones; a
    renamed key (`genieblue_jax.workdir.RENAMED_KEYS`) exits naming its new name."""
    # Here, not at the top: importing this package must not import jax (tests/conftest.py
    # imports experiments.demo before it sets JAX_PLATFORMS, which jax reads at import).
    from genieblue_jax.workdir import RENAMED_KEYS

    out = []
    for a in argv:
        for old, new in RENAMED_KEYS.items():
            if a.startswith(f"--config.{old}="):
                sys.exit(f"--config.{old} was renamed --config.{new} (a 384-px crop of an image is a tile)")
        if a.startswith("--config=") and not a.split("=", 1)[1].split(":")[0].endswith(".py"):
            name, _, arg = a.split("=", 1)[1].partition(":")
            if name not in recipes():
                sys.exit(f"--config={name}: no such recipe; known recipes: {recipes()}")
            a = f"--config={os.path.join(_HERE, name + '.py')}" + (f":{arg}" if arg else "")
        out.append(a)
    return out
