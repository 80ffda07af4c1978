"""First-fit packing of tokenized samples into fixed-length rows, images travelling along.

A row holds whole samples only (no sample ever crosses a row); each gets its own segment
id (1, 2, ...) and positions restarting at 0. The tiles of all its samples travel with
the row, padded to `max_tiles_per_row`, with the index of each tile's first token.

Row arrays (one row; `batch_rows` stacks them):

    tokens          int32 (L,)      0 on padding
    segment_ids     int32 (L,)      0 on padding
    positions       int32 (L,)      restart per segment
    loss_mask       bool  (L,)      token t is a trained target (predicted from t-1)
    source_ids      int32 (L,)      index into `PackingSpec.sources`, -1 on padding
    images          uint8 (P, S, S, 3)  tiles in token order (real ones first), zeros when unused
    image_valid     bool  (P,)
    image_positions int32 (P,)      first token of each tile's run, -1 when unused
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class Sample:
    """One tokenized example, ready to pack."""
    id: str
    source: str
    tokens: np.ndarray            # int32 (n,)
    loss_mask: np.ndarray         # bool (n,)
    tiles: np.ndarray           # uint8 (p, S, S, 3), in token order
    tile_starts: np.ndarray      # int32 (p,), first token of each tile within the sample

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class Rejection:
    """A sample that cannot be trained on, with the reason (counted and logged downstream)."""
    id: str
    source: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PackingSpec:
    """The shape of a packed row: tokens per row, tile slots per row, tile side in pixels."""
    seq_len: int
    max_tiles_per_row: int
    tile_size: int               # pixels, from the vision config
    sources: tuple[str, ...]      # names, in the order `source_ids` index them


def first_fit(lengths: Sequence[int], tile_counts: Sequence[int], seq_len: int,
              max_tiles: int) -> list[list[int]]:
    """Assigns items to rows in arrival order: each goes into the first row with room for
    both its tokens and its tiles, else a new row. Returns item indices per row.

        >>> first_fit([6, 5, 3, 2, 4], [0, 2, 1, 0, 0], seq_len=8, max_tiles=2)
        [[0, 3], [1], [2, 4]]

    Item 2 (3 tokens, 1 tile) does not fit row 0 (6 + 3 > 8 tokens) nor row 1 (its tokens
    would fit, 5 + 3 = 8, but 2 + 1 > 2 tiles), so it opens row 2; item 3 then fills row 0
    and item 4 joins row 2.
    """
    rows: list[list[int]] = []
    used_tokens: list[int] = []
    used_tiles: list[int] = []
    for i, (n, p) in enumerate(zip(lengths, tile_counts)):
        if n > seq_len or p > max_tiles:
            raise ValueError(f"item {i} needs {n} tokens / {p} tiles; a row holds {seq_len} / {max_tiles}")
        for r in range(len(rows)):
            if used_tokens[r] + n <= seq_len and used_tiles[r] + p <= max_tiles:
                rows[r].append(i)
                used_tokens[r] += n
                used_tiles[r] += p
                break
        else:
            rows.append([i])
            used_tokens.append(n)
            used_tiles.append(p)
    return rows


def assemble_row(samples: Sequence[Sample], spec: PackingSpec) -> dict[str, np.ndarray]:
    """One packed row of `spec.seq_len` tokens from `samples` (in order), as numpy arrays:
    tokens / segment_ids (1, 2, ... per sample, 0 = padding) / positions (restarting at 0 per
    sample) / loss_mask / source_ids (int32 or bool, (seq_len,)); images (max_tiles_per_row,
    S, S, 3) uint8 with image_valid (bool) and image_positions (int32: the first image-token
    index of each tile, -1 when empty). ValueError naming the sample ids when they do not fit
    or a source is unknown."""
    L, P, S = spec.seq_len, spec.max_tiles_per_row, spec.tile_size
    row = {
        "tokens": np.zeros(L, np.int32), "segment_ids": np.zeros(L, np.int32),
        "positions": np.zeros(L, np.int32), "loss_mask": np.zeros(L, bool),
        "source_ids": np.full(L, -1, np.int32), "images": np.zeros((P, S, S, 3), np.uint8),
        "image_valid": np.zeros(P, bool), "image_positions": np.full(P, -1, np.int32),
    }
    t = p = 0
    for seg, s in enumerate(samples, start=1):
        n, k = len(s), len(s.tiles)
        if t + n > L or p + k > P:
            raise ValueError(f"samples {[x.id for x in samples]} do not fit one row ({L} tokens, {P} tiles)")
        if s.source not in spec.sources:
            raise ValueError(f"sample {s.id}: source {s.source!r} is not one of {spec.sources}")
        row["tokens"][t:t + n] = s.tokens
        row["segment_ids"][t:t + n] = seg
        row["positions"][t:t + n] = np.arange(n)
        row["loss_mask"][t:t + n] = s.loss_mask
        row["source_ids"][t:t + n] = spec.sources.index(s.source)
        if k:
            row["images"][p:p + k] = s.tiles
            row["image_valid"][p:p + k] = True
            row["image_positions"][p:p + k] = t + s.tile_starts
        t, p = t + n, p + k
    return row


def batch_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of `assemble_row` stacked into a batch: every array gets a leading (rows,) axis."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def empty_row(spec: PackingSpec) -> dict[str, np.ndarray]:
    """An all-padding row (completes the last batch of a finite stream; trains nothing)."""
    return assemble_row([], spec)


def efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of non-padding tokens."""
    return float(np.mean(batch["segment_ids"] > 0))
