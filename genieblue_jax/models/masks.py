"""Pure helpers for attention masks and per-segment positions (packed sequences).

Conventions used everywhere in genieblue_jax:
- `segment_ids` (batch, seq) int: tokens of the same sample share an id >= 1; padding is 0.
- `positions` (batch, seq) int: the RoPE position of each token, restarting at 0 in
  every segment.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def causal_segment_mask(segment_ids, window: int | None = None):
    """Boolean mask (batch, q, k): query i may attend key j iff j <= i and both are in the
    same segment (and, with a `window`, i - window < j: a sliding-window layer's).

    Padding (segment 0) attends only to padding, so no row is empty (no NaN softmax); its
    outputs are meaningless and must be ignored by the caller.

    Example (one row, two packed samples and one pad):

        segment_ids = [[1, 1, 2, 2, 0]]
        causal_segment_mask(segment_ids)[0].astype(int) ==
            [[1, 0, 0, 0, 0],
             [1, 1, 0, 0, 0],
             [0, 0, 1, 0, 0],
             [0, 0, 1, 1, 0],
             [0, 0, 0, 0, 1]]
    """
    segment_ids = jnp.asarray(segment_ids)
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    if window is not None:
        causal &= sliding_window_mask(jnp.arange(t), jnp.arange(t), window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & causal[None]


def cached_causal_segment_mask(segment_ids, cache_segment_ids, index, window: int | None = None):
    """Boolean mask (batch, t, S) of t new tokens (query slots index .. index + t - 1) over
    the S slots of a KV cache: query slot q = index + i may attend slot s iff s <= q and
    both have the same segment id (and, with `window`, within it: `sliding_window_mask`).
    `index` may be traced. The decoder passes the cache's
    ids *before* the new tokens are written, so their own slots (still 0) stay hidden here
    and the new tokens see each other through `causal_segment_mask`; unwritten slots lie in
    the future.

    Example: two rows, prompts of 3 and 1 tokens left-padded to 3 slots, then one decode
    step (index = 3, S = 5):

        cache_segment_ids = [[1, 1, 1, 0, 0],
                             [0, 0, 1, 0, 0]]      # row 1: slots 0-1 are left padding
        cached_causal_segment_mask([[1], [1]], cache_segment_ids, 3)[:, 0].astype(int) ==
            [[1, 1, 1, 0, 0],
             [0, 0, 1, 0, 0]]
    """
    segment_ids = jnp.asarray(segment_ids)
    t, s = segment_ids.shape[-1], cache_segment_ids.shape[-1]
    causal = jnp.arange(s)[None, :] <= index + jnp.arange(t)[:, None]
    if window is not None:  # a sliding layer that keeps every slot (the cache is no longer than its window)
        causal &= sliding_window_mask(index + jnp.arange(t), jnp.arange(s), window)
    same = segment_ids[:, :, None] == cache_segment_ids[:, None, :]
    return same & causal[None]


def sliding_window_mask(query_index, key_index, window: int | None):
    """Boolean mask (..., t, s) of a sliding window: query at absolute index q sees key k iff
    q - window < k (transformers' `sliding_window_overlay`; the causal part is the caller's).
    `query_index` (t,) and `key_index` (s,) may be traced; `window` None is no window (all True).

        >>> sliding_window_mask(jnp.arange(4), jnp.arange(4), 2).astype(int).tolist()
        [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    """
    query_index, key_index = jnp.asarray(query_index), jnp.asarray(key_index)
    if window is None:
        return jnp.ones((query_index.shape[-1], key_index.shape[-1]), bool)
    return key_index[None, :] > query_index[:, None] - window


def ring_slot_index(index, size: int):
    """The absolute slot each of the `size` slots of a ring cache holds once slots
    0 .. index - 1 have been written, slot s at ring position s % size (negative: never
    written). `index` may be traced.

        >>> ring_slot_index(7, 4).tolist()    # slots 4, 5, 6 wrote positions 0, 1, 2; 3 holds slot 3
        [4, 5, 6, 3]
        >>> ring_slot_index(2, 4).tolist()
        [0, 1, -2, -1]
    """
    last = jnp.asarray(index, jnp.int32) - 1
    return last - jnp.mod(last - jnp.arange(size, dtype=jnp.int32), size)


def ring_cache_mask(segment_ids, ring_segment_ids, index, window: int):
    """Boolean mask (batch, t, W) of t new tokens (absolute slots index .. index + t - 1) over
    a sliding layer's ring cache of W = `ring_segment_ids.shape[-1]` slots (`ring_slot_index`;
    W is at most the window): a query sees ring slot j iff it was written, lies within the
    window (`sliding_window_mask`) and has the query's segment id. The ring's ids are read
    before the new tokens are written, as in `cached_causal_segment_mask`.

        >>> ring = jnp.asarray([[1, 1, 1, 1]])        # slots 4, 5, 2, 3 after 6 writes
        >>> ring_cache_mask(jnp.asarray([[1]]), ring, 6, window=3)[0].astype(int).tolist()
        [[1, 1, 0, 0]]
    """
    segment_ids = jnp.asarray(segment_ids)
    t = segment_ids.shape[-1]
    held = ring_slot_index(index, ring_segment_ids.shape[-1])
    queries = jnp.asarray(index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    visible = sliding_window_mask(queries, held, window) & (held >= 0)[None, :]
    same = segment_ids[:, :, None] == ring_segment_ids[:, None, :]
    return same & visible[None]


def positions_from_segments(segment_ids) -> np.ndarray:
    """Per-segment positions (numpy, host-side): 0, 1, ... restarting at each new segment;
    padding gets 0.

    Example:
        positions_from_segments([[1, 1, 1, 2, 2, 0, 0]]) == [[0, 1, 2, 0, 1, 0, 0]]
        positions_from_segments([[0, 0, 1, 1, 1]])       == [[0, 0, 0, 1, 2]]   # left padding
    """
    seg = np.asarray(segment_ids)
    if seg.ndim != 2:
        raise ValueError(f"segment_ids must be (batch, seq), got shape {seg.shape}")
    index = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
    starts = np.ones(seg.shape, bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    # Index of the most recent segment start at or before each token.
    start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return np.where(seg == 0, 0, index - start_index).astype(np.int32)
