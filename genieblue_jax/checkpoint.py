"""The model checkpoint format: named components, each a config plus an Orbax parameter tree.

    CKPT/
      genieblue.json    {"format_version": 1, "components": {"llm": {<LLMConfig.to_dict()>}, ...},
                         "source": {...}}
      params/           Orbax tree {"llm": {...}, "vision": {...}, ...}
      hf_assets/        tokenizer and processor files copied from an HF import (optional)

Restoring goes straight into the requested shardings (Orbax reads each shard where it
lives), so a large model is never assembled on one host.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from genieblue_jax import models, sharding as sharding_lib

META_FILE = "genieblue.json"
PARAMS_DIR = "params"
ASSETS_DIR = "hf_assets"
FORMAT_VERSION = 1


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def save(path: str, configs: dict[str, Any], params: dict[str, Any], *, source: dict | None = None,
         overwrite: bool = False) -> str:
    """Writes components `configs[name]` / `params[name]` to `path`; returns its absolute path."""
    path = os.path.abspath(path)
    if set(configs) != set(params):
        raise ValueError(f"configs {sorted(configs)} and params {sorted(params)} name different components")
    if os.path.exists(os.path.join(path, PARAMS_DIR)) and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint; pass overwrite=True to replace it")
    for name, cfg in configs.items():
        expected = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), models.abstract_params(cfg))
        got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params[name])
        if expected != got:
            raise ValueError(f"component {name!r}: parameters do not match its config")
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, PARAMS_DIR), params, force=overwrite)
    checkpointer.wait_until_finished()
    meta = {"format_version": FORMAT_VERSION,
            "components": {n: c.to_dict() for n, c in configs.items()},
            "source": source or {}}
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path} is not a genieblue_jax checkpoint (no {META_FILE})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, "
                         f"this genieblue_jax reads {FORMAT_VERSION}")
    meta["components"] = {n: models.config_from_dict(d) for n, d in meta["components"].items()}
    return meta


def restore(path: str, *, mesh=None, rules=sharding_lib.DEFAULT_RULES):
    """Returns (configs, params, metadata). With a mesh, every parameter lands in the sharding
    the rules give it; without, on the first device."""
    meta = read_metadata(path)
    configs = meta["components"]
    target = {}
    for name, cfg in configs.items():
        abstract = models.abstract_params(cfg)
        shardings = (sharding_lib.param_shardings(abstract, mesh, rules) if mesh is not None
                     else sharding_lib.single_device_shardings(abstract))
        target[name] = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), PARAMS_DIR), target)
    return configs, params, meta
