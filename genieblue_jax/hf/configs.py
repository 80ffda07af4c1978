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

from genieblue_jax.models.configs import LLMConfig, VisionConfig


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
    "num_labels",
})

# Hugging Face class defaults (transformers' Qwen2Config / LlamaConfig / SiglipVisionConfig).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                  max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False,
                  attention_dropout=0.0),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                  max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                  attention_dropout=0.0, mlp_bias=False, head_dim=None, pretraining_tp=1),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
                   vision_use_head=True),
}

ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
    "SiglipVisionModel": "siglip", "SiglipModel": "siglip",
}
_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                "siglip_vision_model": "SiglipVisionModel", "siglip": "SiglipModel"}


def architecture_of(hf: dict, source: str) -> str:
    """The HF architecture name of a config dict, checked against what we support."""
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf["model_type"]]]
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
        self.used.add(key)
        return self.values.get(key)

    def require(self, key: str, ok: Callable[[Any], bool], supported: str):
        value = self.get(key)
        if not ok(value):
            raise UnsupportedConfigError(
                f"{self.source}: config field {key}={value!r} is not supported (supported: {supported})")
        return value

    def finish(self, ignore_fields: Iterable[str], also_known: Iterable[str] = ()):
        leftover = sorted(set(self.values) - self.used - METADATA_FIELDS - set(also_known)
                          - set(ignore_fields))
        if leftover:
            raise UnsupportedConfigError(
                f"{self.source}: config field(s) {leftover} are not supported by genieblue_jax; if "
                "they are harmless for this model, waive them with ignore_fields / --ignore_config_field")


def _rope_theta(f: _Fields) -> float:
    """rope_theta from either the classic top-level field or transformers>=5 `rope_parameters`."""
    f.require("rope_scaling", lambda v: v is None or v.get("rope_type", v.get("type")) == "default",
              "null (no RoPE scaling)")
    params = f.get("rope_parameters")
    if params is not None:
        f.require("rope_parameters", lambda v: v.get("rope_type", "default") == "default"
                  and set(v) <= {"rope_type", "rope_theta"}, "{'rope_type': 'default', 'rope_theta': ...}")
        if "rope_theta" in params:
            f.get("rope_theta")
            return float(params["rope_theta"])
    return float(f.get("rope_theta"))


def llm_config_from_hf(hf: dict, *, source: str = "config.json", ignore_fields: Iterable[str] = (),
                       param_dtype: str = "float32", dtype: str = "float32") -> LLMConfig:
    """Our `LLMConfig` for a transformers decoder config (`Qwen2ForCausalLM` /
    `LlamaForCausalLM` config.json as a dict; `source` names it in errors).

    Strict: every field is read or known to be inert (metadata, `ignore_fields`); a field
    that changes the computation in a way we do not implement (sliding windows, RoPE scaling,
    dropout, a non-SiLU activation, Llama's `pretraining_tp` != 1) or that we do not know
    raises `UnsupportedConfigError` naming the field and the file, instead of importing a
    model that computes something else. Qwen2 always has q/k/v biases; Llama has
    `attention_bias` / `mlp_bias`. `rope_theta` may come from transformers 5's
    `rope_parameters`. `param_dtype` / `dtype`: storage / compute dtype names ("float32",
    "bfloat16")."""
    arch = architecture_of(hf, source)
    family = ARCHITECTURES[arch]
    if family not in ("qwen2", "llama"):
        raise UnsupportedConfigError(f"{source}: {arch} is not a decoder LLM")
    f = _Fields(hf, HF_DEFAULTS[family], source)
    hidden, heads = f.get("hidden_size"), f.get("num_attention_heads")
    kv_heads = f.get("num_key_value_heads") or heads
    head_dim = f.get("head_dim") or hidden // heads
    f.require("hidden_act", lambda v: v == "silu", "'silu'")
    f.require("attention_dropout", lambda v: not v, "0.0 (no dropout)")
    theta = _rope_theta(f)
    if family == "qwen2":
        f.require("use_sliding_window", lambda v: not v, "false")
        f.require("layer_types", lambda v: v is None or set(v) == {"full_attention"},
                  "all 'full_attention'")
        f.get("sliding_window"), f.get("max_window_layers")  # inert without use_sliding_window
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        f.require("pretraining_tp", lambda v: v == 1, "1")
        qkv_bias = out_bias = bool(f.get("attention_bias"))
        mlp_bias = bool(f.get("mlp_bias"))
    cfg = LLMConfig(
        family=family, vocab_size=f.get("vocab_size"), hidden_size=hidden,
        num_layers=f.get("num_hidden_layers"), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=f.get("intermediate_size"), rope_theta=theta,
        rms_norm_eps=float(f.get("rms_norm_eps")), qkv_bias=qkv_bias, out_bias=out_bias,
        mlp_bias=mlp_bias, tie_embeddings=bool(f.get("tie_word_embeddings")),
        max_position_embeddings=f.get("max_position_embeddings"),
        initializer_range=f.get("initializer_range"), dtype=dtype, param_dtype=param_dtype)
    f.finish(ignore_fields)
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
