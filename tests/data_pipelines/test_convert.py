"""LLaVA JSON / chat JSONL conversion: exact rejects, nothing good lost, CLI exit codes."""
import doctest
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines.conversion import ConversionError, checks, convert_jsonl, convert_llava, driver, read_llava
from data_pipelines.conversion import webdataset as wds_format
from data_pipelines.records import ArrayRecordExampleSource

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def save_image(path, fmt: str, seed: int, size=(12, 9)) -> bytes:
    """Writes a small random image; returns the file's bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture
def llava(tmp_path):
    """A LLaVA dataset: 30 good records (multi-image, text-only, untagged image, no id, JPEG,
    system turn) and 3 bad ones (missing image, corrupt image, tag/image mismatch)."""
    root = tmp_path / "images"
    img = {name: save_image(root / name, fmt, seed) for seed, (name, fmt) in enumerate(
        [("coco/a.png", "PNG"), ("coco/b.jpg", "JPEG"), ("ocr/c.png", "PNG")])}
    good_png = (root / "coco/a.png").read_bytes()
    (root / "bad").mkdir()
    (root / "bad/corrupt.png").write_bytes(good_png[:len(good_png) // 2])  # truncated: open works, load fails
    records = [
        {"id": "single", "image": "coco/a.png",
         "conversations": [human("<image>\nWhat is it?"), gpt("Noise.")]},
        {"id": "multi", "image": ["coco/b.jpg", "ocr/c.png"],
         "conversations": [human("Compare <image> and\n<image>"), gpt("Both noise."),
                           human("Sure?"), gpt("Yes.")]},
        {"id": "text", "conversations": [{"from": "system", "value": "Be terse."},
                                         human("2+2?"), gpt("4")]},
        {"id": "untagged", "image": "ocr/c.png", "conversations": [human("Read it."), gpt("abc")]},
        {"id": "missing", "image": "coco/nope.png", "conversations": [human("<image>\nHi"), gpt("Hi")]},
        {"id": "corrupt", "image": "bad/corrupt.png", "conversations": [human("<image>\nHi"), gpt("Hi")]},
        {"id": "mismatch", "image": "coco/a.png",
         "conversations": [human("<image> vs <image>"), gpt("Same.")]},
        {"image": "coco/b.jpg", "conversations": [human("<image>\nNo id."), gpt("Fine.")]},
    ]
    records += [{"id": 1000 + i, "image": "coco/a.png", "conversations": [human(f"<image>\nq{i}"), gpt(f"a{i}")]}
                for i in range(25)]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path, root, img


def test_llava_acceptance_exact_rejects_and_all_good_records_kept(llava, tmp_path):
    path, root, img = llava
    out = tmp_path / "out"
    report = convert_llava(str(path), str(root), str(out), num_shards=3)  # default max_reject_fraction 0.1
    assert (report.total, report.written, report.rejected) == (33, 30, 3)
    assert report.reasons == {"missing_image": 1, "undecodable_image": 1, "image_tag_mismatch": 1}
    rejects = read_jsonl(out / "rejects.jsonl")
    assert [(r["index"], r["id"], r["reason"]) for r in rejects] == [
        (4, "missing", "missing_image"), (5, "corrupt", "undecodable_image"),
        (6, "mismatch", "image_tag_mismatch")]
    assert str(root / "coco/nope.png") in rejects[0]["detail"]
    assert str(root / "bad/corrupt.png") in rejects[1]["detail"]
    assert "2 <image> tag(s) but 1 image(s)" in rejects[2]["detail"]

    source = ArrayRecordExampleSource(str(out))
    got = [source[i] for i in range(len(source))]
    assert [ex.id for ex in got] == ["single", "multi", "text", "untagged", "llava-7"] + [
        str(1000 + i) for i in range(25)]
    assert all(ex.source == "llava" for ex in got)
    single, multi, text, untagged, no_id = got[:5]
    assert single.turns == [{"role": "user", "content": "<image>\nWhat is it?"},
                            {"role": "assistant", "content": "Noise."}]
    assert single.images == [img["coco/a.png"]]
    assert multi.turns == [{"role": "user", "content": "Compare <image> and\n<image>"},
                           {"role": "assistant", "content": "Both noise."},
                           {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    assert multi.images == [img["coco/b.jpg"], img["ocr/c.png"]]
    assert text.turns == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]
    assert text.images == []
    assert untagged.turns[0] == {"role": "user", "content": "<image>\nRead it."}  # LLaVA convention
    assert untagged.images == [img["ocr/c.png"]]
    assert no_id.images == [img["coco/b.jpg"]]
    assert all(ex.images == [img["coco/a.png"]] and ex.turns[1]["content"] == f"a{i}"
               for i, ex in enumerate(got[5:]))
    assert report.manifest["num_records"] == 30 and report.manifest["sources"] == {"llava": 30}
    assert [s["num_records"] for s in report.manifest["shards"]] == [10, 10, 10]


def test_llava_malformed_records_are_counted_by_reason(tmp_path):
    root = tmp_path / "images"
    save_image(root / "a.png", "PNG", 0)
    ok = [human("<image>\nq"), gpt("a")]
    records = [
        {"id": "good", "image": "a.png", "conversations": ok},
        "not an object",
        {"id": "no-convs", "image": "a.png"},
        {"id": "empty-convs", "conversations": []},
        {"id": "bad-role", "conversations": [{"from": "bot", "value": "hi"}]},
        {"id": "empty-value", "conversations": [human("  "), gpt("a")]},
        {"id": "bad-image-field", "image": 7, "conversations": ok},
        {"id": "tag-in-gpt", "image": "a.png", "conversations": [human("<image>"), gpt("<image>")]},
        {"id": "tag-no-image", "conversations": ok},
        {"id": "good", "image": "a.png", "conversations": ok},
        {"id": "good-2", "image": "a.png", "conversations": ok},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    report = convert_llava(str(path), str(root), str(tmp_path / "out"), max_reject_fraction=1.0, num_workers=3)
    assert (report.total, report.written, report.rejected) == (11, 2, 9)
    assert report.reasons == {"malformed_record": 6, "image_tag_mismatch": 2, "duplicate_record": 1}
    rejects = read_jsonl(tmp_path / "out/rejects.jsonl")
    assert [(r["index"], r["id"], r["reason"]) for r in rejects] == [
        (1, None, "malformed_record"), (2, "no-convs", "malformed_record"),
        (3, "empty-convs", "malformed_record"), (4, "bad-role", "malformed_record"),
        (5, "empty-value", "malformed_record"), (6, "bad-image-field", "malformed_record"),
        (7, "tag-in-gpt", "image_tag_mismatch"), (8, "tag-no-image", "image_tag_mismatch"),
        (9, "good", "duplicate_record")]
    assert "unknown role 'from'='bot'" in rejects[3]["detail"]
    source = ArrayRecordExampleSource(str(tmp_path / "out"))
    assert [source[i].id for i in range(len(source))] == ["good", "good-2"]


def test_too_many_rejects_raises_naming_fraction_and_threshold(llava, tmp_path):
    path, root, _ = llava
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"rejected 3 of 33 records \(fraction 0\.0909\) "
                                              r"> max_reject_fraction 0\.05") as e:
        convert_llava(str(path), str(root), str(out), max_reject_fraction=0.05)
    assert e.value.report.rejected == 3
    assert len(read_jsonl(out / "rejects.jsonl")) == 3
    assert sorted(os.listdir(out)) == ["rejects.jsonl"]  # no half-usable dataset left behind


def test_malformed_top_level_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"id": "a", ')
    with pytest.raises(ConversionError, match=f"{bad}: not valid JSON"):
        convert_llava(str(bad), str(tmp_path), str(tmp_path / "out"))
    bad.write_text('{"id": "a"}')
    with pytest.raises(ConversionError, match=f"{bad}: expected a JSON list .* got a JSON dict"):
        convert_llava(str(bad), str(tmp_path), str(tmp_path / "out"))


def write_chat_jsonl(path):
    lines = [
        json.dumps({"id": "c1", "messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}),
        json.dumps({"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a"}], "source": "math"}),
        '{"id": "broken", "messages": [',
        "",
        json.dumps({"id": "c4", "messages": [{"role": "human", "content": "hi"}]}),
        json.dumps({"id": "c5", "messages": [{"role": "user", "content": "look <image>"}]}),
    ] + [json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": f"u{i}"},
                                                 {"role": "assistant", "content": f"a{i}"}]})
         for i in range(4)]
    path.write_text("\n".join(lines) + "\n")


def test_jsonl_conversion_with_malformed_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_chat_jsonl(path)
    report = convert_jsonl(str(path), str(tmp_path / "out"), num_shards=2, max_reject_fraction=0.5)
    assert (report.total, report.written, report.rejected) == (9, 6, 3)
    assert report.reasons == {"malformed_json": 1, "malformed_record": 1, "image_tag_mismatch": 1}
    rejects = read_jsonl(tmp_path / "out/rejects.jsonl")
    assert [(r["line"], r["id"], r["reason"]) for r in rejects] == [
        (3, None, "malformed_json"), (5, "c4", "malformed_record"), (6, "c5", "image_tag_mismatch")]
    source = ArrayRecordExampleSource(str(tmp_path / "out"))
    got = [source[i] for i in range(len(source))]
    assert [(ex.id, ex.source) for ex in got] == [("c1", "text"), ("text-2", "math")] + [
        (f"t{i}", "text") for i in range(4)]
    assert got[1].turns == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                            {"role": "assistant", "content": "a"}]
    assert all(ex.images == [] for ex in got)
    assert report.manifest["sources"] == {"math": 1, "text": 5}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data_pipelines.convert", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_fails_past_max_reject_fraction_and_succeeds_otherwise(llava, tmp_path):
    path, root, _ = llava
    out = tmp_path / "out"
    proc = run_cli("--format=llava", f"--json={path}", f"--image_root={root}", f"--out={out}",
                   "--max_reject_fraction=0.05")
    assert proc.returncode != 0
    assert "rejected 3 of 33 records (fraction 0.0909) > max_reject_fraction 0.05" in proc.stderr
    assert "missing_image" in proc.stdout and len(read_jsonl(out / "rejects.jsonl")) == 3
    assert not (out / "manifest.json").exists()

    chat = tmp_path / "chat.jsonl"
    write_chat_jsonl(chat)
    proc = run_cli("--format=jsonl", f"--jsonl={chat}", f"--out={tmp_path / 'text'}",
                   "--max_reject_fraction=0.4", "--source=chat")
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert ["total", "9"] in lines and ["written", "6"] in lines and ["rejected", "3", "(33.3%)"] in lines
    assert ["malformed_json", "1"] in lines
    assert read_jsonl(tmp_path / "text/rejects.jsonl")[0]["reason"] == "malformed_json"
    assert json.loads((tmp_path / "text/manifest.json").read_text())["sources"] == {"chat": 5, "math": 1}


def test_records_that_share_an_id_are_kept_under_unique_ids(tmp_path):
    """LLaVA-style data asks several questions about one image under one id: all kept (ids made
    unique, counted); only a byte-identical repeat is a duplicate. tools.evaluate's reader
    (read_llava) applies the same rule."""
    root = tmp_path / "images"
    save_image(root / "a.png", "PNG", 0)
    save_image(root / "b.png", "PNG", 1)
    records = [{"id": "000123", "image": "a.png", "conversations": [human("<image>\nWhat colour?"), gpt("Red.")]},
               {"id": "000123", "image": "a.png", "conversations": [human("<image>\nHow many?"), gpt("Two.")]},
               {"id": "000456", "image": "b.png", "conversations": [human("<image>\nShape?"), gpt("A disc.")]},
               {"id": "000123", "image": "a.png", "conversations": [human("<image>\nWhere?"), gpt("Left.")]},
               {"id": "000456", "image": "b.png", "conversations": [human("<image>\nSize?"), gpt("Small.")]},
               {"id": "000789", "conversations": [human("2+2?"), gpt("4")]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    report = convert_llava(str(path), str(root), str(tmp_path / "all"))  # the default max_reject_fraction
    assert (report.total, report.written, report.rejected, report.adjusted) == (6, 6, 0, {"id_made_unique": 3})
    path.write_text(json.dumps(records + [records[1]]))  # record 6 repeats record 1 byte for byte
    report = convert_llava(str(path), str(root), str(tmp_path / "out"), max_reject_fraction=0.5)
    assert (report.total, report.written, report.rejected) == (7, 6, 1)
    assert report.reasons == {"duplicate_record": 1} and report.adjusted == {"id_made_unique": 3}
    assert [(r["index"], r["id"], r["reason"]) for r in read_jsonl(tmp_path / "out/rejects.jsonl")] == \
        [(6, "000123", "duplicate_record")]
    assert "  kept, adjusted  3" in report.summary().splitlines()
    source = ArrayRecordExampleSource(str(tmp_path / "out"))
    got = [source[i] for i in range(len(source))]
    assert [ex.id for ex in got] == ["000123", "000123#2", "000456", "000123#3", "000456#2", "000789"]
    assert [ex.turns[-1]["content"] for ex in got] == [r["conversations"][-1]["value"] for r in records]
    examples, rejects = read_llava(str(path), str(root))
    assert [ex.id for ex in examples] == [ex.id for ex in got]
    assert [(r["index"], r["reason"]) for r in rejects] == [(6, "duplicate_record")]


def test_an_answer_before_any_question_is_never_trained(tmp_path):
    """A leading assistant turn is dropped and counted (LLaVA's preprocessing drops a leading
    non-human turn); a record whose only answer comes before its question is rejected."""
    root = tmp_path / "images"
    save_image(root / "a.png", "PNG", 0)
    records = [{"id": "greet", "image": "a.png", "conversations": [
                   gpt("Hello! Send me a picture."), human("<image>\nWhat colour?"), gpt("Red.")]},
               {"id": "backwards", "conversations": [gpt("Paris."), human("Capital of France?")]},
               {"id": "ok", "conversations": [{"from": "system", "value": "Be brief."}, human("Hi?"), gpt("Hi.")]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    report = convert_llava(str(path), str(root), str(tmp_path / "out"), max_reject_fraction=0.5)
    assert (report.written, report.reasons, report.adjusted) == (2, {"no_answer": 1}, {"leading_answer_dropped": 1})
    source = ArrayRecordExampleSource(str(tmp_path / "out"))
    assert source[0].turns == [{"role": "user", "content": "<image>\nWhat colour?"},
                               {"role": "assistant", "content": "Red."}]
    assert source[1].turns[0] == {"role": "system", "content": "Be brief."}
    # The chat JSONL converter applies the same rule.
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "messages": m}) for i, m in enumerate([
        [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "q"},
         {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q"}]])) + "\n")
    report = convert_jsonl(str(jsonl), str(tmp_path / "out2"), max_reject_fraction=0.5)
    assert (report.written, report.reasons, report.adjusted) == (1, {"no_answer": 1}, {"leading_answer_dropped": 1})


def test_image_paths_that_leave_the_image_root_are_refused_unread(tmp_path):
    """../, absolute paths, a symlinked file and a symlinked directory leading outside
    --image_root are rejected (outside_image_root) and no byte of the outside file reaches any
    log; a symlink that stays inside is fine, and the opt-in flag accepts outside paths.
    tools.evaluate's reader (read_llava) applies the same rule."""
    root, outside = tmp_path / "images", tmp_path / "private"
    save_image(root / "in.png", "PNG", 0)
    secret = save_image(outside / "secret.png", "PNG", 1)
    (outside / "passwd").write_text("root:x:0:0:SECRET:/root:/bin/bash\n")
    (root / "link_out.png").symlink_to(outside / "secret.png")
    (root / "dir_out").symlink_to(outside)
    (root / "link_in.png").symlink_to(root / "in.png")
    q = [human("<image>\nWhat?"), gpt("Noise.")]
    paths = ["in.png", "../private/secret.png", str(outside / "secret.png"), "link_out.png", "dir_out/secret.png",
             "../private/passwd", "link_in.png"]
    records = [{"id": f"r{i}", "image": p, "conversations": q} for i, p in enumerate(paths)]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    report = convert_llava(str(tmp_path / "llava.json"), str(root), str(tmp_path / "out"), max_reject_fraction=1.0)
    assert (report.written, report.reasons) == (2, {"outside_image_root": 5})
    log = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert [r["id"] for r in read_jsonl(tmp_path / "out/rejects.jsonl")] == ["r1", "r2", "r3", "r4", "r5"]
    assert "SECRET" not in log and "root:x" not in log and repr(secret[:8])[2:-1] not in log
    _, rejects = read_llava(str(tmp_path / "llava.json"), str(root))
    assert [r["reason"] for r in rejects] == ["outside_image_root"] * 5
    allowed = convert_llava(str(tmp_path / "llava.json"), str(root), str(tmp_path / "allowed"), max_reject_fraction=1.0,
                            allow_outside_image_root=True)
    assert (allowed.written, allowed.reasons) == (6, {"undecodable_image": 1})  # passwd is not an image
    written = ArrayRecordExampleSource(str(tmp_path / "allowed"))
    assert written[1].images == [secret]


