"""Running a stack of blocks as `lax.scan` loops, and the stacked parameter layout that lets
a loop read its weights in place.

Why loops: an unrolled stack of `jax.checkpoint` blocks relies on XLA keeping each block's
recomputation apart from its forward pass. XLA:CPU strips the optimisation barriers that
ensure this, merges the two, and stores every block's activations anyway (a 36-layer
Qwen2.5-3B step planned at 4096 tokens per row showed the same temporaries with and
without remat). Inside a scan the backward loop cannot share values with the forward
loop, so remat holds on every backend, compile time stops growing with depth, and the
memory that `tools.aot_memory` plans on CPU is the memory the step needs.

Two parameter layouts, mixable in one module's tree:

    named    layers_0, layers_1, ...: one subtree per layer, the names that map 1:1 to
             Hugging Face. A loop over named layers stacks them (`jnp.stack`) inside the
             step: one copy of those weights per step.
    stacked  layers_1-33:4 = layers 1, 5, ..., 33 (first-last:period), every leaf with a
             leading axis of one entry per layer: exactly the array a scan loop iterates
             over, read in place. `stack_layers` / `unstack_layers` convert. The trainer
             holds the LLM's and the branch's weights and Adam moments stacked for the whole
             run (`trainer.to_step_layout`) and writes checkpoints named.

A loop takes a layer's stacked leaves and overlays its named ones (e.g. named LoRA adapters
on a stacked frozen base), so only named leaves are stacked per step.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from genieblue_jax.models.layers import shard_batch

_STACKED = re.compile(r"^layers_(\d+)-(\d+):(\d+)$")


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


def stacked_slots(kinds: Sequence[str], offset: int = 0) -> Iterator[tuple[str, list[int]]]:
    """(stacked name, the layers it holds in loop order) for every loop slot of the layers
    offset .. offset + len(kinds) - 1 run as `scan_groups(kinds)`.

    >>> list(stacked_slots(("base", "lora") * 2))
    [('layers_0-2:2', [0, 2]), ('layers_1-3:2', [1, 3])]
    """
    for start, period, repeats in scan_groups(kinds):
        for j in range(period):
            layers = [offset + start + r * period + j for r in range(repeats)]
            yield f"layers_{layers[0]}-{layers[-1]}:{period}", layers


def stacked_names(params: dict) -> list[str]:
    """The stacked-layout keys of one module's parameter dict (empty for the named layout)."""
    return [k for k in params if _STACKED.match(k)]


def stack_layers(params: dict, kinds: Sequence[str], stack: Callable = None) -> dict:
    """One module's parameter dict with every fully present loop slot of `kinds` moved from
    the named layout to the stacked one; other keys kept. Slots with no named layer are left
    alone (e.g. a branch without replicated blocks); a slot with only some of its layers
    present is a ValueError naming them.

    `stack(leaves) -> array` builds one stacked leaf (default `jnp.stack`; the trainer passes
    a sharded, donating one). Inverse: `unstack_layers`.

    >>> p = {f"layers_{i}": {"w": jnp.full((2,), i)} for i in range(4)} | {"norm": {"scale": 1}}
    >>> s = stack_layers(p, ("base", "lora") * 2)
    >>> sorted(s), s["layers_1-3:2"]["w"].tolist()
    (['layers_0-2:2', 'layers_1-3:2', 'norm'], [[1, 1], [3, 3]])
    """
    stack = stack or jnp.stack
    out = dict(params)
    for name, layers in stacked_slots(kinds):
        present = [i for i in layers if f"layers_{i}" in params]
        if not present:
            continue
        if len(present) != len(layers):
            raise ValueError(f"cannot stack {name}: layers {sorted(set(layers) - set(present))} are missing "
                             f"(have {present})")
        trees = [out.pop(f"layers_{i}") for i in layers]
        for i, t in zip(layers, trees):
            if jax.tree.structure(t) != jax.tree.structure(trees[0]):
                raise ValueError(f"cannot stack {name}: layers_{i} has other leaves than layers_{layers[0]}")
        out[name] = jax.tree.map(lambda *leaves: stack(list(leaves)), *trees)
    return out


def unstack_layers(params: dict, unstack: Callable = None) -> dict:
    """Inverse of `stack_layers`: every stacked key back to `layers_{i}` subtrees.
    `unstack(leaf) -> list of per-layer arrays` (default: indexing)."""
    unstack = unstack or (lambda leaf: list(leaf))
    out = dict(params)
    for name in stacked_names(params):
        first, last, period = map(int, _STACKED.match(name).groups())
        layers = list(range(first, last + 1, period))
        columns = jax.tree.map(unstack, out.pop(name))
        for r, i in enumerate(layers):
            out[f"layers_{i}"] = jax.tree.map(lambda col: col[r], columns, is_leaf=lambda x: isinstance(x, list))
    return out


def merge_trees(base: dict, overlay: dict) -> dict:
    """Nested-dict union; overlay leaves win. Shares (does not copy) the leaves.

        >>> merge_trees({"a": {"k": 1, "b": 2}, "c": 3}, {"a": {"k": 9, "lora": 5}})
        {'a': {'k': 9, 'b': 2, 'lora': 5}, 'c': 3}
    """
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge_trees(base[key], value) if isinstance(value, dict) and isinstance(
            base.get(key), dict) else value
    return out


def run_scanned(apply_layer: Callable, params: dict, kinds: Sequence[str], x, *, remat: bool, offset: int = 0):
    """x -> the output of layers offset .. offset + len(kinds) - 1, as scan loops (`scan_groups`).

    `params`: the module's parameter dict, each layer's weights named (`layers_{i}`),
    stacked (`stack_layers`, read in place), or both (the named leaves overlay the stacked
    ones). `apply_layer(i, params, x)` applies layer i (a pure function:
    `Module(...).apply`); only its kind may differ between layers, so layer i and layer
    i + period of a loop share one traced body. `remat`: each block recomputes its
    activations in the backward pass. Every block output is pinned to the batch axes
    (`shard_batch`). ValueError when a layer has no weights in either layout (e.g. weights
    stacked for another layer pattern).
    """
    for start, period, repeats in scan_groups(kinds):
        slots = list(stacked_slots(kinds[start:start + period * repeats], offset + start))
        xs = []
        for name, layers in slots:
            named = [params.get(f"layers_{i}") for i in layers]
            missing = [i for i, t in zip(layers, named) if t is None]
            if missing and (len(missing) < len(layers) or name not in params):
                raise ValueError(f"no weights for layers {missing} (neither layers_N nor a stacked {name!r}); "
                                 f"stacked keys present: {stacked_names(params)}")
            tree = params.get(name, {})
            if not missing:  # named leaves: stacked here, once per step
                tree = merge_trees(tree, jax.tree.map(lambda *leaves: jnp.stack(leaves), *named))
            xs.append(tree)
        blocks = [(lambda i: lambda p, h: apply_layer(i, p, h))(offset + start + j) for j in range(period)]
        if remat:
            blocks = [jax.checkpoint(b) for b in blocks]

        def body(h, ps, blocks=blocks):
            for block, p in zip(blocks, ps):
                h = shard_batch(block(p, h))
            return h, None

        x, _ = jax.lax.scan(body, x, xs)
    return x
