"""LLM attention: one entry point for causal self-attention over packed rows, dispatching on
the backend, and the XLA kernels it (and the KV-cache path) uses.

    causal_attention(q, k, v, segment_ids, dtype, chunk=0, impl="auto", scale=None, window=None)

`impl` ("auto" by default; `LLMConfig.attention_impl`):

    TPU   Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, the
          kernel MaxText uses): causal mask and segment ids inside the kernel, nothing of
          size (t, t) in HBM, fully masked blocks skipped; GQA as one multi-query kernel per
          KV head. Under a mesh it runs per device through `shard_map` (batch rows on the
          batch axes, heads on `tensor`). Rows whose length is not a multiple of 128 (the
          kernel's block) take the XLA path.
    GPU   `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention)
          with the causal-segment mask as its mask argument.
    CPU   the XLA path: einsums with queries in blocks of `chunk` (`xla_attention`).

The choice is made when the step is lowered (`jax.lax.platform_dependent`), so a step
compiled ahead of time for a TPU topology on a CPU machine (`tools.aot_memory`) gets the
splash kernel. "xla" forces the XLA path everywhere.

Shapes: q (b, t, H, d); k, v (b, t, K, d) with H = K * groups; segment_ids (b, t) int
(tokens of one packed sample share an id >= 1, padding 0); output (b, t, H * d) in `dtype`.
Softmax in float32 on every path. `scale` multiplies the scores (None: d ** -0.5; Gemma 3's
`query_pre_attn_scalar ** -0.5`); `window` makes it a sliding-window layer (query i sees keys
j with i - window < j <= i, `masks.sliding_window_mask`), on every path: splash's
`LocalMask`, the mask given to cuDNN, and key blocks before the window skipped on XLA. A
window never crosses a segment boundary: the segment mask still applies.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from genieblue_jax.models.layers import BATCH_AXES, batch_shards
from genieblue_jax.models.masks import causal_segment_mask, sliding_window_mask

IMPLEMENTATIONS = ("auto", "xla")
SPLASH_BLOCK = 128  # the splash kernel's smallest block: rows must be a multiple of it


def causal_attention(q, k, v, segment_ids, dtype, chunk: int = 0, impl: str = "auto", *,
                     scale: float | None = None, window: int | None = None):
    """Causal attention within segments (module docstring): the backend's fused kernel under
    "auto", the XLA path under "xla" or where the kernel does not apply."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={impl!r}; choose one of {IMPLEMENTATIONS}")
    xla = lambda q, k, v, s: xla_attention(q, k, v, s, dtype, chunk, scale=scale, window=window)
    if impl == "xla":
        return xla(q, k, v, segment_ids)
    branches = {"default": xla}
    if splash_applies(q, k):
        branches["tpu"] = lambda q, k, v, s: splash_attention(q, k, v, s, scale=scale, window=window).astype(
            dtype).reshape(*q.shape[:2], -1)
    if jax.default_backend() == "gpu":  # cuDNN's wrapper checks the CUDA install when traced
        branches["cuda"] = lambda q, k, v, s: cudnn_attention(q, k, v, s, dtype, scale=scale, window=window)
    if len(branches) == 1:
        return xla(q, k, v, segment_ids)
    return jax.lax.platform_dependent(q, k, v, segment_ids, **branches)


# ---------------------------------------------------------------------------------------------
# XLA
# ---------------------------------------------------------------------------------------------

def _scale(d: int, scale: float | None) -> float:
    return d ** -0.5 if scale is None else scale


def attend(q, k, v, mask, dtype, scale: float | None = None):
    """q (b, t, H, d); k, v (b, s, K, d); mask (b, t, s) -> (b, t, H * d); scores times
    `scale` (None: d ** -0.5)."""
    return attend_kv_major(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, dtype, scale)


