"""The Grain pipeline end to end on the demo data: well-formed batches, determinism,
exact resume in a new process, disjoint per-host reads, rejections, mixture weights."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines.pipeline import PipelineConfig, SourceSpec, build_pipeline, mixture, packing_efficiency
from data_pipelines.records import ArrayRecordExampleSource, Example, ShardedWriter
from data_pipelines.tokenizer import IM_START, IMAGE_PAD, load_tokenizer
from genieblue_jax.structure import check_image_tokens
from tests.data_pipelines.pipeline_worker import fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_cfg(demo, **kw) -> PipelineConfig:
    base = dict(sources=mixture(demo["datasets"]["train"], {"caption": 3, "vqa": 3, "ocr": 2, "text": 2}),
                tokenizer=demo["tokenizer"], seq_len=192, batch_size=4, tile_size=56, tokens_per_tile=16,
                image_mode="dynamic", max_tiles=4, max_tiles_per_row=12, seed=3, packing_window_rows=4)
    base.update(kw)
    return PipelineConfig(**base)


def _worker(tmp_path, payload, *args):
    cfg_path, out_path = tmp_path / f"cfg_{args[0]}_{args[-1]}.json", tmp_path / f"out_{args[0]}_{args[-1]}.json"
    cfg_path.write_text(json.dumps(payload))
    run = subprocess.run([sys.executable, "-m", "tests.data_pipelines.pipeline_worker", str(cfg_path), *args[:1],
                          str(out_path), *args[1:]], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out_path.read_text())


def test_batches_are_well_formed(demo):
    cfg = make_cfg(demo)
    tok = load_tokenizer(cfg.tokenizer)
    it = iter(build_pipeline(cfg, process_index=0, process_count=1))
    for _ in range(5):
        b = next(it)
        assert b["tokens"].shape == (4, 192) and b["images"].shape == (4, 12, 56, 56, 3)
        check_image_tokens(b["tokens"], tok.token_id(IMAGE_PAD), b["image_valid"], 16)
        for r in range(4):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            n_seg = seg.max()
            assert n_seg >= 1 and set(np.unique(seg)) <= set(range(n_seg + 1))
            for s in range(1, n_seg + 1):
                idx = np.nonzero(seg == s)[0]
                assert (np.diff(idx) == 1).all()                        # contiguous: one sample
                np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart per segment
                assert b["tokens"][r, idx[0]] == tok.token_id(IM_START)
                assert not b["loss_mask"][r, idx[0]]                    # never trained across samples
                assert b["loss_mask"][r, idx].any()
            assert (seg[np.argmax(seg == 0):] == 0).all() if (seg == 0).any() else True
            for p in np.nonzero(b["image_valid"][r])[0]:
                start = b["image_positions"][r, p]
                assert (b["tokens"][r, start:start + 16] == tok.token_id(IMAGE_PAD)).all()
            assert not b["images"][r][~b["image_valid"][r]].any()
    assert packing_efficiency(it.stats) > 0.7
    assert it.stats["rejected"] == {}


def test_deterministic_from_the_seed(demo):
    cfg = make_cfg(demo)
    a = iter(build_pipeline(cfg, process_index=0, process_count=1))
    b = iter(build_pipeline(cfg, process_index=0, process_count=1))
    assert [fingerprint(next(a)) for _ in range(4)] == [fingerprint(next(b)) for _ in range(4)]
    c = iter(build_pipeline(dataclasses.replace(cfg, seed=4), process_index=0, process_count=1))
    assert fingerprint(next(c)) != fingerprint(next(iter(build_pipeline(cfg, process_index=0, process_count=1))))


def test_read_ahead_changes_neither_the_batches_nor_the_state(demo):
    """Grain's threaded read-ahead (its defaults, 16 threads x 500 examples) against processing
    each example on demand (0 threads): the same batches, and a state saved under one resumes
    the other at the same batch."""
    cfg = make_cfg(demo)
    ahead = iter(build_pipeline(dataclasses.replace(cfg, read_threads=16, read_buffer=500), process_index=0,
                                process_count=1))
    on_demand = iter(build_pipeline(dataclasses.replace(cfg, read_threads=0, read_buffer=0), process_index=0,
                                    process_count=1))
    assert [fingerprint(next(ahead)) for _ in range(6)] == [fingerprint(next(on_demand)) for _ in range(6)]
    resumed = iter(build_pipeline(dataclasses.replace(cfg, read_threads=0, read_buffer=0), process_index=0,
                                  process_count=1))
    resumed.set_state(ahead.get_state())
    assert [fingerprint(next(resumed)) for _ in range(2)] == [fingerprint(next(ahead)) for _ in range(2)]


def test_resume_in_a_new_process_gives_identical_batches(demo, tmp_path):
    cfg = make_cfg(demo)
    payload = {"config": dataclasses.asdict(cfg)}
    first = _worker(tmp_path, payload, "take", "3", "4")       # batches 4..7 after saving at 3
    resumed = _worker(tmp_path, {**payload, "state": first["state"]}, "resume", "4")
    assert resumed["next"] == first["next"]
    # The state is small JSON (no tensors): window start + rows emitted + counters.
    assert len(json.dumps(first["state"])) < 4000


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_resume_exactly(demo, tmp_path):
    """num_workers=2 (Grain mp_prefetch), run in light subprocesses: Grain's workers import
    the parent's modules, which under pytest would be torch and transformers."""
    cfg = make_cfg(demo, num_workers=2)
    payload = {"config": dataclasses.asdict(cfg)}
    first = _worker(tmp_path, payload, "take", "2", "3")
    resumed = _worker(tmp_path, {**payload, "state": first["state"]}, "resume", "3")
    assert resumed["next"] == first["next"]
    plain = iter(build_pipeline(dataclasses.replace(cfg, num_workers=0), process_index=0, process_count=1))
    for _ in range(2):
        next(plain)
    assert [fingerprint(next(plain)) for _ in range(3)] == first["next"]
    # The library leaves absl's global flags alone: outside absl.app (flags unparsed), workers are
    # an error saying what to do, not a silent change to the caller's process state.
    cfg_path = tmp_path / "unparsed.json"
    cfg_path.write_text(json.dumps(payload))
    run = subprocess.run([sys.executable, "-c", "import json, sys; from tests.data_pipelines.pipeline_worker import "
                          "load_config; from data_pipelines.pipeline import build_pipeline; "
                          f"build_pipeline(load_config(json.load(open({str(cfg_path)!r}))['config']), "
                          "process_index=0, process_count=1)"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and "RuntimeError: num_workers=2: Grain's worker processes read absl flags, which " \
        "this process has not parsed; run under absl.app.run" in run.stderr, run.stderr[-2000:]


def test_two_processes_read_disjoint_parts_whose_union_is_everything(demo, tmp_path):
    cfg = make_cfg(demo)
    payload = {"config": dataclasses.asdict(cfg)}
    parts = [set(_worker(tmp_path, payload, "ids", str(i), "2")["ids"]) for i in range(2)]
    src = ArrayRecordExampleSource(cfg.sources[0].path)
    everything = {src[i].id for i in range(len(src))}
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == everything
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_bad_samples_are_counted_logged_and_skipped(demo, tmp_path, caplog):
    good = ArrayRecordExampleSource(demo["datasets"]["train"]["vqa"])
    out = str(tmp_path / "mixed")
    with ShardedWriter(out) as w:
        for i in range(6):
            w.write(good[i])
        w.write(Example("corrupt-1", "vqa", [{"role": "user", "content": "<image>\nHow many?"},
                                             {"role": "assistant", "content": "two"}], [b"\x89PNG\r\n\x1a\nbroken"]))
        w.write(Example("too-long-1", "vqa", [{"role": "user", "content": "word " * 400},
                                              {"role": "assistant", "content": "two"}]))
    cfg = make_cfg(demo, sources=(SourceSpec("vqa", out),), num_epochs=1, batch_size=2)
    it = iter(build_pipeline(cfg, process_index=0, process_count=1))
    batches = list(it)
    assert it.stats["rejected"] == {"undecodable image": 1, "no trained token within seq_len=192": 1}
    assert it.stats["samples"] == 6
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 6
    assert "corrupt-1" in caplog.text and "too-long-1" in caplog.text


def test_mixture_weights_and_source_ids(demo):
    cfg = make_cfg(demo, sources=mixture({"caption": demo["datasets"]["train"]["caption"],
                                          "text": demo["datasets"]["train"]["text"]}, {"caption": 3, "text": 1}))
    it = iter(build_pipeline(cfg, process_index=0, process_count=1))
    seen = np.zeros(2)
    for _ in range(10):
        b = next(it)
        for s in range(2):
            seen[s] += len({(r, g) for r, g in zip(*np.nonzero((b["source_ids"] == s) & (b["segment_ids"] > 0)))
                            for g in [b["segment_ids"][r, g]]})
    counts = it.stats["samples_per_source"]
    assert abs(counts["caption"] / (counts["caption"] + counts["text"]) - 0.75) < 0.05
    assert seen[0] > 2 * seen[1] > 0


def test_the_mixture_key_names_a_dataset_whatever_its_records_say(demo, tmp_path):
    """A dataset converted under another source label (the converter's default "llava") is named by
    its `data.sources` key: it trains, and its samples count under the key."""
    theirs = ArrayRecordExampleSource(demo["datasets"]["train"]["vqa"])
    out = str(tmp_path / "converted")
    with ShardedWriter(out) as w:
        for i in range(8):
            w.write(dataclasses.replace(theirs[i], source="llava"))
    assert {ArrayRecordExampleSource(out)[i].source for i in range(8)} == {"llava"}
    cfg = make_cfg(demo, sources=(SourceSpec("vqa", out), SourceSpec("text", demo["datasets"]["train"]["text"])),
                   num_epochs=1, batch_size=2)
    it = iter(build_pipeline(cfg, process_index=0, process_count=1))
    batches = list(it)
    assert it.stats["samples_per_source"]["vqa"] == 8 and set(it.stats["samples_per_source"]) == {"vqa", "text"}
    assert sum(int(((b["source_ids"] == 0) & (b["segment_ids"] > 0)).any(axis=1).sum()) for b in batches) > 0


def test_config_errors_name_the_field(demo):
    with pytest.raises(ValueError, match="duplicate names"):
        make_cfg(demo, sources=(SourceSpec("a", "x"), SourceSpec("a", "y")))
    with pytest.raises(ValueError, match="image_mode='tiles'"):
        make_cfg(demo, image_mode="tiles")
    with pytest.raises(ValueError, match="weights must be > 0"):
        make_cfg(demo, sources=(SourceSpec("a", "x", 0.0),))
    with pytest.raises(ValueError, match="name different sources"):
        mixture({"a": "x"}, {"b": 1.0})


def test_stage1_single_tile_mode_sized_from_the_model(demo):
    from genieblue_jax import models, structure
    llm, vit = models.get_preset("tiny-qwen2"), models.get_preset("tiny-siglip")
    tok = load_tokenizer(demo["tokenizer"])
    mcfg = structure.MLLMConfig(llm, vit, models.ProjectorConfig.between(vit, llm), structure.StructureConfig(),
                                image_token_id=tok.token_id(IMAGE_PAD))
    cfg = PipelineConfig.for_model(mcfg, sources=(SourceSpec("caption", demo["datasets"]["train"]["caption"]),),
                                   tokenizer=demo["tokenizer"], seq_len=128, batch_size=2, image_mode="single",
                                   max_tiles_per_row=8)
    assert (cfg.tile_size, cfg.tokens_per_tile) == (56, 16)
    b = next(iter(build_pipeline(cfg, process_index=0, process_count=1)))
    n_segments = int(b["segment_ids"].max(axis=1).sum())
    assert int(b["image_valid"].sum()) == n_segments  # every caption sample: one image, one tile


def test_pipeline_reads_a_tfds_source(demo, tmp_path):
    from data_pipelines.tfds_source import ExampleDataset
    src = ArrayRecordExampleSource(demo["datasets"]["train"]["ocr"])
    examples = [src[i] for i in range(12)]
    ExampleDataset(examples={"train": examples}, data_dir=str(tmp_path)).download_and_prepare()
    cfg = make_cfg(demo, sources=(SourceSpec("ocr", "example_dataset", tfds_split="train",
                                             tfds_data_dir=str(tmp_path)),), num_epochs=1, batch_size=2)
    it = iter(build_pipeline(cfg, process_index=0, process_count=1))
    list(it)
    assert it.stats["samples"] == 12 and it.stats["rejected"] == {}


def test_a_damaged_shard_record_is_skipped_counted_and_named(demo, tmp_path, caplog):
    """Bytes flipped inside one record of an ArrayRecord shard (riegeli's chunk hash fails): the
    record is rejected as "corrupt record" naming the shard file and the record, the others are
    all trained, and reading it again (a resume) skips it the same way instead of crashing."""
    out = str(tmp_path / "damaged")
    texts = [Example(f"t{i}", "text", [{"role": "user", "content": f"question {i} " * 5},
                                       {"role": "assistant", "content": f"answer {i} " * 5}]) for i in range(8)]
    with ShardedWriter(out) as w:
        for ex in texts:
            w.write(ex)
    shard = os.path.join(out, ArrayRecordExampleSource(out).manifest["shards"][0]["file"])
    intact = open(shard, "rb").read()
    for at in range(64, len(intact), 32):  # the first place where flipped bytes break one record's chunk
        data = bytearray(intact)
        data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
        open(shard, "wb").write(bytes(data))
        try:
            source = ArrayRecordExampleSource(out)
        except (RuntimeError, ValueError):  # a block header or the index: the file does not open
            continue
        read = [source[i] for i in range(8)]
        bad = [i for i, ex in enumerate(read) if not isinstance(ex, Example)]
        if bad:
            break
    assert len(bad) == 1 and read[bad[0]].where == f"{shard} record {bad[0]}" and "hash mismatch" in read[bad[0]].reason
    assert [ex.id for ex in read if isinstance(ex, Example)] == [f"t{i}" for i in range(8) if i != bad[0]]
    assert [type(ex) for ex in source.__getitems__(list(range(8)))] == [type(ex) for ex in read]
    cfg = make_cfg(demo, sources=(SourceSpec("text", out),), num_epochs=1, batch_size=2)
    it = iter(build_pipeline(cfg, process_index=0, process_count=1))
    batches = list(it)
    assert it.stats["rejected"] == {"corrupt record": 1} and it.stats["samples"] == 7
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 7
    assert f"corrupt record: {shard} record {bad[0]}" in caplog.text
