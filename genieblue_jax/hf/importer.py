"""Hugging Face (config.json + *.safetensors) -> genieblue_jax parameters and checkpoints.

    >>> from genieblue_jax.hf import import_hf
    >>> name, cfg, params = import_hf("/models/Qwen2.5-3B")              # in memory
    >>> import_hf("/models/Qwen2.5-3B", out="/ckpt/qwen2.5-3b")           # and written

Every parameter of our model is looked up through the family's name table
(`genieblue_jax.hf.tables`); shapes are checked for all tensors before any data is read.
A missing tensor, a shape mismatch, or a tensor in the files that the table does not
consume (and that is not known to be redundant) is an error that names it. Tensors are
read lazily (`safetensors` slices) and each device's shard is read straight into its target sharding, so no
host ever holds more than the shards it owns.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Iterable

import jax
import numpy as np

from genieblue_jax import checkpoint, models
from genieblue_jax import sharding as sharding_lib
from genieblue_jax.hf import configs as hf_configs
from genieblue_jax.hf.safetensors_io import SafetensorsCheckpoint
from genieblue_jax.hf.tables import DECODER_FAMILIES, HF_SPELLINGS, TABLES, resolve, spell

log = logging.getLogger(__name__)

# HF tensors that carry nothing our model needs, per architecture.
_ROTARY = (r"model\.rotary_emb\..*", r"model\.layers\.\d+\.self_attn\.rotary_emb\..*")
REDUNDANT_TENSORS = {
    **{arch: _ROTARY for arch in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
                                  "SmolLM3ForCausalLM")},
    # Only the language model of a Gemma 3 VLM is imported (either spelling of its names).
    "Gemma3ForConditionalGeneration": (r"(model\.)?vision_tower\..*", r"(model\.)?multi_modal_projector\..*",
                                       r"(language_model\.)?model\.(language_model\.)?rotary_emb\..*"),
    "SiglipVisionModel": (),
    # Only the vision tower of a SiglipModel is imported.
    "SiglipModel": (r"text_model\..*", r"logit_scale", r"logit_bias"),
}
# What an import of these architectures leaves out (their REDUNDANT_TENSORS), as `tools.from_hf` says it.
PARTIAL_IMPORTS = {"Gemma3ForConditionalGeneration": "its language model only (Gemma's own vision tower and "
                                                     "multi-modal projector are not imported)",
                   "SiglipModel": "its vision tower only (the text tower and contrastive head are not imported)"}
# Component name each architecture becomes in a checkpoint.
COMPONENT = {**dict.fromkeys(DECODER_FAMILIES, "llm"), "siglip": "vision"}
# Files worth keeping next to the weights (tokenizer, chat template, image processor).
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
               "merges.txt", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
               "preprocessor_config.json", "chat_template.json", "chat_template.jinja")


def read_hf_config(hf_dir: str) -> dict:
    """`hf_dir`/config.json as a dict; FileNotFoundError / ValueError naming the directory or file."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    with open(path) as f:
        return json.load(f)


def config_from_hf_dir(hf_dir: str, *, param_dtype: str = "float32", dtype: str = "float32",
                       ignore_fields: Iterable[str] = (), select_layer: int = -1):
    """(architecture, our config) for an HF directory.

    Where config.json and the tensors disagree, the tensors win as in transformers: a config
    that ties the embeddings while the safetensors hold an `lm_head.weight` with other values
    than the embedding gives an untied config (logged as a warning naming both tensors), so
    the stored head is imported, not dropped."""
    hf = read_hf_config(hf_dir)
    source = os.path.join(hf_dir, "config.json")
    arch = hf_configs.architecture_of(hf, source)
    if "quantization_config" in hf:  # before the field check, whose hint (waive it) would be wrong here
        ckpt = SafetensorsCheckpoint(hf_dir)
        check_float_weights(ckpt, [n for n in ckpt.names() if n.endswith("weight")])
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else None
        raise hf_configs.UnsupportedConfigError(
            f"{source}: quantization_config (quant_method {method!r}): a quantized checkpoint; genieblue_jax imports "
            f"float weights. Save it dequantized with transformers first, or import the unquantized release")
    kw = dict(source=source, ignore_fields=ignore_fields, param_dtype=param_dtype, dtype=dtype)
    if hf_configs.ARCHITECTURES[arch] == "siglip":
        return arch, hf_configs.vision_config_from_hf(hf, select_layer=select_layer, **kw)
    cfg = hf_configs.llm_config_from_hf(hf, **kw)
    if cfg.tie_embeddings:
        differing = _stored_head_differing_from_embedding(SafetensorsCheckpoint(hf_dir))
        if differing:
            log.warning("%s: config.json ties the embeddings (tie_word_embeddings) but %r holds values other "
                        "than %r: imported untied, with the stored head, as transformers loads it",
                        hf_dir, *differing)
            cfg = cfg.replace(tie_embeddings=False)
    return arch, cfg