def attend_kv_major(q, k, v, mask, dtype, scale: float | None = None):
    """q (b, t, H, d); k, v (b, K, s, d) (the KV cache's layout); mask (b, t, s) -> (b, t, H * d).

    The G = H / K query heads sharing a KV head are folded into the query rows, so both
    matmuls are plain batched (b, K) products with no transposes in between (XLA:CPU ran
    the 5-d einsum 1.5x slower)."""
    b, t, h, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = h // kv_heads
    q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, d)
    scores = jnp.einsum("bkrd,bksd->bkrs", q, k, preferred_element_type=jnp.float32) * _scale(d, scale)
    scores = jnp.where(mask[:, None, :, None, :], scores.reshape(b, kv_heads, t, g, s), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b, kv_heads, t * g, s)
    out = jnp.einsum("bkrs,bksd->bkrd", probs, v).reshape(b, kv_heads, t, g, d)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h * d)


def attend_two_parts(q, cached, new, mask_cached, mask_new, dtype, scale: float | None = None):
    """Attention over the KV cache's S slots and the t new tokens, one softmax over both.

    q (b, t, H, d); cached = (keys (b, K, d, S), values (b, K, S, d)) (the cache layout:
    keys transposed so that q k^T is a plain matmul over the cache); new = (k, v) each
    (b, K, t, d); mask_cached (b, t, S) (False for the slots the new tokens are about to
    take), mask_new (b, t, t); `mask_cached` None means an empty cache (a first prefill):
    only the new part. Scores times `scale` (None: d ** -0.5)."""
    if mask_cached is None:
        return attend_kv_major(q, new[0], new[1], mask_new, dtype, scale)
    b, t, h, d = q.shape
    kv_heads = cached[0].shape[1]
    g = h // kv_heads
    qf = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, d)

    def masked(scores, mask):
        scores = scores.reshape(b, kv_heads, t, g, scores.shape[-1]) * _scale(d, scale)
        return jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)

    s_cached = cached[0].shape[3]
    scores = jnp.concatenate([
        masked(jnp.einsum("bkrd,bkds->bkrs", qf, cached[0], preferred_element_type=jnp.float32), mask_cached),
        masked(jnp.einsum("bkrd,bksd->bkrs", qf, new[0], preferred_element_type=jnp.float32), mask_new)], -1)
    probs = jax.nn.softmax(scores, -1).astype(dtype).reshape(b, kv_heads, t * g, s_cached + t)
    out = (jnp.einsum("bkrs,bksd->bkrd", probs[..., :s_cached], cached[1])
           + jnp.einsum("bkrs,bksd->bkrd", probs[..., s_cached:], new[1]))
    return out.reshape(b, kv_heads, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h * d)


def _attend_block(q, k, v, segment_ids, lo: int, k_lo: int, dtype, scale, window):
    """Queries lo .. lo + q.shape[1] - 1 over keys k_lo .. k_lo + k.shape[1] - 1, mask built here."""
    t, s = q.shape[1], k.shape[1]
    queries, keys = jnp.arange(t) + lo, jnp.arange(s) + k_lo
    same = segment_ids[:, lo:lo + t, None] == segment_ids[:, None, k_lo:k_lo + s]
    causal = queries[:, None] >= keys[None, :]
    if window is not None:
        causal &= sliding_window_mask(queries, keys, window)
    return attend(q, k, v, same & causal[None], dtype, scale)


def xla_attention(q, k, v, segment_ids, dtype, chunk: int = 0, *, scale: float | None = None,
                  window: int | None = None):
    """Causal attention within segments in plain XLA ops.

    `chunk` > 0: queries run in blocks of `chunk`, and block i = queries [i*chunk,
    (i+1)*chunk) attends only keys [0, (i+1)*chunk): the keys after a block are masked for
    all of its queries (causal), so they are skipped, not computed. Each block (and its
    mask) is under `jax.checkpoint`, so the (t, s) scores (1 GB per 4096-token row in
    float32 for 16 heads) are never held whole, forward or backward. Example, t = 6,
    chunk = 2: blocks see key prefixes of 2, 4 and 6, i.e. 12 of the 36 query-key pairs are
    skipped. Same result as chunk = 0 to float rounding. With a sliding `window`, the keys
    before block i's window ([0, i*chunk - window + 1)) are skipped too: a long row's cost
    then grows linearly.
    """
    t = q.shape[1]
    if chunk <= 0 or chunk >= t:
        return attend(q, k, v, causal_segment_mask(segment_ids, window), dtype, scale)
    block = jax.checkpoint(_attend_block, static_argnums=(4, 5, 6, 7, 8))
    outs = []
    for lo in range(0, t, chunk):
        hi = min(lo + chunk, t)
        k_lo = 0 if window is None else max(0, lo - window + 1)
        outs.append(block(q[:, lo:hi], k[:, k_lo:hi], v[:, k_lo:hi], segment_ids, lo, k_lo, dtype, scale, window))
    return jnp.concatenate(outs, axis=1)


