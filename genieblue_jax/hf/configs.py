"""Hugging Face `config.json` -> our config dataclasses, strictly.

Every field of the HF config is either translated, checked against the values we support,
or known metadata; anything else stops the import with an error naming the field, so a
model we would run differently from `transformers` is never imported silently. A field
that is known harmless but not listed here can be waived explicitly (`ignore_fields`).

Missing fields take Hugging Face's class defaults, because `config.json` files written by
older `transformers` versions only store fields that differ from them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from genieblue_jax.models.configs import LAYER_TYPES, LLMConfig, VisionConfig


class UnsupportedConfigError(ValueError):
    """An HF config field or value genieblue_jax does not implement; the message names the
    field and the file."""


# Fields that never change the computation.
METADATA_FIELDS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "_name_or_path", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "_attn_implementation",
    "_commit_hash", "tf_legacy_loss", "use_bfloat16", "torchscript", "pruned_heads",
    "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "is_decoder", "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k",
    "top_p", "repetition_penalty", "num_return_sequences", "early_stopping", "bad_words_ids",
    "num_labels", "cache_implementation",
})

# Hugging Face class defaults (transformers' config classes, 5.x; the fields a config.json
# written by an older version leaves out take these values).
_DECODER_COMMON = dict(hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6, attention_dropout=0.0,
                       rope_theta=10000.0)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": dict(_DECODER_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=32768, tie_word_embeddings=False, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28),
    "llama": dict(_DECODER_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                  max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False, head_dim=None, pretraining_tp=1),
    "qwen3": dict(_DECODER_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                  max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    # Gemma3TextConfig; rope_theta / rope_local_base_freq are its default_theta["global" / "local"].
    "gemma3": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                   initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                   attention_dropout=0.0, query_pre_attn_scalar=256, sliding_window=4096,
                   sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None,
                   use_bidirectional_attention=False, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
    "smollm3": dict(_DECODER_COMMON, vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                    num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
                    max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=False,
                    mlp_bias=False, use_sliding_window=False, sliding_window=None, no_rope_layers=None,
                    no_rope_layer_interval=4, rope_theta=2_000_000.0),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
                   vision_use_head=True),
}

ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3", "SmolLM3ForCausalLM": "smollm3",
    "SiglipVisionModel": "siglip", "SiglipModel": "siglip",
}
_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
                "smollm3": "SmolLM3ForCausalLM", "siglip_vision_model": "SiglipVisionModel", "siglip": "SiglipModel"}
# Architectures people ask for that we refuse, with why (the message names it).
REFUSED = {
    "Qwen3MoeForCausalLM": "mixture-of-experts blocks (no MoE routing: GenieBlue's point is an NPU-friendly "
                           "dense model)",
    "Gemma3nForCausalLM": "Gemma 3n's per-layer embeddings and AltUp blocks",
    "Gemma3nForConditionalGeneration": "Gemma 3n's per-layer embeddings and AltUp blocks",
    "Gemma2ForCausalLM": "Gemma 2 (logit soft-capping; use Gemma 3)",
    "Siglip2VisionModel": "SigLIP 2 NaFlex (variable resolution); the fixed-resolution SigLIP 2 checkpoints "
                          "(siglip2-so400m-patch14-384, ...) use the SiglipModel layout, which imports",
    "Siglip2Model": "SigLIP 2 NaFlex (variable resolution); the fixed-resolution SigLIP 2 checkpoints "
                    "(siglip2-so400m-patch14-384, ...) use the SiglipModel layout, which imports",
}


def architecture_of(hf: dict, source: str) -> str:
    """The HF architecture name of a config dict, checked against what we support."""
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf["model_type"]]]
    if len(archs) == 1 and archs[0] in REFUSED:
        raise UnsupportedConfigError(f"{source}: architecture {archs[0]} is not supported: {REFUSED[archs[0]]}")
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedConfigError(
            f"{source}: architecture {archs or hf.get('model_type')!r} is not supported; "
            f"supported: {sorted(ARCHITECTURES)}")
    return archs[0]


class _Fields:
    """Tracks which HF fields were consumed so leftovers can be reported."""

    def __init__(self, hf: dict, defaults: dict, source: str):
        self.values = {**defaults, **hf}
        self.source = source
        self.used: set[str] = set()

    def get(self, key: str):
        """Field `key` of the HF config (or its default), None when neither has it; marks it consumed."""
        self.used.add(key)
        return self.values.get(key)

    def require(self, key: str, ok: Callable[[Any], bool], supported: str):
        """`get(key)`, checked: UnsupportedConfigError naming the field, its value and `supported`
        (what would be accepted, in words) when `ok(value)` is false."""
        value = self.get(key)
        if not ok(value):
            raise UnsupportedConfigError(
                f"{self.source}: config field {key}={value!r} is not supported (supported: {supported})")
        return value

    def refuse(self, key: str, value, supported: str):
        """Always raises UnsupportedConfigError naming field `key` (a dotted path inside a nested
        field, e.g. "rope_scaling.rope_type"), its `value` and `supported`, as `require` does."""
        raise UnsupportedConfigError(
            f"{self.source}: config field {key}={value!r} is not supported (supported: {supported})")

    def finish(self, ignore_fields: Iterable[str], also_known: Iterable[str] = ()):
        """Call after reading every field: UnsupportedConfigError listing the fields never consumed,
        other than METADATA_FIELDS, `also_known` (read elsewhere) and the user's `ignore_fields`
        (`--ignore_config_field`), so a setting we would not honour is never dropped silently."""
        leftover = sorted(set(self.values) - self.used - METADATA_FIELDS - set(also_known)
                          - set(ignore_fields))
        if leftover:
            raise UnsupportedConfigError(
                f"{self.source}: config field(s) {leftover} are not supported by genieblue_jax; if "
                "they are harmless for this model, waive them with ignore_fields / --ignore_config_field")


# RoPE parameters each rope_type may carry (transformers' `rope_parameters` / `rope_scaling`).
_ROPE_KEYS = {"default": {"rope_type", "type", "rope_theta"},
              "linear": {"rope_type", "type", "rope_theta", "factor"},
              "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"}}


def _rope_entry(f: _Fields, key: str, params: dict, theta: float, max_position: int) -> dict:
    """One RoPE dict (`rope_parameters` or `rope_scaling`, or a layer type's entry of them)
    -> our LLMConfig fields; refuses an unknown rope_type or parameter by name."""
    if not isinstance(params, dict):
        f.refuse(key, params, "a dict of RoPE parameters")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_KEYS:
        f.refuse(f"{key}.rope_type", kind, f"{sorted(_ROPE_KEYS)} (YaRN, dynamic NTK, LongRoPE are not implemented)")
    unknown = sorted(set(params) - _ROPE_KEYS[kind])
    if params.get("partial_rotary_factor", 1.0) == 1.0 and "partial_rotary_factor" in unknown:
        unknown.remove("partial_rotary_factor")  # 1.0: the whole head rotates, as ours does
    if unknown:
        f.refuse(f"{key}.{unknown[0]}", params[unknown[0]], f"for rope_type {kind!r}: {sorted(_ROPE_KEYS[kind])}")
    out = {"rope_theta": float(params.get("rope_theta", theta)), "rope_type": kind}
    if kind != "default":
        out["rope_factor"] = float(params["factor"])
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_position=int(params.get("original_max_position_embeddings", max_position)))
    return out


def _rope(f: _Fields, family: str, max_position: int, layer_types: tuple[str, ...] = ()) -> dict:
    """RoPE fields from either spelling: the hub's `rope_theta` + `rope_scaling` (+ Gemma 3's
    `rope_local_base_freq`), or transformers 5's `rope_parameters`, flat or keyed by layer
    type (Gemma 3: "full_attention" / "sliding_attention")."""
    theta, scaling, params = f.get("rope_theta"), f.get("rope_scaling"), f.get("rope_parameters")
    local = f.get("rope_local_base_freq") if family == "gemma3" else None  # Gemma 3's hub spelling
    nested = isinstance(params, dict) and set(params) & {"full_attention", "sliding_attention"}
    if nested:
        unknown = sorted(set(params) - {"full_attention", "sliding_attention"})
        if unknown:
            f.refuse(f"rope_parameters.{unknown[0]}", params[unknown[0]], "entries per layer type")
        full = params.get("full_attention") or {}
        out = _rope_entry(f, "rope_parameters.full_attention", {**full, **(scaling or {})}, theta, max_position)
        sliding = params.get("sliding_attention")
        if sliding is not None:
            entry = _rope_entry(f, "rope_parameters.sliding_attention", sliding, local or theta, max_position)
            if entry["rope_type"] != "default":
                f.refuse("rope_parameters.sliding_attention.rope_type", entry["rope_type"],
                         "'default' on sliding-window layers")
            out["local_rope_theta"] = entry["rope_theta"]
        return out
    # transformers: `rope_scaling` wins over `rope_parameters` when both are there
    out = _rope_entry(f, "rope_scaling" if scaling else "rope_parameters", scaling or params or {}, theta,
                      max_position)
    if local is not None and "sliding_attention" in layer_types:
        out["local_rope_theta"] = float(local)
    return out


def _check_layer_types(f: _Fields, layer_types, n: int) -> tuple[str, ...]:
    if layer_types is None:
        return ()
    if not isinstance(layer_types, list) or len(layer_types) != n or set(layer_types) - set(LAYER_TYPES):
        f.refuse("layer_types", layer_types, f"one of {LAYER_TYPES} for each of the {n} layers")
    return tuple(layer_types)


def _attention_pattern(f: _Fields, family: str, n: int) -> dict:
    """layer_types / sliding_window / nope_layers as each family's config class derives them."""
    if family == "gemma3":
        pattern = f.get("sliding_window_pattern")
        f.get("_sliding_window_pattern")  # transformers 5 also writes its private copy
        types = _check_layer_types(f, f.get("layer_types"), n) or tuple(
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n))
        return {"layer_types": types, "sliding_window": int(f.get("sliding_window"))}
    if family in ("qwen2", "qwen3"):  # Qwen2Config / Qwen3Config.__post_init__
        window = f.get("sliding_window") if f.get("use_sliding_window") else None
        first_sliding = f.get("max_window_layers")
        types = _check_layer_types(f, f.get("layer_types"), n) or tuple(
            "sliding_attention" if window is not None and i >= first_sliding else "full_attention" for i in range(n))
    elif family == "smollm3":  # SmolLM3Config.__post_init__: sliding only on NoPE layers, if asked
        interval = f.get("no_rope_layer_interval")
        rope = f.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
        if not isinstance(rope, list) or len(rope) < n or set(rope[:n]) - {0, 1}:
            f.refuse("no_rope_layers", rope, f"0 (NoPE) or 1 (RoPE) for each of the {n} layers")
        use = f.get("use_sliding_window")
        window = f.get("sliding_window") if use else None
        types = _check_layer_types(f, f.get("layer_types"), n) or tuple(
            "sliding_attention" if use and window is not None and not rope[i] else "full_attention" for i in range(n))
        nope = tuple(i for i in range(n) if not rope[i])
        if window is None:
            types = ()  # SmolLM3Attention ignores layer_types without use_sliding_window
        return {"layer_types": types if "sliding_attention" in types else (), "sliding_window": int(window or 0),
                "nope_layers": nope}
    else:
        return {}
    if "sliding_attention" in types and window is None:
        f.refuse("layer_types", list(types), "sliding_attention layers only with use_sliding_window=true")
    return {"layer_types": types if "sliding_attention" in types else (), "sliding_window": int(window or 0)}