def _stored_head_differing_from_embedding(ckpt: SafetensorsCheckpoint) -> tuple[str, str] | None:
    """(head name, embedding name) when the checkpoint stores an lm_head.weight whose values
    differ from the input embedding's; None when it stores none or an identical copy (compared
    in row blocks read from the files, once per version of the files: config_from_hf_dir
    and plan_import both ask)."""
    return head_verdict(ckpt.hf_dir, ckpt.stamp())


@functools.lru_cache(maxsize=16)
def head_verdict(hf_dir: str, stamp: tuple) -> tuple[str, str] | None:
    """(head name, embedding name) of the safetensors checkpoint in `hf_dir` when its stored
    lm_head.weight differs from its input embedding, else None; cached per `stamp` (the files'
    `SafetensorsCheckpoint.stamp()`: sizes and mtimes), so one import reads the tensors once
    (`head_verdict.cache_info()` counts the reads)."""
    del stamp  # the cache key: a rewritten file is compared again
    ckpt = SafetensorsCheckpoint(hf_dir)
    heads = [n for n in ckpt.names() if n.endswith("lm_head.weight")]
    embeds = [n for n in ckpt.names() if n.endswith("embed_tokens.weight")]
    if not heads or len(embeds) != 1:
        return None
    head, embed = ckpt.slice(heads[0]), ckpt.slice(embeds[0])
    if head.get_shape() != embed.get_shape() or head.get_dtype() != embed.get_dtype():
        return heads[0], embeds[0]
    rows = head.get_shape()[0]
    for i in range(0, rows, 4096):  # safetensors slices do not clamp to the shape
        if not np.array_equal(head[i:min(i + 4096, rows)], embed[i:min(i + 4096, rows)]):
            return heads[0], embeds[0]
    return None


# The dtypes a weight is imported from. An FP8 / int checkpoint stores weights with scales
# (`weight_scale_inv`, block-wise): reading its bytes as weights would be garbage.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_float_weights(ckpt: SafetensorsCheckpoint, names: Iterable[str]) -> None:
    """ValueError naming the file, the first tensor and its dtype when a weight among `names` is not
    stored as a float (FP8 releases such as Qwen3-*-FP8: F8_E4M3 with block scales), with the fix."""
    quantized = [n for n in names if n in ckpt and ckpt.dtype(n) not in FLOAT_DTYPES]
    if quantized:
        n = quantized[0]
        raise ValueError(
            f"{ckpt.file(n)}: tensor {n!r} is {ckpt.dtype(n)} ({len(quantized)} weights are not float: a quantized "
            f"checkpoint); genieblue_jax imports {'/'.join(FLOAT_DTYPES)} weights. Dequantize it with transformers "
            f"first (from_pretrained(DIR, quantization_config=FineGrainedFP8Config(dequantize=True)) for FP8, "
            f"then save_pretrained(OUT)) and import OUT, or import the release's unquantized weights")