# ---------------------------------------------------------------------------------------------
# TPU: Pallas splash attention
# ---------------------------------------------------------------------------------------------

def splash_applies(q, k) -> bool:
    """Whether the splash kernel takes these shapes: self-attention over rows that are a
    multiple of its 128-token block."""
    return q.shape[1] == k.shape[1] and q.shape[1] % SPLASH_BLOCK == 0


def _splash_kernel(t: int, groups: int, interpret: bool, window: int | None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    block = math.gcd(t, 512)  # the largest of 128, 256, 512 that divides the row
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # A sliding window: keys [q - window + 1, q], the causal part included (LocalMask's (left, right)).
    head_mask = masks.CausalMask((t, t)) if window is None else masks.LocalMask((t, t), (window - 1, 0), 0)
    mask = masks.MultiHeadMask([head_mask] * groups)
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, segment_ids, interpret: bool, scale: float | None, window: int | None):
    """The kernel on one device's rows: q (b, t, H, d) -> (b, t, H, d)."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    kernel = _splash_kernel(t, g, interpret, window)
    # The kernel does not scale the scores: the queries are scaled first (float32 product).
    q = (q.astype(jnp.float32) * _scale(d, scale)).astype(q.dtype)
    q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4)        # (b, K, G, t, d)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)              # (b, K, t, d)
    segment_ids = segment_ids.astype(jnp.int32)

    def one_row(q, k, v, seg):  # q (K, G, t, d), k, v (K, t, d): one multi-query kernel per KV head
        ids = SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(one_row)(q, k, v, segment_ids)                        # (b, K, G, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def splash_attention(q, k, v, segment_ids, *, interpret: bool = False, scale: float | None = None,
                     window: int | None = None):
    """Causal attention within segments by the splash kernel: (b, t, H, d) -> (b, t, H, d),
    in q's dtype. `interpret=True` runs the kernel in the Pallas interpreter (any backend:
    how the CPU tests check it against `xla_attention`). Under a mesh (traced with
    `jax.sharding.use_abstract_mesh`), each device runs it on its own rows and heads."""
    b, _, h, _ = q.shape
    shards = batch_shards(b)
    mesh = jax.sharding.get_abstract_mesh()
    tensor = mesh.shape.get("tensor", 1) if not mesh.empty else 1
    heads = "tensor" if tensor > 1 and h % tensor == 0 and k.shape[2] % tensor == 0 else None
    if shards == 1 and heads is None:
        return _splash_local(q, k, v, segment_ids, interpret, scale, window)
    rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names) if shards > 1 else None
    spec = P(rows, None, heads, None)
    return jax.shard_map(lambda q, k, v, s: _splash_local(q, k, v, s, interpret, scale, window), mesh=mesh,
                         in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec, check_vma=False)(
        q, k, v, segment_ids)


# ---------------------------------------------------------------------------------------------
# GPU: cuDNN
# ---------------------------------------------------------------------------------------------

def cudnn_attention(q, k, v, segment_ids, dtype, *, scale: float | None = None, window: int | None = None):
    """Causal attention within segments by cuDNN's fused kernel (`jax.nn.dot_product_attention`,
    BTNH layout, GQA native); the segment structure (and a sliding window) goes in as its boolean mask."""
    mask = causal_segment_mask(segment_ids, window)[:, None]             # (b, 1, t, t)
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask,
                                       scale=scale, implementation="cudnn")
    return out.reshape(*q.shape[:2], -1)
