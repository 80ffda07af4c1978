"""Calibration samples from the data pipeline: the model's own training data by default.

Where the data comes from (`data_sources`), first match wins:

1. `--data DIR (repeatable)`: converted datasets (`data_pipelines.convert` output), mixed
   with equal weights, with `--tokenizer` or the checkpoint's own tokenizer;
2. the training workdir the model came from (`model.source["workdir"]`, also recorded in
   a checkpoint saved from a workdir): its `config.data.sources` and tokenizer;
3. otherwise an error saying what to pass.

Packed rows are cut back into their samples (one per segment, its tiles with it), so
every calibration sample is one request as a phone would see it: the prompt and answer of
one conversation, its images in token order. Samples with images calibrate the vision
tower and the multimodal decoder; text-only samples the base decoder (GenieBlue runs the
base LLM for exactly those).

Each sample runs teacher-forced: `tokens[:split]` through the prefill graph, the rest a
decode step each, so both graphs of a decoder see real inputs (`choose_split`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from data_pipelines.pipeline import PipelineConfig, SourceSpec, build_pipeline
from data_pipelines.tokenizer import load_tokenizer
from genieblue_jax import workdir as workdir_lib


@dataclasses.dataclass
class Sample:
    """One calibration request: a packed row's segment cut back out."""
    tokens: np.ndarray    # (n,) int32
    tiles: np.ndarray   # (p, S, S, 3) uint8, in the order of the image tokens (p may be 0)
    source: str
    split: int            # tokens[:split] run through prefill, the rest one decode step each


@dataclasses.dataclass
class CalibrationData:
    """The calibration samples of an export, split by the graphs they calibrate."""
    multimodal: list[Sample]  # samples with images: the vision tower and the multimodal decoder
    text: list[Sample]        # text-only samples: the base decoder
    description: str          # where they came from, for the report


def choose_split(n: int, last_image: int, *, context: int, prefill_len: int, decode_steps: int) -> int | None:
    """Where prefill ends for a sample of `n` tokens whose last image token is at
    `last_image` (-1: none): the last `decode_steps` tokens are decoded, unless images lie
    there (the decode graph takes none) or the prefill chunks would not fit the context.
    None when the sample cannot run at all.

        >>> choose_split(40, 18, context=64, prefill_len=16, decode_steps=8)    # 32 prefill + 8 decode
        32
        >>> choose_split(40, 35, context=64, prefill_len=16, decode_steps=8)    # an image near the end
        36
        >>> choose_split(60, 50, context=64, prefill_len=24, decode_steps=4)    # chunks end at 48 < image
        >>> choose_split(70, -1, context=64, prefill_len=16, decode_steps=8)    # longer than the context
    """
    if n < 2 or n > context:
        return None
    max_prefill = (context // prefill_len) * prefill_len  # the last chunk must start <= context - prefill_len
    split = min(max(last_image + 1, n - decode_steps, 1), max_prefill)
    return split if split > last_image else None


def data_sources(model, data: Sequence[str] = (), tokenizer: str | None = None):
    """(sources: tuple of `SourceSpec`, tokenizer path, description) for calibrating `model`
    (module docstring for the order). Errors name the missing directory or setting."""
    if data:
        for d in data:
            if not os.path.isdir(d):
                raise FileNotFoundError(f"--data {d}: no such directory")
        tok = tokenizer or model.tokenizer_path
        if not tok:
            raise ValueError(f"--data given but no tokenizer: {model.path or 'the model'} carries none; "
                             f"pass --tokenizer")
        names = [os.path.basename(os.path.normpath(d)) or f"data{i}" for i, d in enumerate(data)]
        names = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
        return _checked(tuple(SourceSpec(n, d, 1.0) for n, d in zip(names, data))), tok, f"--data {', '.join(data)}"
    workdir = (model.source or {}).get("workdir")
    if not workdir:
        raise ValueError(f"no calibration data: {model.path or 'the model'} is not a training workdir and records "
                         "none; pass --data DIR, once per dataset (data_pipelines.convert output), and --tokenizer "
                         "if the checkpoint carries no tokenizer")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no calibration data: the model was trained in {workdir}, which no longer exists; "
                                "pass --data DIR (repeatable)")
    config = workdir_lib.read_config(workdir)
    tok = tokenizer or workdir_lib.tokenizer_path(config, workdir)
    if config.data.sources:
        sources = tuple(SourceSpec(n, s["path"], s["weight"])
                        for n, s in sorted(workdir_lib.parse_sources(config.data.sources).items()))
        where = f"the training data of {workdir} (config.data.sources)"
    else:  # a demo run of a version before 2026-11-30 (since then its config names the demo data)
        raise ValueError(f"no calibration data: {workdir}/config.json names no data.sources; pass --data DIR "
                         f"(repeatable), e.g. the demo data it wrote: {workdir}/demo_data/train/<source>")
    for s in sources:
        if not os.path.isdir(s.path):
            raise FileNotFoundError(f"no calibration data: source {s.name!r} of {workdir} is at {s.path}, which does "
                                    "not exist; pass --data DIR (repeatable)")
    return _checked(sources), tok, where