def plan_import(ckpt: SafetensorsCheckpoint, arch: str, cfg, tied_embeddings: bool = False):
    """Checks names, dtypes (`check_float_weights`) and shapes of every tensor before reading data.

    Returns {our_path: (hf_name, transform)}; raises ValueError listing every problem.
    """
    abstract = models.flatten(models.abstract_params(cfg))
    family = hf_configs.ARCHITECTURES[arch]
    mapping = resolve(TABLES[family], abstract)
    # Pick the spelling the files actually use (the one that finds the most tensors).
    spelling = max(HF_SPELLINGS[arch], key=lambda sp: sum(spell(n, sp) in ckpt for n, _ in mapping.values()))
    mapping = {path: (spell(name, spelling), t) for path, (name, t) in mapping.items()}
    check_float_weights(ckpt, (name for name, _ in mapping.values()))
    problems = []
    for path, (name, transform) in mapping.items():
        if name not in ckpt:
            problems.append(f"missing tensor {name!r} (for parameter {path})")
            continue
        got = transform.ours_shape(ckpt.shape(name))
        want = tuple(abstract[path].shape)
        if got != want:
            problems.append(f"tensor {name!r} has shape {ckpt.shape(name)}, parameter {path} needs "
                            f"{want} after {transform}")
    used = {name for name, _ in mapping.values()}
    redundant = [re.compile(p) for p in REDUNDANT_TENSORS[arch]]
    if tied_embeddings:  # some tied checkpoints also store the lm_head: skipped only if proven identical
        differing = _stored_head_differing_from_embedding(ckpt)
        if differing:
            problems.append(f"tensor {differing[0]!r} differs from {differing[1]!r} but the config ties them "
                            f"(config_from_hf_dir imports such a checkpoint untied, as transformers does)")
        redundant.append(re.compile(r"(.*\.)?lm_head\.weight"))
    leftover = [n for n in ckpt.names() if n not in used and not any(r.fullmatch(n) for r in redundant)]
    if leftover:
        problems.append(f"tensors in the checkpoint that the {arch} table does not use: {leftover[:20]}"
                        + (f" (+{len(leftover) - 20} more)" if len(leftover) > 20 else ""))
    if problems:
        raise ValueError(f"cannot import {ckpt.hf_dir} as {arch}:\n  " + "\n  ".join(problems))
    skipped = len(ckpt.names()) - len(used)
    if skipped:
        log.info("%s: skipping %d tensors that %s does not need (e.g. a SiglipModel's text tower)",
                 ckpt.hf_dir, skipped, arch)
    return mapping


def load_hf_params(hf_dir: str, arch: str, cfg, *, mesh=None, rules=sharding_lib.DEFAULT_RULES):
    """Reads the parameters of `cfg` from `hf_dir`, each straight into its sharding."""
    ckpt = SafetensorsCheckpoint(hf_dir)
    tied = getattr(cfg, "tie_embeddings", False)
    mapping = plan_import(ckpt, arch, cfg, tied_embeddings=tied)
    abstract = models.abstract_params(cfg)
    shardings = models.flatten(sharding_lib.param_shardings(abstract, mesh, rules) if mesh is not None
                               else sharding_lib.single_device_shardings(abstract))
    abstract = models.flatten(abstract)
    def read_shard(name, transform, dtype, index):
        # Only this device shard's slice of the file is read.
        shard = transform.to_ours(np.asarray(ckpt.slice(name)[transform.hf_index(index)])).astype(dtype)
        if not np.all(np.isfinite(shard.astype(np.float32))):
            raise ValueError(f"tensor {name!r} in {hf_dir} contains NaN or Inf")
        return shard

    params = {}
    for path, (name, transform) in mapping.items():
        params[path] = jax.make_array_from_callback(
            transform.ours_shape(ckpt.shape(name)), shardings[path],
            functools.partial(read_shard, name, transform, abstract[path].dtype))
    return models.unflatten(params)


def import_hf(hf_dir: str, out: str | None = None, *, param_dtype: str = "float32",
              ignore_fields: Iterable[str] = (), select_layer: int = -1, mesh=None,
              overwrite: bool = False):
    """Imports an HF model directory. Returns (component_name, config, params); with `out`,
    also writes a checkpoint there (plus the tokenizer / processor files)."""
    arch, cfg = config_from_hf_dir(hf_dir, param_dtype=param_dtype, ignore_fields=ignore_fields,
                                   select_layer=select_layer)
    params = load_hf_params(hf_dir, arch, cfg, mesh=mesh)
    component = COMPONENT[hf_configs.ARCHITECTURES[arch]]
    if out is not None:  # `out` may be gs://; the HF files are read from local disk (memory-mapped)
        checkpoint.save(out, {component: cfg}, {component: params}, overwrite=overwrite,
                        assets=[p for p in (os.path.join(hf_dir, f) for f in ASSET_FILES) if os.path.isfile(p)],
                        source={"hf_dir": os.path.abspath(hf_dir), "architecture": arch})
    return component, cfg, params
