"""Next-token cross-entropy computed a chunk of positions at a time.

The LM head of a 150k-token vocabulary turns a 4096-token row into 2.5 GB of float32
logits, plus as much again for their gradient. `token_nll` applies the head to `chunk`
positions at a time inside a `lax.map`, and `jax.checkpoint` makes the backward pass
recompute each chunk's logits instead of storing them: peak logit memory is
rows x chunk x vocab instead of rows x seq x vocab, for one extra head matmul.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from genieblue_jax.models.layers import shard_batch


def _nll(logits, targets):
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def token_nll(hidden, targets, unembed: Callable, chunk: int = 0):
    """-log p(targets | hidden) per position, float32 (b, t).

    hidden (b, t, d): hidden states that `unembed` maps to logits (b, t', vocab) for any
    slice t'; targets (b, t) int. `chunk` > 0 splits the positions into blocks of that many
    (the last one padded, padding dropped); 0 applies the head once.

    Example (b=1, t=5, chunk=2): positions are processed as [0 1] [2 3] [4 pad], each
    block's logits built, reduced to 2 numbers per row and freed before the next block;
    the result equals the unchunked one to float rounding.
    """
    b, t, d = hidden.shape
    if chunk <= 0 or chunk >= t:
        return _nll(unembed(hidden), targets)
    pad = (-t) % chunk
    n = (t + pad) // chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    block = jax.checkpoint(lambda hy: _nll(shard_batch(unembed(shard_batch(hy[0]))), hy[1]))
    nll = jax.lax.map(block, (h, y))  # (n, b, chunk)
    return nll.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
