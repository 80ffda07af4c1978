"""Pure helpers for attention masks and per-segment positions (packed sequences).

Conventions used everywhere in genieblue_jax:
- `segment_ids` (batch, seq) int: tokens of the same sample share an id >= 1; padding is 0.
- `positions` (batch, seq) int: the RoPE position of each token, restarting at 0 in
  every segment.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def causal_segment_mask(segment_ids):
    """Boolean mask (batch, q, k): query i may attend key j iff j <= i and both are in the
    same segment.

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
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & causal[None]


def cached_causal_segment_mask(segment_ids, cache_segment_ids, index):
    """Boolean mask (batch, t, S) of t new tokens (query slots index .. index + t - 1) over
    the S slots of a KV cache: query slot q = index + i may attend slot s iff s <= q and
    both have the same segment id. `index` may be traced. The decoder passes the cache's
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
    same = segment_ids[:, :, None] == cache_segment_ids[:, None, :]
    return same & causal[None]


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
