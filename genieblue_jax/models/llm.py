"""Decoder-only LLM (Qwen2 / Qwen2.5, Llama 3, Qwen3, Gemma 3 text, SmolLM3) in Flax linen.

Parameter tree (names chosen so that `genieblue_jax.hf.tables` maps them 1:1 to
Hugging Face's `model.*` names):

    embed_tokens/embedding                       (vocab, hidden)
    layers_{i}/input_layernorm/scale             (hidden,)
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel   (in, out)   [+ bias if configured]
    layers_{i}/self_attn/{q,k}_norm/scale        (head_dim,)  Qwen3, Gemma 3
    layers_{i}/post_attention_layernorm/scale
    layers_{i}/pre_feedforward_layernorm/scale   Gemma 3 (and post_feedforward_layernorm)
    layers_{i}/mlp/{gate,up,down}_proj/kernel
    norm/scale
    lm_head/kernel                               (hidden, vocab), only when untied

A block, as transformers writes each family (`LLMConfig` says which):

    Qwen2 / Llama / Qwen3 / SmolLM3   x += attn(norm_in(x));  x += mlp(norm_post_attn(x))
    Gemma 3                           x += norm_post_attn(attn(norm_in(x)));
                                      x += norm_post_ff(mlp(norm_pre_ff(x)))

Gemma 3's norms scale by `1 + weight` (`RMSNorm(unit_offset=True)`), its MLP is GeGLU with
tanh GELU and its embeddings are multiplied by sqrt(hidden_size) (image features written
into the sequence replace those scaled embeddings, as transformers' Gemma 3 places them).
Per layer (`LLMConfig.layer_type`, `rope_for`): full or sliding-window attention, and which
RoPE (Llama 3's scaled frequencies, Gemma 3's two bases, SmolLM3's NoPE layers: none).

Inputs always carry explicit `positions` and `segment_ids` (see `masks.py`), so packed
rows never attend across samples and padding is just segment 0.

`layer_kinds` turns the same module into a GenieBlue / CogVLM multimodal decoder (one kind
per layer; `None` = all "base", the plain LLM):
- "base":   a plain block (also used for replicated blocks, whose weights come from the branch);
- "lora":   LoRA on `lora.targets` (extra leaves `lora_a`, `lora_b` next to each `kernel`);
- "expert": CogVLM visual expert: `vision_{q,k,v,o,gate,up,down}_proj` weights used for image
            tokens (`token_types == 1`), the original weights for text; attention is joint.

KV cache (generation, `genieblue_jax.inference`): `DecoderLM.__call__(..., cache=cache)`
takes and returns a cache pytree (functional; no flax mutable collections), see
`init_kv_cache`:

    {"k": L x (b, K, d, S), "v": L x (b, K, S, d), keys (after RoPE, transposed) / values: one
                                                   array per layer, laid out as attention reads them
     "segment_ids": (b, S) int32,                  segment of each slot (0 = padding / unwritten)
     "ring_segment_ids": (b, R) int32,             sliding-window models only (below)
     "index": () int32}                            next slot to write; all rows advance together

A sliding-window layer keeps only its window: its arrays have R = min(sliding_window, S)
slots, a ring where absolute slot s lives at s % R (`masks.ring_slot_index`), with the ring's
segment ids in "ring_segment_ids" (every sliding layer has the same window); its queries see
a ring slot within the window and their segment (`masks.ring_cache_mask`). Gemma 3 1B's 22
sliding layers then hold 512 slots each, whatever the context.

A call with t new tokens attends over the S cached slots and the t new tokens under one
softmax (query slot q = index + i sees cached slot s iff s <= q and the segments agree,
`masks.cached_causal_segment_mask`; among the new tokens, `causal_segment_mask`), then
writes their keys, values and `segment_ids` at slots [index, index + t). Left-padding
slots (segment 0) are invisible to real tokens and unwritten slots lie in the future.
RoPE positions stay explicit per token (`positions` (b, t)). Reading first and writing
after keeps the write in place when the cache is donated (see `Attention`). The cache path
runs the blocks unrolled with unchunked attention (`attention_chunk` / `scan_layers` apply
to the no-cache path only); with no cache nothing changes (same parameters, same numerics).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genieblue_jax.models.attention import attend_two_parts, causal_attention
from genieblue_jax.models.configs import LLMConfig
from genieblue_jax.models.layers import dense, shard_batch
from genieblue_jax.models.lora import LoRADense, LoRASpec
from genieblue_jax.models.masks import cached_causal_segment_mask, causal_segment_mask, ring_cache_mask
from genieblue_jax.models.scan import run_scanned, stacked_names


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face's Qwen2RMSNorm / LlamaRMSNorm (the
    normalised input cast to the compute dtype, times the weight); with `unit_offset`, as
    Gemma3RMSNorm (times `1 + weight` in float32, then cast; the weight starts at 0)."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_inv_freq(cfg: LLMConfig, layer: int, xp=jnp):
    """Layer `layer`'s RoPE inverse frequencies (head_dim / 2,) float32, None for a NoPE
    layer: transformers' `ROPE_INIT_FUNCTIONS` for rope_type "default", "linear" (divided by
    the factor) and "llama3" (`_compute_llama3_parameters`: wavelengths longer than
    original_max_position / low_freq_factor divided by the factor, shorter than
    original_max_position / high_freq_factor kept, smoothly interpolated between). `xp` is
    jax.numpy (the model, traced) or numpy (the QNN export's cos / sin tables).

        >>> import numpy as np
        >>> from genieblue_jax.models import get_preset
        >>> cfg = get_preset("llama-3.2-1b")
        >>> f = rope_inv_freq(cfg, 0, np)
        >>> f.dtype, f.shape, float(f[0]), round(float(f[-1] * 32 / 5e5 ** (-62 / 64)), 6)
        (dtype('float32'), (32,), 1.0, 1.0)
    """
    rope = cfg.rope_for(layer)
    if rope is None:
        return None
    theta, kind, factor = rope
    d = cfg.head_dim
    inv_freq = 1.0 / (theta ** (xp.arange(0, d, 2, dtype=xp.float32) / d))
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "llama3":
        low, high, original = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = xp.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) & ~(wavelen > original / low)
        inv_freq = xp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x, positions, inv_freq):
    """Rotary embedding in the "rotate half" layout used by every family on HF.

    x: (batch, seq, heads, head_dim); positions: (batch, seq); inv_freq (head_dim / 2,)
    (`rope_inv_freq`). Angles in float32.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (b, t, d/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


LAYER_KINDS = ("base", "lora", "expert")


def scan_signatures(cfg: LLMConfig, kinds: Sequence[str]) -> tuple:
    """What must agree between layers for one scan loop body to run them (`models.scan`):
    the layer kind, its attention type and its RoPE. Gemma 3's 5:1 sliding / full pattern
    then repeats with period lcm(kind period, 6), or the layers run as runs of equal
    signatures.

        >>> from genieblue_jax.models import get_preset
        >>> scan_signatures(get_preset("smollm3-3b"), ("base",) * 36)[2:4]
        (('base', 'full_attention', True), ('base', 'full_attention', False))
    """
    return tuple((kind, cfg.layer_type(i), cfg.rope_for(i) is not None) for i, kind in enumerate(kinds))


def _proj(cfg: LLMConfig, features: int, name: str, use_bias: bool, lora: LoRASpec | None):
    if lora is not None and name in lora.targets:
        return LoRADense(features, use_bias, lora, cfg.compute_dtype, cfg.params_dtype,
                         nn.initializers.normal(cfg.initializer_range), name=name)
    return dense(cfg, features, name, use_bias=use_bias)


def _norm(cfg: LLMConfig, name: str | None = None) -> RMSNorm:
    """The family's RMSNorm (`name` None inside `setup`, where the attribute names it)."""
    return RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, cfg.gemma_block, name=name)


def _route(is_image, text_out, image_out):
    """Per-token choice between the original (text) and visual-expert (image) outputs."""
    return jnp.where(is_image[..., None], image_out, text_out)


def init_kv_cache(cfg: LLMConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache of `length` slots for `batch` rows (see the module docstring):
    zeros, every slot segment 0, index 0; sliding-window layers get rings of
    min(sliding_window, length) slots. `dtype` defaults to the compute dtype.

        >>> from genieblue_jax.models import get_preset
        >>> cache = init_kv_cache(get_preset("tiny-qwen2"), batch=2, length=8)
        >>> len(cache["k"]), cache["k"][0].shape, cache["v"][0].shape, cache["segment_ids"].shape
        (4, (2, 2, 16, 8), (2, 2, 8, 16), (2, 8))
        >>> cfg = get_preset("gemma-3-1b").replace(num_layers=6, layer_types=("sliding_attention",) * 5
        ...                                        + ("full_attention",))
        >>> cache = init_kv_cache(cfg, batch=1, length=2048)
        >>> cache["k"][0].shape, cache["k"][5].shape, cache["ring_segment_ids"].shape
        ((1, 1, 256, 512), (1, 1, 256, 2048), (1, 512))
    """
    dtype = cfg.compute_dtype if dtype is None else dtype
    slots = [length if cfg.window(i) is None else min(cfg.window(i), length) for i in range(cfg.num_layers)]
    cache = {"k": tuple(jnp.zeros((batch, cfg.num_kv_heads, cfg.head_dim, s), dtype) for s in slots),  # keys
             "v": tuple(jnp.zeros((batch, cfg.num_kv_heads, s, cfg.head_dim), dtype) for s in slots),  # transposed
             "segment_ids": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}
    if cfg.sliding_window and "sliding_attention" in cfg.layer_types:
        cache["ring_segment_ids"] = jnp.zeros((batch, min(cfg.sliding_window, length)), jnp.int32)
    return cache


def ring_write_slots(index, t: int, ring: int):
    """(first new token kept, ring slots) for t new tokens at absolute slots index ..
    index + t - 1 written into a ring of `ring` slots: the last min(t, ring) tokens, at their
    absolute slot modulo `ring` (distinct slots)."""
    kept = min(t, ring)
    return t - kept, jnp.mod(index + (t - kept) + jnp.arange(kept, dtype=jnp.int32), ring)


class Attention(nn.Module):
    """GQA self-attention of layer `layer` (its window and RoPE come from the config).
    Without a cache, `mask` is the rows' segment_ids (b, t): causal attention within
    segments (`attention.causal_attention`, the backend's fused kernel). With `kv_cache` =
    (keys (b, K, d, S), values (b, K, S, d)) of this layer, `mask` is (mask_cached (b, t, S),
    mask_new (b, t, t)): the new keys / values are written at slots [cache_index,
    cache_index + t) (a sliding layer: at those slots modulo its ring, the last ring-size
    tokens only), the queries attend over all cached slots, and the call returns (output,
    (k, v) updated)."""

    cfg: LLMConfig
    lora: LoRASpec | None = None
    expert: bool = False
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, mask, is_image=None, kv_cache=None, cache_index=None):
        cfg = self.cfg
        b, t, _ = x.shape
        sizes = {"q": cfg.num_heads * cfg.head_dim, "k": cfg.num_kv_heads * cfg.head_dim,
                 "v": cfg.num_kv_heads * cfg.head_dim}
        q, k, v = (_proj(cfg, sizes[n], f"{n}_proj", cfg.qkv_bias, self.lora)(x) for n in "qkv")
        if self.expert:
            q, k, v = (_route(is_image, out, dense(cfg, sizes[n], f"vision_{n}_proj", use_bias=cfg.qkv_bias)(x))
                       for n, out in zip("qkv", (q, k, v)))
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:  # per head, before RoPE (Qwen3Attention / Gemma3Attention)
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        inv_freq = rope_inv_freq(cfg, self.layer)
        if inv_freq is not None:
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        window, scale = cfg.window(self.layer), cfg.attention_scale
        if kv_cache is not None:
            # The cached slots and the t new tokens are attended as two parts, so the cache is
            # only read here and the in-place write of the new slots has a single user (XLA:CPU
            # otherwise copies each layer's whole cache to feed the update into the matmul).
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, K, t, d)
            mask_cached, mask_new = mask
            out = attend_two_parts(q, kv_cache, (k, v), mask_cached, mask_new, cfg.compute_dtype, scale)
            k = k.transpose(0, 1, 3, 2)  # the cache keeps keys as (b, K, d, S)
            # ... and the write is ordered after that read by a data dependency: XLA:CPU runs
            # independent ops concurrently, so without one it copies the whole cache to protect
            # the read. `x > inf` is False for every float, NaN included: the index is unchanged.
            after_read = (out[0, 0, 0] > jnp.inf).astype(jnp.int32)
            slot = cache_index + after_read
            keys, values = kv_cache
            if window is not None:
                slot = slot % keys.shape[-1]  # a ring: absolute slot s lives at s % ring
            if window is not None and t > 1:  # may wrap around the ring: a scatter
                first, slots = ring_write_slots(slot, t, keys.shape[-1])
                kv_cache = (keys.at[..., slots].set(k[..., first:].astype(keys.dtype), unique_indices=True),
                            values.at[:, :, slots].set(v[:, :, first:].astype(values.dtype), unique_indices=True))
            else:
                kv_cache = (jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, 0, 0, slot)),
                            jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, 0, slot, 0)))
        else:
            out = causal_attention(q, k, v, mask, cfg.compute_dtype, cfg.attention_chunk, cfg.attention_impl,
                                   scale=scale, window=window)
        text_out = _proj(cfg, cfg.hidden_size, "o_proj", cfg.out_bias, self.lora)(out)
        if self.expert:
            vision_o = dense(cfg, cfg.hidden_size, "vision_o_proj", use_bias=cfg.out_bias)
            text_out = _route(is_image, text_out, vision_o(out))
        return text_out if kv_cache is None else (text_out, kv_cache)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (GeGLU with tanh GELU for Gemma 3); with `expert`,
    a second one for image tokens."""

    cfg: LLMConfig
    lora: LoRASpec | None = None
    expert: bool = False

    @nn.compact
    def __call__(self, x, is_image=None):
        cfg = self.cfg
        act = (lambda h: jax.nn.gelu(h, approximate=True)) if cfg.gemma_block else nn.silu

        def glu(prefix, lora):
            gate = _proj(cfg, cfg.intermediate_size, f"{prefix}gate_proj", cfg.mlp_bias, lora)(x)
            up = _proj(cfg, cfg.intermediate_size, f"{prefix}up_proj", cfg.mlp_bias, lora)(x)
            return _proj(cfg, cfg.hidden_size, f"{prefix}down_proj", cfg.mlp_bias, lora)(act(gate) * up)

        out = glu("", self.lora)
        return _route(is_image, out, glu("vision_", None)) if self.expert else out


class DecoderBlock(nn.Module):
    """Decoder block `layer` (module docstring: the family's norms around attention and MLP),
    as transformers' `Qwen2DecoderLayer` / `LlamaDecoderLayer` / `Qwen3DecoderLayer` /
    `Gemma3DecoderLayer` / `SmolLM3DecoderLayer`. `kind`: "base" (plain), "lora" (LoRA
    adapters on `lora.targets`) or "expert" (CogVLM-style visual-expert projections routed
    by token type)."""
    cfg: LLMConfig
    kind: str = "base"
    lora: LoRASpec | None = None
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, mask, is_image=None, kv_cache=None, cache_index=None):
        """x (b, t, hidden) -> x; with `kv_cache` (this layer's (k, v)) -> (x, updated (k, v))."""
        cfg = self.cfg
        lora = self.lora if self.kind == "lora" else None
        expert = self.kind == "expert"
        norm = lambda name: _norm(cfg, name)
        attn = Attention(cfg, lora, expert, self.layer, name="self_attn")(
            norm("input_layernorm")(x), positions, mask, is_image, kv_cache, cache_index)
        if kv_cache is not None:
            attn, kv_cache = attn
        mlp = MLP(cfg, lora, expert, name="mlp")
        if cfg.gemma_block:
            x = x + norm("post_attention_layernorm")(attn)
            x = x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x), is_image))
        else:
            x = x + attn
            x = x + mlp(norm("post_attention_layernorm")(x), is_image)
        return x if kv_cache is None else (x, kv_cache)


