"""The model checkpoint format: named components, each a config plus an Orbax parameter tree.

    CKPT/
      genieblue.json    {"format_version": 1, "components": {"llm": {<LLMConfig.to_dict()>}, ...},
                         "mllm": {...} (whole multimodal models only), "source": {...},
                         "packages": {"jax": "0.10.2", ...} (versions.package_versions()),
                         "checksums": {"params/...": {"size": ..., "sha256": ...}, ...}}
      params/           Orbax tree {"llm": {...}, "vision": {...}, ...}
      hf_assets/        tokenizer and processor files (from an HF import, or the tokenizer a
                        multimodal model was trained with, with tokenizer_config.json, the chat
                        template and generation_config.json where its directory has them)

Two kinds: a single component (`tools.from_hf` writes "llm" or "vision"), and a whole
GenieBlue MLLM (`save_mllm`): components "llm", "vision", "projector" plus "branch", whose
layout follows from the structure recorded under "mllm":

    "mllm": {"structure": {<StructureConfig.to_dict()>}, "image_token_id": 151655,
             "branch_dtype": "float32", "preprocessing": {"image_mode": "dynamic", "max_tiles": 16}}

and, for a model saved from a training run, how it renders chats (`GenieBlue.chat`):

    "chat": {"template": "auto" | "tokenizer" | "chatml", "template_kwargs": {...}, "date": "2026-01-01"}

A checkpoint without "chat" (an HF import, or one written before chat templates were read)
renders "auto": its hf_assets/ template, ChatML without one (older MLLM checkpoints carried
the tokenizer file alone, so they keep ChatML).

Restoring goes straight into the requested shardings (Orbax reads each shard where it
lives), so a large model is never assembled on one host. It first checks every file against
the checksums genieblue.json recorded (genieblue_jax.checksums): a damaged file is a
`CorruptCheckpointError` naming it, never a silently changed weight.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from data_pipelines.tokenizer import tokenizer_files
from genieblue_jax import checksums, models, paths, structure, versions
from genieblue_jax import sharding as sharding_lib
from genieblue_jax.jsonfile import read_json

META_FILE = "genieblue.json"
PARAMS_DIR = "params"
ASSETS_DIR = "hf_assets"
FORMAT_VERSION = 1


def is_checkpoint(path: str) -> bool:
    """True when `path` (local or gs://) holds a genieblue_jax checkpoint (its genieblue.json)."""
    return (paths.path(path) / META_FILE).is_file()


def _tree_signature(tree) -> dict:
    return {p: (tuple(x.shape), str(x.dtype)) for p, x in models.flatten(tree).items()}


def _check_matches(name: str, expected, got) -> None:
    want, have = _tree_signature(expected), _tree_signature(got)
    if want == have:
        return
    problems = [f"missing {p}" for p in sorted(set(want) - set(have))]
    problems += [f"unexpected {p}" for p in sorted(set(have) - set(want))]
    problems += [f"{p}: {have[p]} but the config gives {want[p]}" for p in sorted(set(want) & set(have))
                 if want[p] != have[p]]
    raise ValueError(f"component {name!r}: parameters do not match its config: " + "; ".join(problems[:8])
                     + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))


def _write(path: str, meta: dict, params: dict, overwrite: bool, assets: tuple[str, ...] = ()) -> str:
    root = paths.path(path)
    path = os.fspath(root)
    if (root / PARAMS_DIR).exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint; pass overwrite=True to replace it")
    for asset in assets:
        if not paths.path(asset).is_file():
            raise FileNotFoundError(f"asset {asset} (e.g. the tokenizer) does not exist")
    meta = {**meta, "packages": versions.package_versions()}
    # Every process writes its shards of the parameters (Orbax); the files beside them are
    # written once, by the primary process, and the others wait until they are there.
    primary = jax.process_index() == 0
    if primary:
        root.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(root / PARAMS_DIR, params, force=overwrite)
    checkpointer.wait_until_finished()
    if primary and assets:
        (root / ASSETS_DIR).mkdir(parents=True, exist_ok=True)
        for asset in assets:
            paths.path(asset).copy(root / ASSETS_DIR / os.path.basename(asset), overwrite=True)
    if primary:  # written last: its presence marks a whole checkpoint, its checksums what it holds
        meta["checksums"] = checksums.record(root, exclude={META_FILE})
        (root / META_FILE).write_text(json.dumps(meta, indent=2))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"genieblue_jax checkpoint written: {path}")
    return path


def _tokenizer_assets(tokenizer: str | None, assets: Sequence[str] = ()) -> tuple[str, ...]:
    """`tokenizer` (a file or a directory holding one) with the files beside it that make it
    whole (`tokenizer.tokenizer_files`: tokenizer_config.json, the chat template,
    generation_config.json), then `assets`; each file name once (the first one wins)."""
    chosen: dict[str, str] = {}
    for f in (list(tokenizer_files(tokenizer)) if tokenizer else []) + list(assets):
        chosen.setdefault(os.path.basename(f), f)
    return tuple(chosen.values())


def save(path: str, configs: dict[str, Any], params: dict[str, Any], *, tokenizer: str | None = None,
         assets: Sequence[str] = (), source: dict | None = None, chat: dict | None = None,
         overwrite: bool = False) -> str:
    """Writes components `configs[name]` / `params[name]` to `path` (local or gs://); returns
    its path. `tokenizer` (a tokenizer.json / .model file, or a directory holding one) with the
    tokenizer files beside it, and the files in `assets` (e.g. an HF repo's tokenizer_config.json),
    are copied into hf_assets/, where `load` finds them, before the metadata file that marks the
    checkpoint whole is written. `chat`: how the model renders chats (module docstring)."""
    if set(configs) != set(params):
        raise ValueError(f"configs {sorted(configs)} and params {sorted(params)} name different components")
    for name, cfg in configs.items():
        _check_matches(name, models.abstract_params(cfg), params[name])
    meta = {"format_version": FORMAT_VERSION,
            "components": {n: c.to_dict() for n, c in configs.items()},
            "source": source or {}}
    if chat is not None:
        meta["chat"] = dict(chat)
    return _write(path, meta, params, overwrite, assets=_tokenizer_assets(tokenizer, assets))


