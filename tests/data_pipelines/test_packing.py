"""Packing: first-fit, per-segment positions, whole samples only, and packed logits equal
unpacked ones through the multimodal model."""
import jax
import numpy as np
import pytest

from data_pipelines.packing import PackingSpec, Sample, assemble_row, batch_rows, first_fit
from data_pipelines.pipeline import ExampleProcessor, PipelineConfig, SourceSpec
from data_pipelines.records import ArrayRecordExampleSource
from data_pipelines.tokenizer import IMAGE_PAD, load_tokenizer
from genieblue_jax import models, structure


def _sample(i, n, p=0, source="a"):
    return Sample(f"s{i}", source, np.arange(1, n + 1, dtype=np.int32), np.ones(n, bool),
                  np.full((p, 4, 4, 3), i, np.float32), np.arange(p, dtype=np.int32))


def test_first_fit_respects_tokens_and_tiles():
    assert first_fit([6, 5, 3, 2, 4], [0, 2, 1, 0, 0], 8, 2) == [[0, 3], [1], [2, 4]]
    assert first_fit([8, 8], [0, 0], 8, 0) == [[0], [1]]
    with pytest.raises(ValueError, match="item 1 needs 9 tokens"):
        first_fit([3, 9], [0, 0], 8, 2)


def test_row_layout():
    spec = PackingSpec(seq_len=12, max_tiles_per_row=4, tile_size=4, sources=("a", "b"))
    row = assemble_row([_sample(1, 4, 1), _sample(2, 5, 2, "b")], spec)
    np.testing.assert_array_equal(row["segment_ids"], [1] * 4 + [2] * 5 + [0] * 3)
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(row["source_ids"], [0] * 4 + [1] * 5 + [-1] * 3)
    np.testing.assert_array_equal(row["image_positions"], [0, 4, 5, -1])
    np.testing.assert_array_equal(row["image_valid"], [1, 1, 1, 0])
    assert (row["images"][0] == 1).all() and (row["images"][1:3] == 2).all() and not row["images"][3].any()
    with pytest.raises(ValueError, match=r"do not fit one row \(12 tokens, 4 tiles\)"):
        assemble_row([_sample(1, 8), _sample(2, 5)], spec)
    with pytest.raises(ValueError, match="source 'c' is not one of"):
        assemble_row([_sample(1, 2, source="c")], spec)


def test_packed_logits_equal_unpacked(demo):
    tok = load_tokenizer(demo["tokenizer"])
    llm, vit = models.get_preset("tiny-qwen2"), models.get_preset("tiny-siglip")
    mcfg = structure.MLLMConfig(llm, vit, models.ProjectorConfig.between(vit, llm),
                                structure.StructureConfig(), image_token_id=tok.token_id(IMAGE_PAD))
    params = structure.init_mllm(mcfg, jax.random.key(0))
    cfg = PipelineConfig(sources=(SourceSpec("vqa", demo["datasets"]["train"]["vqa"]),),
                         tokenizer=demo["tokenizer"], seq_len=256, batch_size=1, tile_size=56,
                         tokens_per_tile=mcfg.tokens_per_tile, max_tiles_per_row=8)
    process = ExampleProcessor(cfg)
    src = ArrayRecordExampleSource(demo["datasets"]["train"]["vqa"])
    processed = [process(src[i]) for i in range(40)]
    wide = next(s for s in processed if len(s.tiles) > 1)   # a dynamic-resolution image: 2 tiles + thumbnail
    samples = [wide] + [s for s in processed if len(s.tiles) == 1][:2]
    assert len(samples) == 3 and sum(len(s) for s in samples) <= 256
    fwd = jax.jit(structure.forward, static_argnums=0, static_argnames="mode")

    def logits(rows):
        b = batch_rows(rows)
        structure.check_image_tokens(b["tokens"], mcfg.image_token_id, b["image_valid"], mcfg.tokens_per_tile)
        return np.asarray(fwd(mcfg, params, b["tokens"], b["positions"], b["segment_ids"], b["images"]))

    packed = logits([assemble_row(samples, cfg.packing)])[0]
    start = 0
    for s in samples:
        alone = logits([assemble_row([s], cfg.packing)])[0, :len(s)]
        diff = np.abs(packed[start:start + len(s)] - alone).max()
        assert diff <= 1e-5, (s.id, diff)
        start += len(s)
