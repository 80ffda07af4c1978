"""Hugging Face datasets and WebDataset shards -> the same Examples as the LLaVA converter: exact
rejects, byte-exact images, the same tokens and loss mask as the same records given as LLaVA JSON."""
import io
import json
import os
import socket
import string
import subprocess
import sys

import datasets
import huggingface_hub
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipelines.conversion import ConversionError, convert_hf, convert_llava, convert_webdataset
from data_pipelines.conversion import webdataset as wds_format
from data_pipelines.packing import Sample
from data_pipelines.pipeline import ExampleProcessor, PipelineConfig, SourceSpec
from data_pipelines.records import ArrayRecordExampleSource
from data_pipelines.tokenizer import CHAT_SPECIAL_TOKENS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def encoded(fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (9, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


A, B, C = encoded("PNG", 0), encoded("JPEG", 1), encoded("PNG", 2)
CORRUPT = A[:len(A) // 2]  # truncated: the header opens, the pixels do not decode
FILES = {"a.png": A, "b.jpg": B, "c.png": C, "bad.png": CORRUPT}


@pytest.fixture
def root(tmp_path):
    """The images as files (the LLaVA reference reads them; path datasets name them)."""
    root = tmp_path / "images"
    root.mkdir()
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    (tmp_path / "outside.png").write_bytes(A)
    return root


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """The training pipeline's Example -> tokens + loss mask + tiles, on a character tokenizer."""
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(string.printable)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(list(CHAT_SPECIAL_TOKENS))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return ExampleProcessor(PipelineConfig(sources=(SourceSpec("x", "unused"),), tokenizer=str(path), seq_len=512,
                                           batch_size=1, tile_size=14, tokens_per_tile=2, image_mode="single"))


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image", "text": None}


def msg(role, *parts):
    return {"role": role, "content": list(parts)}


def rejects(out, label="index"):
    return [(r[label], r["id"], r["reason"]) for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())]


def llava_reference(tmp_path, root, records, **kwargs):
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(records))
    return convert_llava(str(path), str(root), str(tmp_path / "reference"), **kwargs), tmp_path / "reference"


def assert_same_dataset(out, reference, processor, images):
    """Every record equal to the reference's (ids, turns, image bytes), its images the original
    files' bytes, and the same tokens / loss mask / tiles from the training pipeline."""
    got, want = ArrayRecordExampleSource(str(out)), ArrayRecordExampleSource(str(reference))
    assert len(got) == len(want) == len(images)
    for i in range(len(got)):
        ex, ref = got[i], want[i]
        assert ex == ref
        assert ex.images == images[i]
        s, r = processor(ex), processor(ref)
        assert isinstance(s, Sample) and isinstance(r, Sample) and s.loss_mask.any()
        np.testing.assert_array_equal(s.tokens, r.tokens)
        np.testing.assert_array_equal(s.loss_mask, r.loss_mask)
        np.testing.assert_array_equal(s.tiles, r.tiles)
    assert got.manifest["content_hash"] == want.manifest["content_hash"]


LLAVA_ROWS = [  # (id, image file or None, conversations)
    ("single", "a.png", [human("<image>\nWhat is it?"), gpt("Noise.")]),
    ("untagged", "c.png", [human("Read it."), gpt("abc")]),
    ("text", None, [{"from": "system", "value": "Be terse."}, human("2+2?"), gpt("4")]),
    ("corrupt", "bad.png", [human("<image>\nHi"), gpt("Hi")]),
    ("lead", "b.jpg", [gpt("Hello!"), human("<image>\nColour?"), gpt("Red.")]),
    ("mismatch", "a.png", [human("<image> vs <image>"), gpt("Same.")]),
    (None, "b.jpg", [human("<image>\nNo id."), gpt("Fine.")]),
]


def test_hf_llava_style_with_image_bytes(tmp_path, root, processor):
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": datasets.List({"from": datasets.Value("string"),
                                                                  "value": datasets.Value("string")})})
    ds = datasets.Dataset.from_dict({
        "id": [rid for rid, _, _ in LLAVA_ROWS],
        "image": [None if f is None else {"bytes": FILES[f], "path": f"orig/{f}"} for _, f, _ in LLAVA_ROWS],
        "conversations": [c for _, _, c in LLAVA_ROWS]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    report = convert_hf(str(tmp_path / "hf"), str(tmp_path / "out"), num_shards=2, max_reject_fraction=0.5)

    expected = [(3, "corrupt", "undecodable_image"), (5, "mismatch", "image_tag_mismatch")]
    assert rejects(tmp_path / "out") == expected
    assert (report.total, report.written, report.reasons) == (
        7, 5, {"undecodable_image": 1, "image_tag_mismatch": 1})
    assert report.adjusted == {"leading_answer_dropped": 1}
    assert "rejected  2 (28.6%)" in report.summary()
    ref_records = [{**({"id": rid} if rid else {}), **({"image": f} if f else {}), "conversations": c}
                   for rid, f, c in LLAVA_ROWS]
    ref_report, ref = llava_reference(tmp_path, root, ref_records, source="hf", max_reject_fraction=0.5)
    assert rejects(ref) == expected and ref_report.adjusted == report.adjusted
    assert_same_dataset(tmp_path / "out", ref, processor, [[A], [C], [], [B], [B]])
    assert ArrayRecordExampleSource(str(tmp_path / "out"))[4].id == "hf-6"  # a null id: "{source}-{row}"


MESSAGE_ROWS = [  # (id, images, messages, the same record as LLaVA conversations)
    ("one", ["a.png"], [msg("user", IMAGE, text("What is it?")), msg("assistant", text("Noise."))],
     [human("<image>\nWhat is it?"), gpt("Noise.")]),
    ("two", ["b.jpg", "c.png"],
     [msg("user", text("Compare"), IMAGE, IMAGE), msg("assistant", text("Both noise.")),
      msg("user", text("Sure?")), msg("assistant", text("Yes."))],
     [human("Compare\n<image><image>"), gpt("Both noise."), human("Sure?"), gpt("Yes.")]),
    ("text", [], [msg("system", text("Be terse.")), msg("user", text("2+2?")), msg("assistant", text("4"))],
     [{"from": "system", "value": "Be terse."}, human("2+2?"), gpt("4")]),
    ("mismatch", ["a.png", "b.jpg"], [msg("user", IMAGE, text("Which?")), msg("assistant", text("Left."))],
     [human("<image>\nWhich?"), gpt("Left.")]),
    ("interleaved", ["c.png", "a.png"],
     [msg("user", text("First:"), IMAGE, text(" then:"), IMAGE, text("Same?")), msg("assistant", text("No."))],
     [human("First:\n<image> then:\n<image>\nSame?"), gpt("No.")]),
    ("badrole", [], [msg("bot", text("Hi")), msg("assistant", text("Hi"))],
     [{"from": "bot", "value": "Hi"}, gpt("Hi")]),
    ("untagged", ["b.jpg"], [msg("user", text("Describe.")), msg("assistant", text("Noise."))],
     [human("Describe."), gpt("Noise.")]),
]
MESSAGE_IMAGES = [[A], [B, C], [], [C, A], [B]]


def test_hf_messages_style_with_image_bytes_from_a_dataset_dict(tmp_path, root, processor):
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    features = datasets.Features({
        "id": datasets.Value("string"), "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)})})
    rows = {"id": [r[0] for r in MESSAGE_ROWS],
            "images": [[{"bytes": FILES[f], "path": None} for f in r[1]] for r in MESSAGE_ROWS],
            "messages": [r[2] for r in MESSAGE_ROWS]}
    train = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ConversionError, match=r"holds the splits \['test', 'train'\]"):
        convert_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
    report = convert_hf(str(tmp_path / "hf"), str(tmp_path / "out"), split="train", max_reject_fraction=0.5)

    expected = [(3, "mismatch", "image_tag_mismatch"), (5, "badrole", "malformed_record")]
    assert rejects(tmp_path / "out") == expected
    assert (report.total, report.written) == (7, 5)
    _, ref = llava_reference(tmp_path, root, [{"id": rid, "image": files, "conversations": convs}
                                              for rid, files, _, convs in MESSAGE_ROWS],
                             source="hf", max_reject_fraction=0.5)
    assert rejects(ref) == expected
    assert_same_dataset(tmp_path / "out", ref, processor, MESSAGE_IMAGES)


def test_hf_parquet_with_image_paths_under_image_root(tmp_path, root, processor, monkeypatch):
    """Path-only images (a parquet directory, string contents): read under image_root with the
    LLaVA converter's checks; nothing touches the network (datasets' own download-count ping)."""
    connections = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: connections.append(a) or 1 / 0)
    for module, name, online in ((datasets.config, "HF_HUB_OFFLINE", False), (huggingface_hub.constants,
                                 "HF_HUB_OFFLINE", False), (datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)):
        monkeypatch.setattr(module, name, online)  # a user's online settings (the suite runs offline)
    rows = [("p1", ["a.png"], "<image>\nWhat?", "Noise."), ("p2", ["b.jpg", "c.png"], "<image> and <image>", "Two."),
            ("gone", ["nope.png"], "<image>\nHi", "Hi"), ("escape", ["../outside.png"], "<image>\nHi", "Hi"),
            ("p3", [], "2+2?", "4")]
    features = datasets.Features({
        "id": datasets.Value("string"), "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})})
    ds = datasets.Dataset.from_dict(
        {"id": [r[0] for r in rows], "images": [r[1] for r in rows],
         "messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for _, _, q, a in rows]},
        features=features)
    assert ds.data.table.column("images").to_pylist()[0] == [{"bytes": None, "path": "a.png"}]  # not embedded
    (tmp_path / "pq" / "data").mkdir(parents=True)
    pq.write_table(ds.data.table, tmp_path / "pq" / "data" / "train-00000-of-00001.parquet")
    report = convert_hf(str(tmp_path / "pq"), str(tmp_path / "out"), image_root=str(root),
                        max_reject_fraction=0.5, num_workers=2)

    assert connections == []
    expected = [(2, "gone", "missing_image"), (3, "escape", "outside_image_root")]
    assert rejects(tmp_path / "out") == expected
    assert report.reasons == {"missing_image": 1, "outside_image_root": 1}
    _, ref = llava_reference(tmp_path, root, [{"id": rid, "image": files, "conversations": [human(q), gpt(a)]}
                                              for rid, files, q, a in rows], source="hf", max_reject_fraction=0.5)
    assert rejects(ref) == expected
    assert_same_dataset(tmp_path / "out", ref, processor, [[A], [B, C], []])
    with pytest.raises(ConversionError, match="missing_image"):  # no image_root: path images cannot be read
        convert_hf(str(tmp_path / "pq"), str(tmp_path / "out2"))


def test_hf_cauldron_texts_layout(tmp_path):
    """The Cauldron's own columns: images + texts [{user, assistant, source}]; its images go
    before the first question (the LLaVA convention for untagged images)."""
    pair = {"user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")}
    ds = datasets.Dataset.from_dict(
        {"images": [[{"bytes": A, "path": None}, {"bytes": C, "path": None}], []],
         "texts": [[{"user": "Same?", "assistant": "No.", "source": "x"}, {"user": "Sure?", "assistant": "Yes.",
                                                                           "source": "x"}],
                   [{"user": "2+2?", "assistant": "4", "source": "x"}]]},
        features=datasets.Features({"images": datasets.List(datasets.Image()), "texts": datasets.List(pair)}))
    ds.save_to_disk(str(tmp_path / "cauldron"))
    report = convert_hf(str(tmp_path / "cauldron"), str(tmp_path / "out"), source="cauldron")
    assert (report.written, report.rejected) == (2, 0)
    got = ArrayRecordExampleSource(str(tmp_path / "out"))
    assert (got[0].id, got[0].images, got[1].images) == ("cauldron-0", [A, C], [])
    assert got[0].turns == [{"role": "user", "content": "<image>\n<image>\nSame?"},
                            {"role": "assistant", "content": "No."},
                            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]


def test_webdataset_two_shards(tmp_path, root, processor):
    def sample(key, record, images=None):
        body = record if isinstance(record, bytes) else json.dumps(record).encode()
        return {"__key__": key, "json": body, **(images or {})}

    shards = [
        [sample("k0", {"id": "w0", "conversations": [human("<image>\nWhat is it?"), gpt("Noise.")]}, {"jpg": B}),
         sample("k1", {"id": "w1", "messages": [msg("user", text("Compare"), IMAGE, IMAGE),
                                                msg("assistant", text("Both."))]}, {"0.png": A, "1.png": C}),
         sample("k2", {"id": "w2", "conversations": [human("<image>\nHi"), gpt("Hi")]}, {"png": CORRUPT})],
        [sample("k3", {"conversations": [human("2+2?"), gpt("4")]}),
         sample("k4", b'{"id": "w4", "conversations": [', {"png": A}),
         sample("k5", {"id": "w5", "messages": [{"role": "user", "content": "<image>\nWhat?"},
                                                {"role": "assistant", "content": "Noise."}]}, {"png": C})]]
    urls = []
    for i, samples in enumerate(shards):
        urls.append(str(tmp_path / f"shard-{i:06d}.tar"))
        with wds.TarWriter(urls[-1]) as writer:
            for s in samples:
                writer.write(s)
    report = convert_webdataset(urls, str(tmp_path / "out"), num_shards=2, max_reject_fraction=0.5)

    assert rejects(tmp_path / "out", "sample") == [(f"{urls[0]}/k2", "w2", "undecodable_image"),
                                                   (f"{urls[1]}/k4", None, "malformed_json")]
    assert (report.total, report.written) == (6, 4)
    _, ref = llava_reference(tmp_path, root, [
        {"id": "w0", "image": "b.jpg", "conversations": [human("<image>\nWhat is it?"), gpt("Noise.")]},
        {"id": "w1", "image": ["a.png", "c.png"], "conversations": [human("Compare\n<image><image>"), gpt("Both.")]},
        {"id": "k3", "conversations": [human("2+2?"), gpt("4")]},  # no id: the sample's key
        {"id": "w5", "image": "c.png", "conversations": [human("<image>\nWhat?"), gpt("Noise.")]}],
        source="webdataset")
    assert_same_dataset(tmp_path / "out", ref, processor, [[B], [A, C], [], [C]])
    # The command line (`data_pipelines.convert --format=webdataset`) writes the same dataset.
    proc = subprocess.run([sys.executable, "-m", "data_pipelines.convert", "--format=webdataset",
                           f"--wds={','.join(urls)}", f"--out={tmp_path / 'cli'}", "--num_shards=2",
                           "--max_reject_fraction=0.5"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "rejected  2 (33.3%)" in proc.stdout and "malformed_json       1" in proc.stdout, proc.stdout
    cli = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert cli["content_hash"] == report.manifest["content_hash"]


def test_webdataset_image_member_rules(tmp_path):
    """Numbered images run 0, 1, ...; a gap is a missing image, an unnumbered and numbered mix or
    another name is refused, a sample without json too (nothing is skipped silently)."""
    convs = json.dumps({"conversations": [human("<image>\nq"), gpt("a")]}).encode()
    url = str(tmp_path / "s.tar")
    with wds.TarWriter(url) as writer:
        writer.write({"__key__": "ok", "json": convs, "0.png": A})
        writer.write({"__key__": "gap", "json": convs, "1.png": A})
        writer.write({"__key__": "mixed", "json": convs, "png": A, "0.png": A})
        writer.write({"__key__": "named", "json": convs, "left.png": A})
        writer.write({"__key__": "nojson", "png": A})
    report = convert_webdataset(url, str(tmp_path / "out"), max_reject_fraction=1.0)
    assert report.written == 1
    assert [(pos.rsplit("/", 1)[1], reason) for pos, _, reason in rejects(tmp_path / "out", "sample")] == [
        ("gap", "missing_image"), ("mixed", "malformed_record"), ("named", "malformed_record"),
        ("nojson", "malformed_record")]
    (tmp_path / "bad.tar").write_bytes(b"not a tar file")
    with pytest.raises(ConversionError, match=r"bad\.tar: not a readable WebDataset tar shard"):
        convert_webdataset([url, str(tmp_path / "bad.tar")], str(tmp_path / "out2"))


def test_webdataset_keys_with_dots_are_one_sample_per_json_file(tmp_path):
    """webdataset groups a shard's files by the name up to the first dot, so `scan.000.json` ...
    `scan.014.json` arrive as one group: each json file is still one sample, its images the files
    named after it. The tar is written file by file (tarfile), so the 15 json files are counted
    by hand, not by the reader under test."""
    import io
    import tarfile

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    url, jsons = str(tmp_path / "dotted.tar"), 0
    with tarfile.open(url, "w") as tar:
        for i in range(15):
            key, image = f"scan.{i:03d}", i % 3 == 0
            convs = [human(("<image>\n" if image else "") + f"q{i}"), gpt(f"a{i}")]
            if i == 9:
                convs = [human(f"<image><image>\nq{i}"), gpt(f"a{i}")]
                add(tar, f"{key}.0.png", A)
                add(tar, f"{key}.1.png", C)
            elif image:
                add(tar, f"{key}.png", A)
            add(tar, f"{key}.json", json.dumps({"conversations": convs}).encode())
            jsons += 1
        add(tar, "loose.7.png", A)  # named after no json: one counted rejection
    report = convert_webdataset(url, str(tmp_path / "out"), max_reject_fraction=0.5)
    assert (report.total, report.written, report.rejected) == (jsons + 1, 15, 1) == (16, 15, 1)
    got = ArrayRecordExampleSource(str(tmp_path / "out"))
    assert [got[i].id for i in range(15)] == [f"scan.{i:03d}" for i in range(15)]
    assert [len(got[i].images) for i in range(15)] == [2 if i == 9 else 1 if i % 3 == 0 else 0 for i in range(15)]
    assert got[9].images == [A, C]
    assert [(pos.rsplit("/", 1)[1], reason) for pos, _, reason in rejects(tmp_path / "out", "sample")] == [
        ("loose", "malformed_record")]


def test_unknown_layout_names_the_dataset_and_its_columns(tmp_path):
    datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).save_to_disk(str(tmp_path / "qa"))
    with pytest.raises(ConversionError, match=r"qa: columns \['question', 'answer'\]: unknown layout"):
        convert_hf(str(tmp_path / "qa"), str(tmp_path / "out"))
    with pytest.raises(ConversionError, match="not a Hugging Face dataset"):
        convert_hf(str(tmp_path), str(tmp_path / "out"))


def test_webdataset_conversion_resumes_after_an_interruption(tmp_path, monkeypatch):
    """A run killed mid-way (here: an interrupt after 3 samples, chunks of 2) and rerun with the
    same shards and arguments resumes after its committed chunk and ends as a fresh run does."""
    url = str(tmp_path / "s.tar")
    with wds.TarWriter(url) as writer:
        for i in range(6):
            convs = [human(f"<image>\nq{i}"), gpt(f"a{i}")]
            writer.write({"__key__": f"k{i}", "json": json.dumps({"conversations": convs}).encode(),
                          "png": CORRUPT if i == 4 else A})
    real_samples, real_call = wds_format.wds_samples, wds_format.WebDatasetReader.convert

    def interrupted(urls):
        for i, item in enumerate(real_samples(urls)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(wds_format, "wds_samples", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_webdataset(url, str(tmp_path / "out"), chunk_size=2, max_reject_fraction=0.5)
    monkeypatch.setattr(wds_format, "wds_samples", real_samples)
    converted = []
    monkeypatch.setattr(wds_format.WebDatasetReader, "convert",
                        lambda self, sample, where: converted.append(where) or real_call(self, sample, where))
    resumed = convert_webdataset(url, str(tmp_path / "out"), chunk_size=2, max_reject_fraction=0.5)
    assert converted == [f"{url}/k{i}" for i in range(2, 6)]  # the committed chunk is not converted again
    fresh = convert_webdataset(url, str(tmp_path / "fresh"), chunk_size=2, max_reject_fraction=0.5)
    assert (resumed.total, resumed.written, resumed.reasons) == (fresh.total, fresh.written, fresh.reasons) == (
        6, 5, {"undecodable_image": 1})
    got, want = ArrayRecordExampleSource(str(tmp_path / "out")), ArrayRecordExampleSource(str(tmp_path / "fresh"))
    assert [got[i] for i in range(len(got))] == [want[i] for i in range(len(want))]
    assert rejects(tmp_path / "out", "sample") == rejects(tmp_path / "fresh", "sample") == [
        (f"{url}/k4", None, "undecodable_image")]
