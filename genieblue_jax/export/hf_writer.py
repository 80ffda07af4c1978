"""genieblue_jax parameters -> a Hugging Face model directory (config.json + *.safetensors).

The writer half of the bridge whose reader is `genieblue_jax.hf.importer`; both go through
the same declarative name tables (`genieblue_jax.hf.tables`), read in the other direction:

    >>> from genieblue_jax.export import save_llm
    >>> save_llm("/export/qwen", cfg, params, dtype="bfloat16")     # doctest: +SKIP
    >>> transformers.AutoModelForCausalLM.from_pretrained("/export/qwen")  # doctest: +SKIP

What a directory holds:

    config.json                 transformers' config (`llm_config_to_hf` / `vision_config_to_hf`)
    model.safetensors           every tensor once, or model-0000k-of-0000n.safetensors shards
                                plus model.safetensors.index.json above `max_shard_bytes`
    genieblue_export.json       our full config (`cfg.to_dict()`) and the fields that
                                config.json cannot carry (SigLIP's `select_layer`); transformers
                                and our importer both ignore the file

Checks, all before any byte is written: the architecture must represent the config
exactly (e.g. a Qwen2 config with an o_proj bias is refused); the parameter tree must hold
exactly the parameters of `cfg` with their shapes (an unknown, missing or misshapen leaf is
an error naming it and its HF tensor); no two parameters may land on one HF name. Tensors
that are NaN / Inf after the cast to the file dtype (e.g. float16 overflow) are refused,
because the importer would refuse them.

Each file is written under a temporary name and renamed when complete, so a failed export
never leaves a half-written `model.safetensors` behind; config.json comes last.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import huggingface_hub
import ml_dtypes
import numpy as np
import safetensors.numpy

from genieblue_jax import models
from genieblue_jax.hf.configs import UnsupportedConfigError
from genieblue_jax.hf.safetensors_io import INDEX_FILE, SINGLE_FILE
from genieblue_jax.hf.tables import HF_SPELLINGS, TABLES, resolve, spell
from genieblue_jax.models.configs import DTYPES, LLMConfig, VisionConfig

# transformers' own `save_pretrained` default is "50GB" in 5.x ("5GB" in 4.x); 5 GB files
# are what the hub serves and what most tools expect.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
EXPORT_FILE = "genieblue_export.json"
EXPORT_FORMAT_VERSION = 1

# numpy dtypes safetensors stores (its tags F64 ... BOOL).
_STORABLE = frozenset(np.dtype(d) for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64,
                                            np.int32, np.int16, np.int8, np.uint8, np.bool_))
_FLOATS = frozenset(np.dtype(d) for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16))

# Architectures we write, by our config; a family name may stand for its architecture.
EXPORT_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3",
                        "Gemma3ForCausalLM": "gemma3", "SmolLM3ForCausalLM": "smollm3",
                        "SiglipVisionModel": "siglip"}
_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3", "gemma3": "gemma3_text", "smollm3": "smollm3"}
_ARCH_ALIASES = {family: arch for arch, family in EXPORT_ARCHITECTURES.items()}


# --- configs -------------------------------------------------------------------------------

def _file_dtype(dtype: str | None, cfg) -> str:
    dtype = cfg.param_dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for export; choose one of {DTYPES}")
    return dtype


def _rope_parameters(cfg: LLMConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` of the full-attention layers' RoPE."""
    out: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_type != "default":
        out["factor"] = float(cfg.rope_factor)
    if cfg.rope_type == "llama3":
        out.update(low_freq_factor=float(cfg.rope_low_freq_factor), high_freq_factor=float(cfg.rope_high_freq_factor),
                   original_max_position_embeddings=int(cfg.rope_original_max_position))
    return out


def _nope_interval(cfg: LLMConfig) -> int:
    """SmolLM3's `no_rope_layer_interval` that gives `cfg.nope_layers` (inert beside the
    explicit `no_rope_layers`, written so that the config reads as transformers writes it;
    its class default 4 when no interval does)."""
    for k in range(1, cfg.num_layers + 1):
        if tuple(i for i in range(cfg.num_layers) if (i + 1) % k == 0) == cfg.nope_layers:
            return k
    return 4


