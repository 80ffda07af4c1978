"""Running a stack of blocks as `lax.scan` loops while keeping one parameter subtree per
layer (`layers_0`, `layers_1`, ...: the names that map 1:1 to Hugging Face).

Why: an unrolled stack of `jax.checkpoint` blocks relies on XLA keeping each block's
recomputation apart from its forward pass. XLA:CPU strips the optimisation barriers that
ensure this, merges the two, and stores every block's activations anyway (a 36-layer
Qwen2.5-3B step planned at 4096 tokens per row showed the same temporaries with and
without remat). Inside a scan the backward loop cannot share values with the forward
loop, so remat holds on every backend, compile time stops growing with depth, and the
memory that `tools.aot_memory` plans on CPU is the memory the step needs.

At apply time the per-layer parameter trees of a group are stacked (`jnp.stack`), which
costs one copy of the stack's weights (of the local shard, under FSDP) per step.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from genieblue_jax.models.layers import shard_batch


def scan_groups(kinds: Sequence[str]) -> list[tuple[int, int, int]]:
    """Splits layers into scan loops, `(start, period, repeats)`: layers start ..
    start + period * repeats - 1, whose kinds repeat with `period`, run as `repeats` loop
    iterations of `period` blocks each.

    The whole stack is one loop when its kinds are periodic, else one loop per run of
    equal kinds:

    >>> scan_groups(("base", "lora", "lora", "lora") * 9)   # GenieBlue-Skip, 36 layers, n = 4
    [(0, 4, 9)]
    >>> scan_groups(("base",) * 3 + ("lora",) * 5)          # Pre placement
    [(0, 1, 3), (3, 1, 5)]
    >>> scan_groups(("base",) * 27)                         # a plain stack
    [(0, 1, 27)]
    """
    kinds = tuple(kinds)
    n = len(kinds)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and all(kinds[i] == kinds[i % period] for i in range(n)):
            return [(0, period, n // period)]
    groups, start = [], 0
    for i in range(1, n + 1):
        if i == n or kinds[i] != kinds[start]:
            groups.append((start, 1, i - start))
            start = i
    return groups


def run_scanned(apply_layer: Callable, layer_params: Sequence[dict], kinds: Sequence[str], x, *, remat: bool):
    """x -> the output of the stack of layers, as scan loops (`scan_groups`).

    `apply_layer(i, params, x)` applies layer i (a pure function: `Module(...).apply`);
    only its kind may differ between layers, so layer i and layer i + period of a loop
    share one traced body. `remat`: each block recomputes its activations in the backward
    pass. Every block output is pinned to the batch axes (`shard_batch`).
    """
    for start, period, repeats in scan_groups(kinds):
        stacked = [jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                *[layer_params[start + r * period + j] for r in range(repeats)])
                   for j in range(period)]
        blocks = [(lambda i: lambda p, h: apply_layer(i, p, h))(start + j) for j in range(period)]
        if remat:
            blocks = [jax.checkpoint(b) for b in blocks]

        def body(h, ps, blocks=blocks):
            for block, p in zip(blocks, ps):
                h = shard_batch(block(p, h))
            return h, None

        x, _ = jax.lax.scan(body, x, stacked)
    return x
