"""Tiny random transformers models of the LLM families beyond Qwen2 / Llama 2 (the parity
references of tests/models, tests/hf, tests/export): Llama 3.x with llama3 RoPE scaling,
Qwen3, Gemma 3 (text, and the language model inside a Gemma3ForConditionalGeneration) and
SmolLM3. Each config is used by these tests only, and exercises what makes its family
different at a size where a wrong choice shows in the logits:

    llama3        llama3 RoPE scaling with an original context of 64 tokens, so that the
                  head's 8 frequencies fall in all three bands (kept, smoothed, divided);
                  saved as transformers 5 writes it (`rope_parameters`)
    llama3-hub    another llama3 config, config.json rewritten in the hub's spelling
                  (`rope_theta` + `rope_scaling`), as meta-llama/Llama-3.2-1B publishes it
    qwen3         head_dim 24 != hidden / heads, q/k RMSNorm
    gemma3        a 6-token window on 3 of 4 layers, query_pre_attn_scalar 24 != head_dim 32,
                  linear RoPE x2 on the global layer, local base 1e4 on the sliding ones
    gemma3-vlm    a Gemma3ForConditionalGeneration whose language model is imported; its
                  config.json and weight names rewritten in the hub's spelling
                  (`language_model.model.*`, `rope_scaling`, `rope_local_base_freq`,
                  `sliding_window_pattern`), as google/gemma-3-4b-it publishes them
    smollm3       NoPE on every 2nd layer, a 5-token sliding window on the NoPE layers

Vocabularies are larger than the demo tokenizer's 512 pieces, so the tests can train each one
around the demo data. Every tensor is perturbed (norm weights away from their init, biases away from 0) so that a
swapped or transposed weight cannot hide.
"""
from __future__ import annotations

import json
import os

import torch
import transformers

_ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}

FAMILY_CONFIGS = {
    "llama3": (transformers.LlamaConfig, dict(
        vocab_size=600, hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=512, rope_parameters={**_ROPE_LLAMA3, "rope_theta": 500000.0})),
    "llama3-hub": (transformers.LlamaConfig, dict(
        vocab_size=610, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=3, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=512,
        rope_parameters={**_ROPE_LLAMA3, "factor": 32.0, "original_max_position_embeddings": 48,
                         "rope_theta": 500000.0})),
    "qwen3": (transformers.Qwen3Config, dict(
        vocab_size=620, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True, max_position_embeddings=256)),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        vocab_size=630, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        max_position_embeddings=512)),
    "smollm3": (transformers.SmolLM3Config, dict(
        vocab_size=650, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=5,
        rope_parameters={"rope_type": "default", "rope_theta": 2e6}, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
# Gemma3ForConditionalGeneration: a tiny SigLIP beside the gemma3-vlm language model.
GEMMA3_VLM_TEXT = dict(
    vocab_size=640, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, head_dim=24, query_pre_attn_scalar=24, sliding_window=4, sliding_window_pattern=3,
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    max_position_embeddings=512)
GEMMA3_VLM_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=28, patch_size=7)
NAMES = (*FAMILY_CONFIGS, "gemma3-vlm")


def _perturbed(model, scale: float):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def build(name: str, seed: int = 0, scale: float = 0.02, **overrides):
    """The random transformers model `name` (a causal LM; for gemma3-vlm the whole VLM), every
    tensor perturbed by N(0, scale) noise (0.2: weights of a pretrained scale, whose greedy
    continuations do not repeat one token); `overrides` change config fields (e.g. the
    vocabulary size of a test's tokenizer)."""
    torch.manual_seed(seed)
    if name == "gemma3-vlm":
        assert not overrides, overrides
        cfg = transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(**GEMMA3_VLM_TEXT).to_dict(),
            vision_config=transformers.SiglipVisionConfig(**GEMMA3_VLM_VISION).to_dict(), mm_tokens_per_image=4,
            image_token_index=GEMMA3_VLM_TEXT["vocab_size"] - 1)
        return _perturbed(transformers.Gemma3ForConditionalGeneration(cfg), scale)
    config_cls, fields = FAMILY_CONFIGS[name]
    fields = {**fields, **overrides}
    model_cls = {transformers.LlamaConfig: transformers.LlamaForCausalLM,
                 transformers.Qwen3Config: transformers.Qwen3ForCausalLM,
                 transformers.Gemma3TextConfig: transformers.Gemma3ForCausalLM,
                 transformers.SmolLM3Config: transformers.SmolLM3ForCausalLM}[config_cls]
    return _perturbed(model_cls(config_cls(**fields)), scale)


def save(name: str, path: str, scale: float = 0.02) -> str:
    """Saves model `build(name, scale=scale)` to `path` as transformers writes it, or in the
    hub's spelling for llama3-hub and gemma3-vlm (module docstring). Returns `path`."""
    model = build(name, scale=scale)
    model.save_pretrained(path, safe_serialization=True)
    if name == "llama3-hub":
        _rewrite_config(path, _hub_rope)
    elif name == "gemma3-vlm":
        _rewrite_config(path, _hub_gemma3_vlm)
        _rename_tensors(path, _hub_gemma3_vlm_name)
    return path


def _rewrite_config(path: str, change) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    change(cfg)
    with open(file, "w") as f:
        json.dump(cfg, f, indent=2)


def _hub_rope(cfg: dict) -> None:
    """transformers 5's `rope_parameters` -> the hub's `rope_theta` + `rope_scaling`."""
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope


def _hub_gemma3_vlm(cfg: dict) -> None:
    """A Gemma 3 VLM's text_config as google/gemma-3-4b-it writes it (transformers 4.50):
    rope_theta, rope_scaling of the global layers, rope_local_base_freq, sliding_window_pattern."""
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    text.pop("layer_types", None)
    text.pop("_sliding_window_pattern", None)
    text["rope_theta"] = rope["full_attention"]["rope_theta"]
    full = rope["full_attention"]
    text["rope_scaling"] = {"rope_type": full["rope_type"], "factor": full["factor"]}
    text["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    text["sliding_window_pattern"] = GEMMA3_VLM_TEXT["sliding_window_pattern"]


def _hub_gemma3_vlm_name(name: str) -> str:
    """transformers 5's tensor names of a Gemma 3 VLM -> the hub's (transformers 4.50)."""
    for new, old in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("lm_head.", "language_model.lm_head.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def _rename_tensors(path: str, rename) -> None:
    from safetensors.torch import load_file, save_file
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert files == ["model.safetensors"], files  # tiny models: one file
    tensors = load_file(os.path.join(path, files[0]))
    save_file({rename(n): t for n, t in tensors.items()}, os.path.join(path, files[0]), metadata={"format": "pt"})
