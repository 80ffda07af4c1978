"""Decoder-only LLM (Qwen2 / Qwen2.5 and Llama families) in Flax linen.

Parameter tree (names chosen so that `genieblue_jax.hf.tables` maps them 1:1 to
Hugging Face's `model.*` names):

    embed_tokens/embedding                       (vocab, hidden)
    layers_{i}/input_layernorm/scale             (hidden,)
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel   (in, out)   [+ bias if configured]
    layers_{i}/post_attention_layernorm/scale
    layers_{i}/mlp/{gate,up,down}_proj/kernel
    norm/scale
    lm_head/kernel                               (hidden, vocab), only when untied

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
     "index": () int32}                            next slot to write; all rows advance together

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

import flax.linen as nn
import jax
import jax.numpy as jnp

from genieblue_jax.models.attention import attend_two_parts, causal_attention
from genieblue_jax.models.configs import LLMConfig
from genieblue_jax.models.layers import dense, shard_batch
from genieblue_jax.models.lora import LoRADense, LoRASpec
from genieblue_jax.models.masks import cached_causal_segment_mask, causal_segment_mask
from genieblue_jax.models.scan import run_scanned, stacked_names


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face's Qwen2RMSNorm / LlamaRMSNorm."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def apply_rope(x, positions, theta: float):
    """Rotary embedding in the "rotate half" layout used by Qwen2 and Llama on HF.

    x: (batch, seq, heads, head_dim); positions: (batch, seq). Angles in float32.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (b, t, d/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


LAYER_KINDS = ("base", "lora", "expert")


def _proj(cfg: LLMConfig, features: int, name: str, use_bias: bool, lora: LoRASpec | None):
    if lora is not None and name in lora.targets:
        return LoRADense(features, use_bias, lora, cfg.compute_dtype, cfg.params_dtype,
                         nn.initializers.normal(cfg.initializer_range), name=name)
    return dense(cfg, features, name, use_bias=use_bias)


def _route(is_image, text_out, image_out):
    """Per-token choice between the original (text) and visual-expert (image) outputs."""
    return jnp.where(is_image[..., None], image_out, text_out)


def init_kv_cache(cfg: LLMConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache of `length` slots for `batch` rows (see the module docstring):
    zeros, every slot segment 0, index 0. `dtype` defaults to the compute dtype.

        >>> from genieblue_jax.models import get_preset
        >>> cache = init_kv_cache(get_preset("tiny-qwen2"), batch=2, length=8)
        >>> len(cache["k"]), cache["k"][0].shape, cache["v"][0].shape, cache["segment_ids"].shape
        (4, (2, 2, 16, 8), (2, 2, 8, 16), (2, 8))
    """
    dtype = cfg.compute_dtype if dtype is None else dtype
    zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return {"k": zeros((batch, cfg.num_kv_heads, cfg.head_dim, length)),   # keys transposed: q k^T
            "v": zeros((batch, cfg.num_kv_heads, length, cfg.head_dim)),   # is a plain matmul
            "segment_ids": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


class Attention(nn.Module):
    """GQA self-attention. Without a cache, `mask` is the rows' segment_ids (b, t): causal
    attention within segments (`attention.causal_attention`, the backend's fused kernel).
    With `kv_cache` = (keys (b, K, d, S), values (b, K, S, d)) of this layer, `mask` is
    (mask_cached (b, t, S), mask_new (b, t, t)): the new keys / values are written at slots
    [cache_index, cache_index + t), the queries attend over all S slots, and the call
    returns (output, (k, v) updated)."""

    cfg: LLMConfig
    lora: LoRASpec | None = None
    expert: bool = False

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
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if kv_cache is not None:
            # The cached slots and the t new tokens are attended as two parts, so the cache is
            # only read here and the in-place write of the new slots has a single user (XLA:CPU
            # otherwise copies each layer's whole cache to feed the update into the matmul).
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, K, t, d)
            mask_cached, mask_new = mask
            out = attend_two_parts(q, kv_cache, (k, v), mask_cached, mask_new, cfg.compute_dtype)
            k = k.transpose(0, 1, 3, 2)  # the cache keeps keys as (b, K, d, S)
            # ... and the write is ordered after that read by a data dependency: XLA:CPU runs
            # independent ops concurrently, so without one it copies the whole cache to protect
            # the read. `x > inf` is False for every float, NaN included: the index is unchanged.
            after_read = (out[0, 0, 0] > jnp.inf).astype(jnp.int32)
            slot = cache_index + after_read
            kv_cache = (jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), (0, 0, 0, slot)),
                        jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), (0, 0, slot, 0)))
        else:
            out = causal_attention(q, k, v, mask, cfg.compute_dtype, cfg.attention_chunk, cfg.attention_impl)
        text_out = _proj(cfg, cfg.hidden_size, "o_proj", cfg.out_bias, self.lora)(out)
        if self.expert:
            vision_o = dense(cfg, cfg.hidden_size, "vision_o_proj", use_bias=cfg.out_bias)
            text_out = _route(is_image, text_out, vision_o(out))
        return text_out if kv_cache is None else (text_out, kv_cache)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); with `expert`, a second SwiGLU for image tokens."""

    cfg: LLMConfig
    lora: LoRASpec | None = None
    expert: bool = False

    @nn.compact
    def __call__(self, x, is_image=None):
        cfg = self.cfg

        def swiglu(prefix, lora):
            gate = _proj(cfg, cfg.intermediate_size, f"{prefix}gate_proj", cfg.mlp_bias, lora)(x)
            up = _proj(cfg, cfg.intermediate_size, f"{prefix}up_proj", cfg.mlp_bias, lora)(x)
            return _proj(cfg, cfg.hidden_size, f"{prefix}down_proj", cfg.mlp_bias, lora)(nn.silu(gate) * up)

        out = swiglu("", self.lora)
        return _route(is_image, out, swiglu("vision_", None)) if self.expert else out


class DecoderBlock(nn.Module):
    """One pre-norm decoder block (RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU MLP), as
    `Qwen2DecoderLayer` / `LlamaDecoderLayer`. `kind`: "base" (plain), "lora" (LoRA adapters on
    `lora.targets`) or "expert" (CogVLM-style visual-expert projections routed by token type)."""
    cfg: LLMConfig
    kind: str = "base"
    lora: LoRASpec | None = None

    @nn.compact
    def __call__(self, x, positions, mask, is_image=None, kv_cache=None, cache_index=None):
        """x (b, t, hidden) -> x; with `kv_cache` (this layer's (k, v)) -> (x, updated (k, v))."""
        cfg = self.cfg
        lora = self.lora if self.kind == "lora" else None
        expert = self.kind == "expert"
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)
        attn = Attention(cfg, lora, expert, name="self_attn")(norm("input_layernorm")(x), positions, mask, is_image,
                                                                kv_cache, cache_index)
        if kv_cache is not None:
            attn, kv_cache = attn
        x = x + attn
        x = x + MLP(cfg, lora, expert, name="mlp")(norm("post_attention_layernorm")(x), is_image)
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
        self.layers = [block(cfg, kind, self.lora, name=f"layers_{i}") for i, kind in enumerate(kinds)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = dense(cfg, cfg.vocab_size, "lm_head", use_bias=False)

    def embed(self, tokens):
        """Token embeddings: int (b, t) -> (b, t, hidden) in the compute dtype."""
        return self.embed_tokens(tokens)

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
                block = DecoderBlock(self.cfg, kinds[i], self.lora, parent=None)  # a pure function
                return block.apply({"params": p}, h, positions, mask, is_image)

            x = run_scanned(apply_layer, params, kinds, x, remat=self.cfg.remat)
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
        mask = (mask_cached, causal_segment_mask(segment_ids))
        segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index))
        if len(cache["k"]) != len(self.layers):
            raise ValueError(f"cache has {len(cache['k'])} layers, the model {len(self.layers)}")
        ks, vs = [], []
        for layer, k, v in zip(self.layers, cache["k"], cache["v"]):
            x, (k, v) = layer(x, positions, mask, is_image, (k, v), index)
            x = shard_batch(x)
            ks.append(k)
            vs.append(v)
        new_cache = {"k": tuple(ks), "v": tuple(vs), "segment_ids": segments, "index": index + t}
        return self.norm(x), new_cache

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