def llm_config_from_hf(hf: dict, *, source: str = "config.json", ignore_fields: Iterable[str] = (),
                       param_dtype: str = "float32", dtype: str = "float32") -> LLMConfig:
    """Our `LLMConfig` for a transformers decoder config.json (as a dict; `source` names it in
    errors): `Qwen2ForCausalLM`, `LlamaForCausalLM` (Llama 3.x's llama3 RoPE scaling),
    `Qwen3ForCausalLM`, `Gemma3ForCausalLM` (and the `text_config` of a
    `Gemma3ForConditionalGeneration`), `SmolLM3ForCausalLM`.

    Strict: every field is read or known to be inert (metadata, `ignore_fields`); a field
    that changes the computation in a way we do not implement (YaRN / dynamic RoPE, logit
    soft-capping, bidirectional attention, dropout, an unexpected activation, Llama's
    `pretraining_tp` != 1) or that we do not know raises `UnsupportedConfigError` naming the
    field and the file, instead of importing a model that computes something else. Missing
    fields take the transformers class defaults. Both spellings of RoPE are read: the hub's
    `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`) and transformers 5's
    `rope_parameters` (flat, or per layer type). `param_dtype` / `dtype`: storage / compute
    dtype names ("float32", "bfloat16").

        >>> cfg = llm_config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        ...     "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
        ...     "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        ...     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
        >>> cfg.family, cfg.rope_type, cfg.rope_factor, cfg.head_dim
        ('llama', 'llama3', 32.0, 16)
        >>> llm_config_from_hf({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn",
        ...     "factor": 4.0}})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        UnsupportedConfigError: config.json: config field rope_scaling.rope_type='yarn' is not supported ...
    """
    arch = architecture_of(hf, source)
    family = ARCHITECTURES[arch]
    if family == "siglip":
        raise UnsupportedConfigError(f"{source}: {arch} is not a decoder LLM")
    if arch == "Gemma3ForConditionalGeneration":
        # Only the language model is imported; the vision tower and projector are Gemma's own.
        top = _Fields(hf, {}, source)
        text = top.get("text_config") or {}
        top.finish(ignore_fields, also_known=("vision_config", "mm_tokens_per_image", "boi_token_index",
                                              "eoi_token_index", "image_token_index", "initializer_range",
                                              "tie_word_embeddings"))
        hf = {"tie_word_embeddings": top.values.get("tie_word_embeddings", True), **text}
        source = f"{source}[text_config]"
    f = _Fields(hf, HF_DEFAULTS[family], source)
    hidden, heads, n = f.get("hidden_size"), f.get("num_attention_heads"), f.get("num_hidden_layers")
    kv_heads = f.get("num_key_value_heads") or heads
    head_dim = f.get("head_dim") or hidden // heads
    f.require("attention_dropout", lambda v: not v, "0.0 (no dropout)")
    extra: dict[str, Any] = {}
    if family == "gemma3":
        f.require("hidden_activation", lambda v: v == "gelu_pytorch_tanh", "'gelu_pytorch_tanh'")
        if "hidden_act" in f.values:  # Gemma 1's name of the field; Gemma 3 reads hidden_activation
            f.require("hidden_act", lambda v: v in (None, "gelu_pytorch_tanh"), "'gelu_pytorch_tanh'")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            f.require(key, lambda v: v is None, "null (no soft-capping)")
        f.require("use_bidirectional_attention", lambda v: not v, "false (causal attention)")
        extra["query_pre_attn_scalar"] = float(f.get("query_pre_attn_scalar"))
    else:
        f.require("hidden_act", lambda v: v == "silu", "'silu'")
    pattern = _attention_pattern(f, family, n)
    max_position = f.get("max_position_embeddings")
    rope = _rope(f, family, max_position, pattern.get("layer_types", ()))
    if family == "qwen2":
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        if family == "llama":
            f.require("pretraining_tp", lambda v: v == 1, "1")
        qkv_bias = out_bias = bool(f.get("attention_bias"))
        mlp_bias = bool(f.get("mlp_bias")) if family in ("llama", "smollm3") else False
    cfg = LLMConfig(
        family=family, vocab_size=f.get("vocab_size"), hidden_size=hidden, num_layers=n, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=f.get("intermediate_size"),
        rms_norm_eps=float(f.get("rms_norm_eps")), qkv_bias=qkv_bias, out_bias=out_bias,
        mlp_bias=mlp_bias, tie_embeddings=bool(f.get("tie_word_embeddings")),
        max_position_embeddings=max_position, initializer_range=f.get("initializer_range"), dtype=dtype,
        param_dtype=param_dtype, **rope, **pattern, **extra)
    # Inert: the sliding fields without use_sliding_window; SmolLM3's pretraining_tp (its config
    # carries 2; SmolLM3ForCausalLM never reads it).
    f.finish(ignore_fields, also_known=("sliding_window", "max_window_layers", "use_sliding_window",
                                        *(("pretraining_tp",) if family == "smollm3" else ())))
    return cfg