def save_mllm(path: str, mcfg, params: dict[str, Any], *, tokenizer: str | None = None,
              preprocessing: dict | None = None, source: dict | None = None, chat: dict | None = None,
              overwrite: bool = False) -> str:
    """Writes a whole multimodal model: `params` = {"llm", "vision", "projector", "branch"} of
    `mcfg` (a `structure.MLLMConfig`). `tokenizer` (a tokenizer.json / .model file, or its
    directory) is copied into hf_assets/ with the files beside it (tokenizer_config.json, the chat
    template, generation_config.json); `preprocessing` ({"image_mode", "max_tiles"}) records how
    images were cut into tiles in training, so inference cuts them the same way; `chat` how it
    renders chats (module docstring).

        >>> save_mllm("/ckpt/mllm", mcfg, params, tokenizer="/data/demo/tokenizer.model",
        ...           preprocessing={"image_mode": "dynamic", "max_tiles": 4})  # doctest: +SKIP
        >>> genieblue_jax.load("/ckpt/mllm").generate("What colour is the circle?", images=["c.png"])  # doctest: +SKIP
    """
    want = {"llm", "vision", "projector", "branch"}
    if set(params) != want:
        raise ValueError(f"an MLLM checkpoint holds components {sorted(want)}; got {sorted(params)}")
    configs = {"llm": mcfg.llm, "vision": mcfg.vision, "projector": mcfg.projector}
    for name, cfg in configs.items():
        _check_matches(name, models.abstract_params(cfg), params[name])
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params["branch"])} or {"float32"}
    if len(dtypes) != 1:
        raise ValueError(f"component 'branch': mixed dtypes {sorted(dtypes)}; cast it to one dtype")
    branch_dtype = dtypes.pop()
    _check_matches("branch", _abstract_branch(structure, mcfg, branch_dtype), params["branch"])
    meta = {"format_version": FORMAT_VERSION,
            "components": {n: c.to_dict() for n, c in configs.items()},
            "mllm": {"structure": mcfg.structure.to_dict(), "image_token_id": int(mcfg.image_token_id),
                     "branch_dtype": branch_dtype, "preprocessing": dict(preprocessing or {})},
            "source": source or {}}
    if chat is not None:
        meta["chat"] = dict(chat)
    return _write(path, meta, params, overwrite, assets=_tokenizer_assets(tokenizer))


def _abstract_branch(structure, mcfg, dtype: str) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jax.numpy.dtype(dtype)),
                        structure.abstract_branch(mcfg))


def read_metadata(path: str) -> dict:
    """The checkpoint's genieblue.json with configs parsed; an MLLM's `MLLMConfig` is
    under "mllm_config"."""
    meta_path = paths.path(path) / META_FILE
    meta = read_json(path, META_FILE, "not a genieblue_jax checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, "
                         f"this genieblue_jax reads {FORMAT_VERSION}")
    try:
        meta["components"] = {n: models.config_from_dict(d) for n, d in meta["components"].items()}
        if "mllm" in meta:
            c, m = meta["components"], meta["mllm"]
            prep = m.get("preprocessing", {})
            if "max_patches" in prep:  # written before 2026-11-30, when a 384-px crop became a tile
                prep["max_tiles"] = prep.pop("max_patches")
            meta["mllm_config"] = structure.MLLMConfig(
                c["llm"], c["vision"], c["projector"], structure.StructureConfig.from_dict(m["structure"]),
                int(m["image_token_id"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: invalid checkpoint metadata: {type(e).__name__}: {e}") from None
    return meta


def assets_dir(path: str) -> str | None:
    """hf_assets/ of a checkpoint (tokenizer and processor files), or None."""
    d = paths.path(path) / ASSETS_DIR
    return os.fspath(d) if d.is_dir() else None


def restore(path: str, *, mesh=None, rules=sharding_lib.DEFAULT_RULES):
    """Returns (configs, params, metadata). With a mesh, every parameter lands in the sharding
    the rules give it; without, on the first device.

    Raises `checksums.CorruptCheckpointError` (naming the files) when a file differs from what
    was written; a checkpoint written before checksums were recorded is read unverified."""
    meta = read_metadata(path)
    params_dir = paths.path(path) / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{path}: {META_FILE} is there but {PARAMS_DIR}/ is missing (incomplete copy?)")
    if "checksums" in meta:
        problems = checksums.checked_by_primary(lambda: checksums.damage(path, meta["checksums"]))
        if problems:
            raise checksums.CorruptCheckpointError(path, problems)
    configs = meta["components"]
    abstract = {name: models.abstract_params(cfg) for name, cfg in configs.items()}
    if "mllm_config" in meta:
        abstract["branch"] = _abstract_branch(structure, meta["mllm_config"], meta["mllm"]["branch_dtype"])
    target = {}
    for name, tree in abstract.items():
        shardings = (sharding_lib.param_shardings(tree, mesh, rules) if mesh is not None
                     else sharding_lib.single_device_shardings(tree))
        target[name] = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        what = (f" (a {meta['mllm_config'].structure.name} MLLM)" if "mllm_config" in meta
                else f" (components {sorted(configs)})")
        raise ValueError(f"{params_dir}: the stored parameters do not match {META_FILE}{what}: "
                         f"{type(e).__name__}: {str(e)[:500]}") from e
    return configs, params, meta