def llm_config_to_hf(cfg: LLMConfig, *, dtype: str | None = None) -> dict[str, Any]:
    """`config.json` of the transformers model that computes exactly `cfg`:
    Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM (a Gemma 3 VLM's
    language model becomes this text-only class) or SmolLM3ForCausalLM.

    The inverse of `hf.configs.llm_config_from_hf` on every architecture field (runtime
    fields such as `remat`, `attention_chunk`, `scan_layers`, `dtype` are ours alone).
    `dtype` (default `cfg.param_dtype`) is the dtype the tensors are stored in. RoPE is
    written both as transformers 5's `rope_parameters` and as the classic top-level
    `rope_theta` (+ `rope_scaling`, Gemma 3's `rope_local_base_freq`), which transformers 4
    reads; 5 lets `rope_parameters` win.

        >>> from genieblue_jax.models import get_preset
        >>> hf = llm_config_to_hf(get_preset("qwen2.5-3b"), dtype="bfloat16")
        >>> hf["architectures"], hf["num_key_value_heads"], hf["head_dim"], hf["dtype"]
        (['Qwen2ForCausalLM'], 2, 128, 'bfloat16')
        >>> hf["rope_parameters"], hf["tie_word_embeddings"]
        ({'rope_type': 'default', 'rope_theta': 1000000.0}, True)
        >>> hf = llm_config_to_hf(get_preset("gemma-3-4b"))
        >>> hf["model_type"], hf["rope_parameters"]["full_attention"]
        ('gemma3_text', {'rope_type': 'linear', 'rope_theta': 1000000.0, 'factor': 8.0})
        >>> hf["rope_parameters"]["sliding_attention"]
        {'rope_type': 'default', 'rope_theta': 10000.0}

    Raises UnsupportedConfigError when the family cannot express the config (Qwen2 has
    q/k/v biases and nothing else; the others' `attention_bias` covers q/k/v and o together;
    only Llama and SmolLM3 have `mlp_bias`; per-layer RoPE differences other than the
    family's own).
    """
    if not isinstance(cfg, LLMConfig):
        raise TypeError(f"llm_config_to_hf needs an LLMConfig, got {type(cfg).__name__}")
    dtype = _file_dtype(dtype, cfg)
    family = cfg.family
    rope = _rope_parameters(cfg)
    hf: dict[str, Any] = {
        "architectures": [_ARCH_ALIASES[family]], "model_type": _MODEL_TYPES[family],
        "vocab_size": int(cfg.vocab_size), "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(cfg.intermediate_size), "num_hidden_layers": int(cfg.num_layers),
        "num_attention_heads": int(cfg.num_heads), "num_key_value_heads": int(cfg.num_kv_heads),
        "head_dim": int(cfg.head_dim), "max_position_embeddings": int(cfg.max_position_embeddings),
        "initializer_range": float(cfg.initializer_range), "rms_norm_eps": float(cfg.rms_norm_eps),
        "tie_word_embeddings": bool(cfg.tie_embeddings), "rope_theta": float(cfg.rope_theta),
        "attention_dropout": 0.0, "use_cache": True, "dtype": dtype,
        # The tokenizer's ids are not the model's: null here, not the class defaults (SmolLM3Config's
        # pad id 128004 is outside a smaller vocabulary); an export that knows the tokenizer gives
        # them to save_llm (`token_ids`).
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if cfg.rope_type != "default":
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    sliding = "sliding_attention" in cfg.layer_types
    layer_types = list(cfg.layer_types) or ["full_attention"] * int(cfg.num_layers)
    if family == "qwen2":
        biases = (cfg.qkv_bias, cfg.out_bias, cfg.mlp_bias)
        if biases != (True, False, False):
            raise UnsupportedConfigError(
                f"Qwen2ForCausalLM always has q/k/v biases and no o_proj / MLP biases; the config has "
                f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}, mlp_bias={cfg.mlp_bias}")
    else:
        if cfg.qkv_bias != cfg.out_bias:
            raise UnsupportedConfigError(
                f"{_ARCH_ALIASES[family]}'s attention_bias applies to q/k/v and o_proj together; the config "
                f"has qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}")
        if cfg.mlp_bias and family not in ("llama", "smollm3"):
            raise UnsupportedConfigError(f"{_ARCH_ALIASES[family]} has no MLP biases; the config has mlp_bias=True")
        hf["attention_bias"] = bool(cfg.qkv_bias)
    if family in ("qwen2", "qwen3"):
        # Sliding layers are the last num_layers - max_window_layers (Qwen2Config's rule); layer_types
        # is written as well, and transformers reads it first.
        hf.update(use_sliding_window=sliding, sliding_window=int(cfg.sliding_window) if sliding else None,
                  layer_types=layer_types, hidden_act="silu")
        if sliding:  # inert otherwise, and left at its class default as transformers writes it
            hf["max_window_layers"] = layer_types.index("sliding_attention")
    elif family == "llama":
        hf.update(mlp_bias=bool(cfg.mlp_bias), pretraining_tp=1, hidden_act="silu")
    elif family == "smollm3":
        hf.update(mlp_bias=bool(cfg.mlp_bias), hidden_act="silu", use_sliding_window=sliding,
                  sliding_window=int(cfg.sliding_window) if sliding else None, layer_types=layer_types,
                  no_rope_layers=[int(i not in cfg.nope_layers) for i in range(cfg.num_layers)],
                  no_rope_layer_interval=_nope_interval(cfg))
    elif family == "gemma3":
        local = {"rope_type": "default", "rope_theta": float(cfg.local_rope_theta or cfg.rope_theta)}
        scalar = float(cfg.query_pre_attn_scalar)  # Gemma3TextConfig types it int (strict dataclass)
        hf.update(hidden_activation="gelu_pytorch_tanh",
                  query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar,
                  sliding_window=int(cfg.sliding_window or 4096), layer_types=layer_types,
                  rope_local_base_freq=local["rope_theta"], final_logit_softcapping=None,
                  attn_logit_softcapping=None, use_bidirectional_attention=False)
        rope = {"full_attention": rope, "sliding_attention": local}
    if family != "smollm3" and cfg.nope_layers:
        raise UnsupportedConfigError(f"{_ARCH_ALIASES[family]} applies RoPE on every layer; the config has "
                                     f"nope_layers={cfg.nope_layers}")
    if family != "gemma3" and cfg.local_rope_theta and sliding:
        raise UnsupportedConfigError(f"{_ARCH_ALIASES[family]} has one RoPE for every layer; the config has "
                                     f"local_rope_theta={cfg.local_rope_theta}")
    if family == "llama" and sliding:
        raise UnsupportedConfigError("LlamaForCausalLM has no sliding-window layers; the config has layer_types="
                                     f"{cfg.layer_types}")
    if family != "gemma3" and cfg.query_pre_attn_scalar:
        raise UnsupportedConfigError(f"{_ARCH_ALIASES[family]} scales attention scores by head_dim ** -0.5; the "
                                     f"config has query_pre_attn_scalar={cfg.query_pre_attn_scalar}")
    hf["rope_parameters"] = rope
    return hf


def vision_config_to_hf(cfg: VisionConfig, *, dtype: str | None = None) -> dict[str, Any]:
    """`config.json` of the `SiglipVisionModel` that computes exactly `cfg`'s tower.

    The inverse of `hf.configs.vision_config_from_hf`, except for two fields of ours that
    SiglipVisionConfig has no place for and that the importer's strict field policy would
    refuse as unknown keys: `select_layer` (which hidden state the projector reads; see
    `vision_config_extras`, passed back as `import_hf(..., select_layer=...)`) and
    `initializer_range` (initialisation only). `use_head` is `vision_use_head`.

        >>> from genieblue_jax.models import get_preset
        >>> cfg = get_preset("demo-siglip").replace(select_layer=-2)
        >>> hf = vision_config_to_hf(cfg)
        >>> hf["model_type"], hf["image_size"], hf["patch_size"], hf["vision_use_head"]
        ('siglip_vision_model', 56, 8, False)
        >>> "select_layer" in hf, vision_config_extras(cfg)
        (False, {'select_layer': -2})
    """
    if not isinstance(cfg, VisionConfig):
        raise TypeError(f"vision_config_to_hf needs a VisionConfig, got {type(cfg).__name__}")
    return {
        "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
        "hidden_size": int(cfg.hidden_size), "intermediate_size": int(cfg.intermediate_size),
        "num_hidden_layers": int(cfg.num_layers), "num_attention_heads": int(cfg.num_heads),
        "num_channels": int(cfg.num_channels), "image_size": int(cfg.image_size),
        "patch_size": int(cfg.patch_size), "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": float(cfg.layer_norm_eps), "attention_dropout": 0.0,
        "vision_use_head": bool(cfg.use_head), "dtype": _file_dtype(dtype, cfg),
    }


def vision_config_extras(cfg: VisionConfig) -> dict[str, Any]:
    """The fields of `cfg` that `config.json` cannot carry but the model's use depends on."""
    return {"select_layer": int(cfg.select_layer)}


# --- names ---------------------------------------------------------------------------------

def architecture_for(cfg) -> str:
    """The HF architecture a config is exported as."""
    if isinstance(cfg, LLMConfig):
        return _ARCH_ALIASES[cfg.family]
    if isinstance(cfg, VisionConfig):
        return "SiglipVisionModel"
    raise TypeError(f"no Hugging Face export for config type {type(cfg).__name__}")


def _check_arch(arch: str, cfg) -> str:
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch not in EXPORT_ARCHITECTURES:
        raise ValueError(f"cannot export as {arch!r}; supported: {sorted(EXPORT_ARCHITECTURES)} "
                         f"(or the family names {sorted(_ARCH_ALIASES)})")
    if arch != architecture_for(cfg):
        raise ValueError(f"architecture {arch!r} does not match the config "
                         f"({type(cfg).__name__}, exported as {architecture_for(cfg)!r})")
    return arch


def _plan(arch: str, cfg, prefix: str | None):
    """(architecture, prefix, abstract params by path, {path: (hf_name, transform)})."""
    arch = _check_arch(arch, cfg)
    # The spellings of a writable architecture are plain prefixes (HF_SPELLINGS: "" -> prefix, or none).
    allowed = tuple(sp[0][1] if sp else "" for sp in HF_SPELLINGS[arch])
    prefix = allowed[0] if prefix is None else prefix
    if prefix not in allowed:
        raise ValueError(f"prefix {prefix!r} is not one {arch} files use; choose one of {allowed}")
    abstract = models.flatten(models.abstract_params(cfg))
    table = TABLES[EXPORT_ARCHITECTURES[arch]]
    mapping = {path: (spell(name, (("", prefix),)), t) for path, (name, t) in resolve(table, abstract).items()}
    by_name: dict[str, list[str]] = {}
    for path, (name, _) in mapping.items():
        by_name.setdefault(name, []).append(path)
    clashes = {n: p for n, p in by_name.items() if len(p) > 1}
    if clashes:  # a table bug: two of our parameters would overwrite one HF tensor
        raise ValueError(f"several parameters map to one HF tensor: {clashes}")
    return arch, prefix, abstract, mapping


def hf_names(arch: str, cfg, *, prefix: str | None = None) -> dict[str, str]:
    """{our parameter path: HF tensor name} for every parameter of `cfg`, nothing read.

    `arch` is the HF architecture (or our family name). The table's `{i}` becomes the layer
    index; SigLIP names get `prefix`, by default `vision_model.`, the name transformers 4
    writes and expects and that transformers 5 also loads (5.x itself writes them bare:
    pass `prefix=""`). Tied embeddings have no `lm_head`:

        >>> from genieblue_jax.models import get_preset
        >>> names = hf_names("qwen2", get_preset("tiny-qwen2"))
        >>> names["layers_3/self_attn/q_proj/kernel"], names["norm/scale"]
        ('model.layers.3.self_attn.q_proj.weight', 'model.norm.weight')
        >>> "lm_head/kernel" in names, len(names)
        (False, 50)
        >>> vit = get_preset("tiny-siglip")
        >>> hf_names("SiglipVisionModel", vit)["encoder/layers_1/mlp/fc1/kernel"]
        'vision_model.encoder.layers.1.mlp.fc1.weight'
        >>> hf_names("SiglipVisionModel", vit, prefix="")["head/attention/in_proj/kernel"]
        'head.attention.in_proj_weight'
    """
    return {path: name for path, (name, _) in _plan(arch, cfg, prefix)[3].items()}


def hf_tensors(arch: str, cfg, params: Mapping, *, prefix: str | None = None) -> dict[str, np.ndarray]:
    """Our parameters (nested tree or flat {"a/b/c": array}) -> {HF name: numpy array}.

    Each tensor goes through its table rule's `Transform.to_hf` (flax `(in, out)` kernels
    become torch `(out, in)`, the patch conv HWIO becomes OIHW), keeping the parameter's
    dtype. Every parameter of `cfg` is written exactly once: a leaf `cfg` does not have, a
    missing leaf or a wrong shape raises ValueError naming the parameter and its HF tensor.

        >>> from genieblue_jax.models import get_preset, abstract_params, flatten
        >>> cfg = get_preset("tiny-qwen2")                    # hidden 64, 2 KV heads x 16
        >>> params = {p: np.zeros(a.shape, np.float32) for p, a in flatten(abstract_params(cfg)).items()}
        >>> params["layers_0/self_attn/k_proj/kernel"].shape  # flax Dense (in, out)
        (64, 32)
        >>> hf = hf_tensors("Qwen2ForCausalLM", cfg, params)
        >>> hf["model.layers.0.self_attn.k_proj.weight"].shape  # torch Linear (out, in)
        (32, 64)
        >>> params["lm_head/kernel"] = np.zeros((64, 512), np.float32)   # tied: no lm_head
        >>> hf_tensors("qwen2", cfg, params)
        Traceback (most recent call last):
        ...
        ValueError: parameters do not match the Qwen2ForCausalLM config:
          unexpected parameter 'lm_head/kernel' (would be 'lm_head.weight'); the config has tie_embeddings=True
    """
    arch, prefix, abstract, mapping = _plan(arch, cfg, prefix)
    flat = models.flatten(dict(params))
    problems = []
    for path in sorted(set(flat) - set(abstract)):
        try:
            name = resolve(TABLES[EXPORT_ARCHITECTURES[arch]], [path])[path][0]
            hint = f" (would be {prefix + name!r})"
        except ValueError:
            hint = " (no HF name: the table has no rule for it)"
        if path.startswith("lm_head/") and getattr(cfg, "tie_embeddings", False):
            hint += "; the config has tie_embeddings=True"
        if path.startswith("head/") and isinstance(cfg, VisionConfig) and not cfg.use_head:
            hint += "; the config has use_head=False"
        problems.append(f"unexpected parameter {path!r}{hint}")
    for path in sorted(set(abstract) - set(flat)):
        problems.append(f"missing parameter {path!r} (HF tensor {mapping[path][0]!r})")
    for path in sorted(set(abstract) & set(flat)):
        got, want = tuple(np.shape(flat[path])), tuple(abstract[path].shape)
        if got != want:
            problems.append(f"parameter {path!r} (HF tensor {mapping[path][0]!r}) has shape {got}, "
                            f"the config needs {want}")
    if problems:
        raise ValueError(f"parameters do not match the {arch} config:\n  " + "\n  ".join(problems))
    out = {}
    for path in sorted(mapping, key=lambda p: _natural_key(mapping[p][0])):
        name, transform = mapping[path]
        out[name] = transform.to_hf(np.asarray(flat[path]))
    return out


# --- safetensors ---------------------------------------------------------------------------

def _natural_key(name: str):
    """Sort key with digit runs compared as numbers: layers.2 before layers.10."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name)]


_FILE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16), "float64": np.dtype(np.float64)}


def _target_dtype(name: str, t, dtype) -> np.dtype:
    src = np.dtype(t.dtype)
    if dtype is not None and str(dtype) not in _FILE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: floating tensors can be written as {sorted(_FILE_DTYPES)}")
    out = _FILE_DTYPES[str(dtype)] if dtype is not None and src in _FLOATS else src
    if out not in _STORABLE:
        raise ValueError(f"tensor {name!r}: dtype {out} cannot be stored in safetensors "
                         f"(supported: {sorted(str(d) for d in _STORABLE)})")
    return out


def _cast(name: str, t, dt: np.dtype, check_finite: bool) -> np.ndarray:
    """`t` as a little-endian contiguous numpy array of `dt`, refused if the cast overflowed."""
    arr = np.asarray(t)
    with np.errstate(over="ignore"):  # overflow is reported just below
        arr = np.ascontiguousarray(arr.astype(dt.newbyteorder("<"), copy=False))
    if check_finite and dt in _FLOATS and not np.all(np.isfinite(arr.astype(np.float32))):
        raise ValueError(f"tensor {name!r} contains NaN or Inf as {dt} (overflow in the "
                         "cast?); the importer would refuse it")
    return arr


def write_safetensors(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                      *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str | None = None,
                      check_finite: bool = False) -> list[str]:
    """Writes `tensors` ({name: array}) as safetensors; returns the paths written.

    Files are written by `safetensors.numpy.save_file`, one shard at a time, and split as
    `huggingface_hub.split_state_dict_into_shards_factory` splits them (tensors in natural name
    order, a new shard whenever the next tensor would overflow `max_shard_bytes`, a larger
    tensor in a shard of its own): a single file at `path`, or for `dir/model.safetensors`
    `dir/model-00001-of-00003.safetensors` ... plus `dir/model.safetensors.index.json`
    ({"metadata": {"total_size": bytes, "total_parameters": n}, "weight_map": {name: file}}).
    Files of the same family left from an earlier write (the single file, old shards, the
    index) are removed, so readers never mix two exports; a file is renamed into place only
    once complete.

    `metadata` goes to the header's `__metadata__` (strings only; transformers wants
    {"format": "pt"}). `dtype` casts every floating tensor while its shard is written; arrays
    may be numpy or anything `np.asarray` reads (jax arrays). ValueError for bad metadata, a
    bad name, a dtype safetensors cannot store, or (with `check_finite`) a tensor that is not
    finite after the cast.

        >>> import os, tempfile
        >>> from safetensors import safe_open
        >>> d = tempfile.mkdtemp()
        >>> f = write_safetensors(os.path.join(d, "model.safetensors"), {"b": np.ones((2, 3)),
        ...                       "a": np.arange(4)}, max_shard_bytes=40, dtype="bfloat16")
        >>> sorted(os.listdir(d))
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
        >>> safe_open(f[1], "numpy").get_slice("b").get_dtype()
        'BF16'
    """
    if metadata is not None:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; not: {bad}")
        metadata = dict(metadata)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    specs = {}  # name -> (array, file dtype, shape), in natural name order
    for name in sorted(tensors, key=_natural_key):
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        t = tensors[name]
        if not hasattr(t, "dtype") or not hasattr(t, "shape"):
            t = np.asarray(t)
        specs[name] = (t, _target_dtype(name, t, dtype), tuple(int(d) for d in np.shape(t)))
    directory, base = os.path.split(os.path.abspath(path))
    if not base.endswith(".safetensors"):
        raise ValueError(f"{path}: a safetensors file name must end in .safetensors")
    stem = base[: -len(".safetensors")]
    split = huggingface_hub.split_state_dict_into_shards_factory(
        specs, get_storage_size=lambda s: math.prod(s[2]) * s[1].itemsize,
        filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_shard_bytes)
    os.makedirs(directory, exist_ok=True)
    written = []
    for fname, names in split.filename_to_tensors.items():
        full = os.path.join(directory, fname)
        arrays = {n: _cast(n, specs[n][0], specs[n][1], check_finite) for n in names}
        try:
            safetensors.numpy.save_file(arrays, full + ".tmp", metadata=metadata)
            os.replace(full + ".tmp", full)
        finally:
            if os.path.exists(full + ".tmp"):
                os.remove(full + ".tmp")
        written.append(full)
    index_path = os.path.join(directory, base + ".index.json")
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_parameters": sum(math.prod(s[2]) for s in specs.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        with open(index_path + ".tmp", "w") as f:
            json.dump(index, f, indent=2)
        os.replace(index_path + ".tmp", index_path)
        written.append(index_path)
    family = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")
    for fname in os.listdir(directory):
        full = os.path.join(directory, fname)
        if full not in written and (fname == base or fname == base + ".index.json" or family.fullmatch(fname)):
            os.remove(full)
    return written


# --- model directories ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Exported:
    """What `save_llm` / `save_vision` wrote: the directory, its architecture, the files, and
    the fields config.json cannot carry (pass them back to `import_hf`)."""
    out_dir: str
    architecture: str
    files: tuple[str, ...]
    extras: dict


_OWN_FILES = re.compile(r"config\.json|" + re.escape(EXPORT_FILE) + r"|" + re.escape(INDEX_FILE)
                        + r"|model(-\d{5}-of-\d{5})?\.safetensors")


def _save(out_dir: str, cfg, params, hf_config: dict, dtype: str, extras: dict, *,
          prefix: str | None, max_shard_bytes: int, overwrite: bool) -> Exported:
    arch = architecture_for(cfg)
    tensors = hf_tensors(arch, cfg, params, prefix=prefix)  # every check before any write
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir):
        existing = sorted(f for f in os.listdir(out_dir) if _OWN_FILES.fullmatch(f))
        if existing and not overwrite:
            raise FileExistsError(f"{out_dir} already holds a model ({existing}); pass overwrite=True")
        for f in existing:  # e.g. shards of another naming than the ones written now
            if f.endswith(".safetensors"):
                os.remove(os.path.join(out_dir, f))
    os.makedirs(out_dir, exist_ok=True)
    files = write_safetensors(os.path.join(out_dir, SINGLE_FILE), tensors, {"format": "pt"},
                              max_shard_bytes=max_shard_bytes, dtype=dtype, check_finite=True)
    sidecar = {"format_version": EXPORT_FORMAT_VERSION, "architecture": arch, "extras": extras,
               "genieblue_config": cfg.to_dict()}
    for name, content in ((EXPORT_FILE, sidecar), ("config.json", hf_config)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
        files.append(os.path.join(out_dir, name))
    return Exported(out_dir, arch, tuple(files), extras)


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_llm(out_dir: str, cfg: LLMConfig, params, dtype: str = "float32", *, token_ids: Mapping | None = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Exported:
    """Writes a decoder LLM as a transformers directory of its family's class (`llm_config_to_hf`).

    `params` is the model's tree (jax or numpy leaves, nested or flat), stored as `dtype`
    ("float32", "bfloat16" or "float16"). `token_ids`: the tokenizer's `bos_token_id`,
    `eos_token_id` (an id or a list), `pad_token_id` for config.json (null without: they are
    the tokenizer's, not the model's). Load it with
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` or `genieblue_jax.load`.
    """
    dtype = _file_dtype(dtype, cfg)
    unknown = sorted(set(token_ids or {}) - set(TOKEN_ID_FIELDS))
    if unknown:
        raise ValueError(f"token_ids {unknown} are not config.json's token ids {TOKEN_ID_FIELDS}")
    hf_config = {**llm_config_to_hf(cfg, dtype=dtype), **(token_ids or {})}
    return _save(out_dir, cfg, params, hf_config, dtype, {}, prefix=None, max_shard_bytes=max_shard_bytes,
                 overwrite=overwrite)


def save_vision(out_dir: str, cfg: VisionConfig, params, dtype: str = "float32", *,
                prefix: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                overwrite: bool = False) -> Exported:
    """Writes a SigLIP tower as a transformers `SiglipVisionModel` directory.

    The pooling head is written when `cfg.use_head` (and must then be in `params`), never
    otherwise. `select_layer` cannot live in config.json; it is in the returned
    `Exported.extras` and in `genieblue_export.json`: re-import with
    `import_hf(out_dir, select_layer=extras["select_layer"])`. Tensor names carry `prefix`
    (default `vision_model.`; see `hf_names`).
    """
    dtype = _file_dtype(dtype, cfg)
    return _save(out_dir, cfg, params, vision_config_to_hf(cfg, dtype=dtype), dtype,
                 vision_config_extras(cfg), prefix=prefix, max_shard_bytes=max_shard_bytes,
                 overwrite=overwrite)


def read_export_extras(out_dir: str) -> dict:
    """The `extras` an export recorded in genieblue_export.json ({} if there is none)."""
    path = os.path.join(out_dir, EXPORT_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f).get("extras", {})


__all__ = ["llm_config_to_hf", "vision_config_to_hf", "vision_config_extras", "architecture_for",
           "hf_names", "hf_tensors", "write_safetensors", "save_llm", "save_vision", "Exported",
           "read_export_extras", "DEFAULT_MAX_SHARD_BYTES", "EXPORT_FILE"]