def vision_config_from_hf(hf: dict, *, source: str = "config.json", ignore_fields: Iterable[str] = (),
                          param_dtype: str = "float32", dtype: str = "float32",
                          select_layer: int = -1) -> VisionConfig:
    """Our `VisionConfig` for a SigLIP config (`SiglipVisionModel`, or a `SiglipModel` whose
    `vision_config` is read; the text tower is not imported). Strict like `llm_config_from_hf`:
    an unknown field, an activation other than gelu_pytorch_tanh or attention dropout raises
    `UnsupportedConfigError` naming it. `select_layer`: the encoder layer whose output feeds
    the projector (-1: the last; LLaVA / VILA use -2 with the post-LayerNorm skipped)."""
    arch = architecture_of(hf, source)
    if ARCHITECTURES[arch] != "siglip":
        raise UnsupportedConfigError(f"{source}: {arch} is not a SigLIP vision model")
    if arch == "SiglipModel":
        # Only the vision tower is imported; the text tower and contrastive head are not ours.
        top = _Fields(hf, {}, source)
        vision = top.get("vision_config")
        if vision is None:
            raise UnsupportedConfigError(f"{source}: SiglipModel config has no vision_config")
        top.finish(ignore_fields, also_known=("text_config", "initializer_factor"))
        hf, source = vision, f"{source}[vision_config]"
    f = _Fields(hf, HF_DEFAULTS["siglip"], source)
    f.require("hidden_act", lambda v: v == "gelu_pytorch_tanh", "'gelu_pytorch_tanh'")
    f.require("attention_dropout", lambda v: not v, "0.0 (no dropout)")
    cfg = VisionConfig(
        image_size=f.get("image_size"), patch_size=f.get("patch_size"),
        hidden_size=f.get("hidden_size"), num_layers=f.get("num_hidden_layers"),
        num_heads=f.get("num_attention_heads"), intermediate_size=f.get("intermediate_size"),
        num_channels=f.get("num_channels"), layer_norm_eps=float(f.get("layer_norm_eps")),
        use_head=bool(f.get("vision_use_head")), select_layer=select_layer, dtype=dtype,
        param_dtype=param_dtype)
    f.finish(ignore_fields)
    return cfg