def _checked(sources):
    """Opens every source once (cheap: manifests only), so a directory that is not a dataset
    fails here, before the export, with the reader's error naming it."""
    for s in sources:
        s.open()
    return sources


def split_row(row: dict, r: int = 0):
    """The samples of packed row `r` of a pipeline batch: [(tokens, tiles, source id)]."""
    tokens, segments = row["tokens"][r], row["segment_ids"][r]
    valid, starts = row["image_valid"][r], row["image_positions"][r]
    out = []
    for seg in sorted(set(segments.tolist()) - {0}):
        idx = np.nonzero(segments == seg)[0]
        tiles = [row["images"][r, j] for j in np.nonzero(valid)[0] if segments[starts[j]] == seg]
        tiles = np.stack(tiles) if tiles else np.zeros((0,) + row["images"].shape[2:], row["images"].dtype)
        out.append((tokens[idx].astype(np.int32), tiles, int(row["source_ids"][r, idx[0]])))
    return out


def load_samples(mcfg, sources, tokenizer: str, *, count: int, context: int, prefill_len: int,
                 decode_steps: int = 8, image_mode: str = "single", max_tiles: int = 16, seed: int = 0,
                 max_rows: int | None = None, chat: dict | None = None) -> CalibrationData:
    """Up to `count` samples with images and `count` text-only samples (module docstring),
    rendered as the model renders chats (`chat`: `GenieBlue.chat`, the template and its options
    it was trained with; its image token is `mcfg.image_token_id`'s piece of `tokenizer`)."""
    if count < 1:
        raise ValueError(f"--calib={count}: need at least one calibration sample")
    cfg = PipelineConfig.for_model(
        mcfg, sources=tuple(sources), tokenizer=tokenizer, seq_len=context, batch_size=1, image_mode=image_mode,
        max_tiles=max_tiles, max_tiles_per_row=max(1, context // mcfg.tokens_per_tile), seed=seed,
        num_epochs=1, image_token=load_tokenizer(tokenizer).piece(mcfg.image_token_id), chat=chat)
    names = [s.name for s in cfg.sources]
    mm: list[Sample] = []
    text: list[Sample] = []
    skipped = 0
    it = iter(build_pipeline(cfg, process_index=0, process_count=1))
    for _ in range(max_rows or 50 * count):
        if len(mm) >= count and len(text) >= count:
            break
        try:
            row = next(it)
        except StopIteration:
            break
        for tokens, tiles, source in split_row(row):
            is_image = np.nonzero(tokens == mcfg.image_token_id)[0]
            if len(is_image) != len(tiles) * mcfg.tokens_per_tile:
                raise ValueError(f"a {names[source]} sample has {len(is_image)} image tokens but {len(tiles)} "
                                 f"tiles of {mcfg.tokens_per_tile} tokens (image_token_id={mcfg.image_token_id} "
                                 "does not match the data's tokenizer?)")
            split = choose_split(len(tokens), int(is_image[-1]) if len(is_image) else -1, context=context,
                                 prefill_len=prefill_len, decode_steps=decode_steps)
            if split is None:
                skipped += 1
                continue
            bucket = mm if len(tiles) else text
            if len(bucket) < count:
                bucket.append(Sample(tokens, tiles, names[source], split))
    where = ", ".join(sorted({s.source for s in mm + text}))
    if not mm:
        raise ValueError(f"no calibration sample with images in {names} (read with seq_len={context}; "
                         f"{skipped} samples did not fit the context)")
    description = f"{len(mm)} image + {len(text)} text-only samples ({where})"
    if not text:
        # The data has no text-only requests (e.g. caption data alone): the base decoder
        # calibrates on the image samples' text, image tokens removed.
        for s in mm:
            kept = s.tokens[s.tokens != mcfg.image_token_id]
            split = choose_split(len(kept), -1, context=context, prefill_len=prefill_len, decode_steps=decode_steps)
            if split is not None:
                text.append(Sample(kept, np.zeros((0,) + s.tiles.shape[1:], s.tiles.dtype), s.source, split))
        description += "; no text-only samples: the base decoder uses the image samples' text"
    return CalibrationData(mm, text, description)