def test_decompression_bombs_are_refused_from_their_header(tmp_path):
    """A 12000 x 12000 PNG of a few KB (144 Mpx) is rejected (image_too_large) before decoding,
    under the default 64 Mpx limit; the limit is a flag (--max_image_pixels)."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("1", (12000, 12000)).save(root / "bomb.png")
    assert (root / "bomb.png").stat().st_size < 200_000
    save_image(root / "small.png", "PNG", 0)  # 12 x 9 = 108 pixels
    q = [human("<image>\nWhat?"), gpt("Noise.")]
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "bomb", "image": "bomb.png", "conversations": q},
                                                     {"id": "small", "image": "small.png", "conversations": q}]))
    report = convert_llava(str(tmp_path / "llava.json"), str(root), str(tmp_path / "out"), max_reject_fraction=1.0)
    assert (report.written, report.reasons) == (1, {"image_too_large": 1})
    assert "12000 x 12000 = 144.0 Mpx" in read_jsonl(tmp_path / "out/rejects.jsonl")[0]["detail"]
    proc = run_cli("--format=llava", f"--json={tmp_path / 'llava.json'}", f"--image_root={root}",
                   f"--out={tmp_path / 'cli'}", "--max_image_pixels=100", "--max_reject_fraction=1.0")
    assert proc.returncode == 0 and "image_too_large      2" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("module", [checks, driver, wds_format])
def test_the_worked_examples_in_the_conversion_docstrings(module):
    """The shared checks' and the driver's examples are executed, so they cannot go stale."""
    results = doctest.testmod(module)
    assert results.attempted > 0 and results.failed == 0
