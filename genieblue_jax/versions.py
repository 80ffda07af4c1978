"""The installed versions of the packages a run's numbers depend on, recorded with its results.

Training results (losses, checkpoints, evaluation scores) change with these packages: a new
jaxlib changes XLA's fusion and rounding, a new Pillow draws the demo's shapes differently,
a new tokenizers / sentencepiece splits text differently. Every training checkpoint's
metadata and every model checkpoint's genieblue.json carry `package_versions()`, and a
resume that finds other versions logs which ones changed. The lock file that pins them for
the README's commands is requirements/lock-cpu.txt (README, "Pinned dependencies").

    >>> v = package_versions()
    >>> sorted(v) == sorted(RESULT_PACKAGES)
    True
    >>> v["jax"] == __import__("jax").__version__
    True
    >>> changed_versions({"jax": "0.0.1", "numpy": v["numpy"]}, v)  # doctest: +ELLIPSIS
    {'jax': ('0.0.1', '...')}
"""
from __future__ import annotations

from importlib import metadata

# Distribution names (as pip knows them) of the packages whose versions change results.
RESULT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "sentencepiece",
                   "tokenizers", "pillow")


def package_versions(packages=RESULT_PACKAGES) -> dict[str, str]:
    """{distribution name: installed version}; "not installed" for a missing one."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def changed_versions(recorded: dict, current: dict | None = None) -> dict[str, tuple[str, str]]:
    """{name: (recorded, installed)} for the packages whose installed version differs from the
    recorded one (packages recorded by only one side are left out)."""
    current = package_versions() if current is None else current
    return {n: (recorded[n], current[n]) for n in sorted(set(recorded) & set(current)) if recorded[n] != current[n]}
