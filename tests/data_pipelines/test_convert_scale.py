"""LLaVA conversion at scale: streamed input, N worker processes, resume after a kill, memory.

One 50,000-record LLaVA JSON (text-heavy, a few tiny shared images, a handful of bad records,
ids shared by three records each, byte-identical repeats) is converted once per code path in a
module fixture: 1 process in a fresh subprocess (its peak RSS measured, as for a 5,000-record
head of the same file), 2 processes in-process, and the old in-memory reading (`json.load` +
per-record `llava_example`) as the outside reference. The tests compare those results.
"""
import collections
import functools
import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from data_pipelines.conversion import ConversionError, convert_jsonl, convert_llava, read_llava
from data_pipelines.conversion.checks import Identity, ImagePolicy, Reject
from data_pipelines.conversion.llava import llava_example
from data_pipelines.records import ArrayRecordExampleSource, read_manifest
from tests.data_pipelines.test_convert import write_chat_jsonl

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 50_000
BAD = {100: "missing_image", 200: "malformed_record", 300: "malformed_record", 400: "image_tag_mismatch",
       700: "malformed_record", 9_000: "duplicate_record", 45_000: "duplicate_record"}
# A fresh process converting with 1 process (in-process): its own peak RSS, VmHWM in KiB (not
# ru_maxrss: Linux carries the parent's over fork + exec, and pytest's is larger).
RSS_SCRIPT = """
import json, sys, time
from data_pipelines.conversion import convert_llava
start = time.perf_counter()
report = convert_llava(sys.argv[1], sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - start
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"rss_kib": hwm, "total": report.total, "seconds": seconds}))
"""


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (9, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_records(n: int) -> list:
    """n records: ids shared by 3 consecutive records (kept as ID, ID#2, ID#3), every 25th with an
    image, every 997th without an id, one id that is literally "ID#2", and the BAD ones."""
    records = []
    for i in range(n):
        question = f"Question {i}: " + "what does the text say about it " * 3
        rec = {"id": f"{i // 3:07d}", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": f"Answer {i}. " + "It says so. " * 8}]}
        if i % 25 == 0:
            rec["image"] = f"img/{i % 4}.png"
            rec["conversations"][0]["value"] = "<image>\n" + question
        if i % 997 == 0:
            del rec["id"]
        records.append(rec)
    records[600]["id"] = "0000200#2"  # then record 602, the second "0000200", becomes "0000200#3"
    records[100]["image"] = "img/nope.png"
    records[200]["conversations"] = []
    records[300] = "not an object"
    records[400]["conversations"][0]["value"] = "<image> and <image>"
    records[700]["id"] = [7]
    records[9_000] = records[8_999]    # byte-identical repeat in the same chunk
    records[45_000] = records[7]       # ... and of a record committed chunks earlier
    return records[:n]


@functools.lru_cache(maxsize=None)
def read_all(out_dir: str) -> list:
    """Sorted (id, turns, image digests) of every record of a dataset (read once per module)."""
    source = ArrayRecordExampleSource(out_dir)
    return sorted((ex.id, json.dumps(ex.turns), tuple(hashlib.sha1(im).hexdigest() for im in ex.images))
                  for ex in source.__getitems__(list(range(len(source)))))


def read_rejects(out_dir: str) -> list:
    return [json.loads(line) for line in open(os.path.join(out_dir, "rejects.jsonl"))]


def peak_rss(json_path, root, out_dir) -> dict:
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(json_path), str(root), str(out_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    root = tmp / "images"
    (root / "img").mkdir(parents=True)
    for k in range(4):
        (root / f"img/{k}.png").write_bytes(png(k))
    records = make_records(N)
    path, head = tmp / "llava.json", tmp / "head.json"
    path.write_text(json.dumps(records))
    head.write_text(json.dumps(records[:N // 10]))
    rss_small = peak_rss(head, root, tmp / "head")
    rss_large = peak_rss(path, root, tmp / "one")  # this dataset is also the 1-process result
    start = time.perf_counter()
    two = convert_llava(str(path), str(root), str(tmp / "two"), num_processes=2)
    two_seconds = time.perf_counter() - start
    print(f"\npeak RSS of a 1-process conversion: {rss_small['rss_kib'] / 1024:.1f} MiB at {N // 10} records "
          f"({rss_small['seconds']:.1f} s), {rss_large['rss_kib'] / 1024:.1f} MiB at {N} records "
          f"({rss_large['seconds']:.1f} s); 2 processes: {two_seconds:.1f} s")
    return {"tmp": tmp, "root": root, "path": path, "records": records, "rss": (rss_small, rss_large),
            "one": tmp / "one", "two": tmp / "two", "two_report": two}


def test_two_processes_give_the_records_and_rejects_of_one_and_of_the_in_memory_reader(scale):
    """Same (id, turns, image bytes) set and same rejects for 1 and 2 processes, and the same
    as the old path: the whole JSON in memory (json.load) and `llava_example` record by record."""
    one, two = read_all(str(scale["one"])), read_all(str(scale["two"]))
    assert len(one) == N - len(BAD) and one == two

    with open(scale["path"]) as f:
        records = json.load(f)
    policy, identity, kept, rejected = ImagePolicy(str(scale["root"])), Identity(), [], []
    for i, rec in enumerate(records):
        try:
            ex, _ = llava_example(rec, i, policy, "llava")
            ex, _ = identity.admit(ex)
        except Reject as r:
            rejected.append((i, r.reason))
            continue
        kept.append((ex.id, json.dumps(ex.turns), tuple(hashlib.sha1(im).hexdigest() for im in ex.images)))
    assert one == sorted(kept)
    assert rejected == sorted(BAD.items())
    for out in (scale["one"], scale["two"]):
        assert [(r["index"], r["reason"]) for r in read_rejects(str(out))] == rejected  # in input order

    ids = collections.Counter(rid for rid, _, _ in one)
    assert max(ids.values()) == 1 and {"0000200#2", "0000200#3", "0000200", "llava-997", "0000003#3"} <= set(ids)
    report = scale["two_report"]
    assert (report.total, report.written, report.reasons) == (
        N, N - len(BAD), {"duplicate_record": 2, "image_tag_mismatch": 1, "malformed_record": 3, "missing_image": 1})
    manifest = read_manifest(str(scale["two"]))
    assert manifest["num_records"] == N - len(BAD) and len(manifest["groups"]) == len(manifest["shards"]) >= 6
    assert sorted(os.listdir(scale["two"])) == sorted([s["file"] for s in manifest["shards"]] +
                                                      ["manifest.json", "rejects.jsonl"])  # no state left



def test_peak_rss_does_not_grow_with_the_input(scale):
    """Peak RSS of a fresh process converting 50,000 records is within 20% of 5,000 records'
    (only the identity state, ids and 16-byte digests, grows with the input)."""
    small, large = scale["rss"]
    assert small["total"] == N // 10 and large["total"] == N
    print(f"peak RSS {small['rss_kib'] / 1024:.1f} MiB (5k) vs {large['rss_kib'] / 1024:.1f} MiB (50k)")
    assert large["rss_kib"] <= 1.2 * small["rss_kib"], (small, large)


def test_killed_conversion_resumes_and_converts_every_record_exactly_once(scale):
    """SIGKILL (parent and workers) once some chunks are committed; a rerun with other arguments
    is refused naming the directory; one with the same arguments keeps the committed chunks,
    redoes the rest, and gives the uninterrupted result: every record exactly once."""
    out = scale["tmp"] / "killed"
    cmd = [sys.executable, "-m", "data_pipelines.convert", "--format=llava", f"--json={scale['path']}",
           f"--image_root={scale['root']}", f"--out={out}", "--num_processes=2", "--chunk_size=2000"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + 120
    try:
        while len(glob.glob(str(out / ".conversion/data-w*-c*.json"))) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, "finished or stuck before the kill"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    markers = glob.glob(str(out / ".conversion/data-w*-c*.json"))
    committed = {}  # shard file -> mtime of the chunks committed before the kill
    for marker in markers:
        for shard in json.load(open(marker))["shards"]:
            committed[shard["file"]] = os.stat(out / shard["file"]).st_mtime_ns
    assert len(markers) >= 4 and len(committed) == len(markers) < 26  # 2 x 13 chunks in all

    with pytest.raises(ConversionError, match=f"{out} holds an unfinished conversion .*num_processes"):
        convert_llava(str(scale["path"]), str(scale["root"]), str(out), num_processes=1, chunk_size=2000)
    report = convert_llava(str(scale["path"]), str(scale["root"]), str(out), num_processes=2, chunk_size=2000)
    assert {f: os.stat(out / f).st_mtime_ns for f in committed} == committed  # kept, not redone
    got = read_all(str(out))
    assert collections.Counter(rid for rid, _, _ in got) == collections.Counter(rid for rid, _, _ in read_all(
        str(scale["two"])))
    assert got == read_all(str(scale["one"]))
    assert (report.total, report.written, report.rejected) == (N, N - len(BAD), len(BAD))
    assert read_manifest(str(out))["num_records"] == N - len(BAD)
    assert read_rejects(str(out)) == read_rejects(str(scale["one"]))
    assert not (out / ".conversion").exists()


def test_invalid_json_mid_file_and_a_non_list_name_the_file(tmp_path):
    """Streaming finds invalid JSON only when it gets there: the error names the file and the
    record index, after chunks were committed by 2 workers, and leaves no partial dataset."""
    good = [{"id": i, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(1000)]
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(good)[:-1] + ', {"id": "x", "conversations": [}]')
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=rf"{bad}: not valid JSON \(.*\) at record index 1000 "):
        convert_llava(str(bad), str(tmp_path), str(out), num_processes=2, chunk_size=100)
    assert os.listdir(out) == []
    with pytest.raises(ConversionError, match=rf"{bad}: not valid JSON .* at record index 1000 "):
        read_llava(str(bad), str(tmp_path))  # streamed too
    bad.write_text(json.dumps(good))
    examples, rejects = read_llava(str(bad), str(tmp_path))
    assert [ex.id for ex in examples] == [str(i) for i in range(1000)] and rejects == []
    for text, kind in (('{"id": "a"}', "dict"), ('  "text"', "str"), ("12", "number")):
        bad.write_text(text)
        with pytest.raises(ConversionError, match=f"{bad}: expected a JSON list .* got a JSON {kind}"):
            convert_llava(str(bad), str(tmp_path), str(out), num_processes=2)
    bad.write_text("")
    with pytest.raises(ConversionError, match=f"{bad}: not valid JSON \\(empty file\\)"):
        convert_llava(str(bad), str(tmp_path), str(out))


def test_jsonl_with_two_processes_equals_one(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_chat_jsonl(path)
    one = convert_jsonl(str(path), str(tmp_path / "one"), max_reject_fraction=0.5)
    two = convert_jsonl(str(path), str(tmp_path / "two"), max_reject_fraction=0.5, num_processes=2, chunk_size=2)
    assert (two.total, two.written, two.reasons) == (one.total, one.written, one.reasons)
    assert read_all(str(tmp_path / "two")) == read_all(str(tmp_path / "one"))
    assert read_rejects(str(tmp_path / "two")) == read_rejects(str(tmp_path / "one"))
