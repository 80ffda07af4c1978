"""Recipes: one small `get_config(arg)` file per recipe (stage1, stage2_skip, ...), in
ml_collections, for users; the library takes the typed tree they become
(`genieblue_jax.run_config.RunConfig`: `typed`, `load`).

`expand_config_arg` lets every entry point take `--config=NAME[:scale]` for a recipe here;
`parse_flags` makes a misspelled `--config.a.b` override a one-line error naming it.

    >>> load("stage2_skip").train.steps, load("stage2_skip", "paper").model.llm
    (150, 'qwen2.5-3b')
"""
import difflib
import importlib
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def recipes() -> list[str]:
    """The recipe names of this folder, sorted: every module but `__init__` and `common`.

        >>> "stage2_skip" in recipes(), "common" in recipes()
        (True, False)
    """
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


def typed(config):
    """The `RunConfig` of an ml_collections recipe, validated (ConfigError naming the key)."""
    from genieblue_jax.run_config import RunConfig
    return RunConfig.from_dict(config.to_dict())


def load(name: str, arg: str | None = None):
    """The typed recipe `name` of this folder at scale `arg` ("demo" by default, or "paper")."""
    if name not in recipes():
        raise ValueError(f"no such recipe {name!r}; known recipes: {recipes()}")
    return typed(importlib.import_module(f"experiments.configs.{name}").get_config(arg))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser (`app.run(main, flags_parser=parse_flags)`) with a misspelled
    `--config.a.b=value` override refused in one line naming it and the closest key, instead of
    ml_collections' traceback. Other flag errors are absl's own (its usage line)."""
    from absl import app
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):  # ml_collections' unknown key, raised while parsing the override
        bad = _unknown_override(argv)
        if bad is None:
            raise
        sys.exit(f"config error: {bad}")


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.KEY=...` whose KEY the recipe named by `--config` lacks, described."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    module = importlib.import_module(f"experiments.configs.{os.path.basename(path).removesuffix('.py')}") \
        if os.path.dirname(os.path.abspath(path)) == _HERE else None
    if module is None:
        return None
    recipe = module.get_config(arg or None).to_dict()
    for a in argv:
        if not a.startswith("--config.") or "=" not in a:
            continue
        key = a[len("--config."):].split("=", 1)[0]
        node, known = recipe, []
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                close = difflib.get_close_matches(".".join(known + [part]), _keys(recipe), n=1)
                hint = f" (did you mean --config.{close[0]}?)" if close else ""
                return f"--config.{key}: the recipe has no key {key}{hint}"
            known.append(part)
            node = node[part]
    return None


def _keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out