class DecoderLM(nn.Module):
    """Causal LM. `__call__(tokens, positions, segment_ids)` -> float32 logits
    (batch, seq, vocab). `inputs_embeds` may replace the token lookup (multimodal inputs);
    `token_types` (1 = image token) routes CogVLM expert layers. With `cache=` (see
    `init_kv_cache`) it returns `(logits, new_cache)`: the tokens are the next t slots of
    each row's cached sequence (module docstring)."""

    cfg: LLMConfig
    layer_kinds: tuple[str, ...] | None = None
    lora: LoRASpec | None = None

    def setup(self):
        """Builds embedding, blocks (one per `layer_kinds` entry), final norm and head; ValueError
        when the layer kinds do not fit the config."""
        cfg = self.cfg
        kinds = self.layer_kinds or ("base",) * cfg.num_layers
        if len(kinds) != cfg.num_layers or set(kinds) - set(LAYER_KINDS):
            raise ValueError(f"layer_kinds must give one of {LAYER_KINDS} for each of the "
                             f"{cfg.num_layers} layers, got {kinds}")
        if "lora" in kinds and self.lora is None:
            raise ValueError("layer_kinds has 'lora' layers but no LoRASpec was given")
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            embedding_init=nn.initializers.normal(cfg.initializer_range))
        block = nn.remat(DecoderBlock) if cfg.remat else DecoderBlock  # same parameter names either way
        self.layers = [block(cfg, kind, self.lora, i, name=f"layers_{i}") for i, kind in enumerate(kinds)]
        self.norm = _norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = dense(cfg, cfg.vocab_size, "lm_head", use_bias=False)

    def embed(self, tokens):
        """Token embeddings: int (b, t) -> (b, t, hidden) in the compute dtype (Gemma 3: times
        sqrt(hidden_size), rounded to that dtype first, as `Gemma3TextScaledWordEmbedding`)."""
        x = self.embed_tokens(tokens)
        if self.cfg.gemma_block:
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, jnp.float32).astype(x.dtype)
        return x

    def hidden_states(self, x, positions, segment_ids, token_types=None, cache=None, fresh_cache: bool = False):
        """Runs the blocks and the final norm on input embeddings x: (b, t, hidden).

        With `cache` returns (hidden, new_cache): the t tokens go to slots
        [index, index + t) and attend over every cached slot (unrolled blocks, unchunked
        attention; `scan_layers` / `attention_chunk` are not used on this path)."""
        is_image = None if token_types is None else token_types == 1
        if is_image is None and self.layer_kinds and "expert" in self.layer_kinds:
            is_image = jnp.zeros(segment_ids.shape, bool)
        x = shard_batch(x)
        if cache is not None:
            return self._cached_hidden_states(x, positions, segment_ids, is_image, cache, fresh_cache)
        mask = segment_ids  # what a block's attention takes without a cache (`Attention`)
        if self.cfg.scan_layers and not self.is_initializing():
            kinds = self.layer_kinds or ("base",) * self.cfg.num_layers
            params = self.variables["params"]

            def apply_layer(i, p, h):
                block = DecoderBlock(self.cfg, kinds[i], self.lora, i, parent=None)  # a pure function
                return block.apply({"params": p}, h, positions, mask, is_image)

            x = run_scanned(apply_layer, params, scan_signatures(self.cfg, kinds), x, remat=self.cfg.remat)
        else:
            self._check_named_layout()
            for layer in self.layers:
                x = shard_batch(layer(x, positions, mask, is_image))
        return self.norm(x)

    def _check_named_layout(self):
        stacked = stacked_names(self.variables.get("params", {}))
        if stacked:
            raise ValueError(f"parameters {stacked} are in the stacked layout, which only scan loops read "
                             "(scan_layers=True, no cache); convert with models.scan.unstack_layers")

    def _cached_hidden_states(self, x, positions, segment_ids, is_image, cache, fresh_cache):
        self._check_named_layout()
        index = jnp.asarray(cache["index"], jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        t = segment_ids.shape[1]
        # Cached slots: the old segment ids (the new tokens' slots are still 0 there, i.e. hidden).
        mask_cached = None if fresh_cache else cached_causal_segment_mask(segment_ids, cache["segment_ids"], index)
        masks = {None: (mask_cached, causal_segment_mask(segment_ids))}
        new_cache = {"segment_ids": jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index)),
                     "index": index + t}
        if "ring_segment_ids" in cache:  # sliding layers: their ring of the last `window` slots
            ring, window = cache["ring_segment_ids"], self.cfg.sliding_window
            masks[window] = (None if fresh_cache else ring_cache_mask(segment_ids, ring, index, window),
                             causal_segment_mask(segment_ids, window))
            first, slots = ring_write_slots(index, t, ring.shape[-1])
            new_cache["ring_segment_ids"] = ring.at[:, slots].set(segment_ids[:, first:], unique_indices=True)
        if len(cache["k"]) != len(self.layers):
            raise ValueError(f"cache has {len(cache['k'])} layers, the model {len(self.layers)}")
        ks, vs = [], []
        for i, (layer, k, v) in enumerate(zip(self.layers, cache["k"], cache["v"])):
            x, (k, v) = layer(x, positions, masks[self.cfg.window(i)], is_image, (k, v), index)
            x = shard_batch(x)
            ks.append(k)
            vs.append(v)
        return self.norm(x), {"k": tuple(ks), "v": tuple(vs), **new_cache}

    def unembed(self, h):
        """Logits (b, t, vocab) float32 of final hidden states h (b, t, hidden): the tied
        embedding or `lm_head`."""
        if self.cfg.tie_embeddings:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens, positions, segment_ids, inputs_embeds=None, token_types=None,
                 return_hidden: bool = False, cache=None, fresh_cache: bool = False):
        """Float32 logits, or with `return_hidden` the final-norm hidden states (b, t, hidden),
        which `unembed` turns into logits (the trainer does it a chunk at a time).
        With `cache`: `(logits or hidden, new_cache)`; `fresh_cache=True` (static) promises the
        cache is empty (a first prefill), so the new tokens attend only among themselves."""
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds.astype(self.cfg.compute_dtype)
        if cache is None:
            h = self.hidden_states(x, positions, segment_ids, token_types)
            return h if return_hidden else self.unembed(h)
        h, cache = self.hidden_states(x, positions, segment_ids, token_types, cache=cache, fresh_cache=fresh_cache)
        return (h if return_hidden else self.unembed(h)), cache
