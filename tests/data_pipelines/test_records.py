"""Example encoding, ShardedWriter manifests and ArrayRecordExampleSource read-back."""
import hashlib
import json
import os
import pickle

import grain
import msgpack
import pytest

from data_pipelines.records import (
    SCHEMA_VERSION,
    ArrayRecordExampleSource,
    Example,
    ShardedWriter,
    decode_example,
    encode_example,
    read_manifest,
)


def make_examples(n: int) -> list[Example]:
    """Text-only, one-image and two-image examples over two sources; binary image payloads."""
    out = []
    for i in range(n):
        k = i % 3
        user = "".join(f"<image>\nview {j} " for j in range(k)) + f"question {i} é ✓"
        out.append(Example(f"ex-{i}", "vqa" if i % 2 else "text",
                           [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": user},
                            {"role": "assistant", "content": f"answer {i}\x00"}],
                           [bytes([i, j]) * 50 + bytes(range(256)) for j in range(k)]))
    return out


def write(out_dir, examples, num_shards=1) -> dict:
    with ShardedWriter(str(out_dir), num_shards=num_shards) as writer:
        for ex in examples:
            writer.write(ex)
    return writer.close()


def test_encode_decode_round_trip_is_exact_and_deterministic():
    for ex in make_examples(6):
        data = encode_example(ex)
        assert encode_example(ex) == data
        back = decode_example(data)
        assert back == ex and type(back.images[0] if back.images else b"") is bytes


def test_decode_errors_name_the_problem():
    data = encode_example(make_examples(1)[0])
    with pytest.raises(ValueError, match="not a valid encoded Example"):
        decode_example(data[:-5])
    obj = msgpack.unpackb(data)
    obj["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match=f"'ex-0' has schema version {SCHEMA_VERSION + 1}"):
        decode_example(msgpack.packb(obj))
    del obj["source"]
    with pytest.raises(ValueError, match="expected fields"):
        decode_example(msgpack.packb(obj))


@pytest.mark.parametrize("turns, images, match", [
    ([{"role": "user", "content": "<image> <image>"}], [b"x"], "2 <image> tag.* but 1 image"),
    ([{"role": "user", "content": "hi"}], [b"x"], "0 <image> tag.* but 1 image"),
    ([{"role": "assistant", "content": "<image>"}], [b"x"], r"turn 0 \(assistant\) contains <image>"),
    ([{"role": "bot", "content": "hi"}], [], "turn 0 has role 'bot'"),
    ([{"role": "user", "content": "hi", "extra": 1}], [], "exactly the keys"),
    ([], [], "turns must be a non-empty list"),
    ([{"role": "user", "content": "<image>"}], ["not bytes"], "images must be a list of bytes"),
])
def test_encode_rejects_invalid_examples(turns, images, match):
    with pytest.raises(ValueError, match=match) as e:
        encode_example(Example("bad-1", "vqa", turns, images))
    assert "'bad-1'" in str(e.value)


def test_manifest_counts_bytes_and_hash(tmp_path):
    examples = make_examples(7)
    manifest = write(tmp_path / "a", examples)
    encoded = [encode_example(ex) for ex in examples]
    assert manifest == read_manifest(str(tmp_path / "a"))
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["num_records"] == 7
    assert manifest["num_bytes"] == sum(map(len, encoded))
    assert manifest["sources"] == {"text": 4, "vqa": 3}
    assert manifest["shards"] == [{"file": "data-00000-of-00001.array_record", "num_records": 7,
                                   "num_bytes": sum(map(len, encoded))}]
    assert manifest["content_hash"] == hashlib.sha256(b"".join(encoded)).hexdigest()
    # Stable across re-writes (same directory, another directory, another shard count).
    assert write(tmp_path / "a", examples) == manifest
    assert write(tmp_path / "b", examples)["content_hash"] == manifest["content_hash"]
    assert write(tmp_path / "c", examples, num_shards=3)["content_hash"] == manifest["content_hash"]
    assert write(tmp_path / "d", examples[::-1])["content_hash"] != manifest["content_hash"]


def test_three_shards_read_back_everything_in_write_order(tmp_path):
    examples = make_examples(10)
    manifest = write(tmp_path, examples, num_shards=3)
    assert [s["file"] for s in manifest["shards"]] == [f"data-0000{i}-of-00003.array_record" for i in range(3)]
    assert [s["num_records"] for s in manifest["shards"]] == [4, 3, 3]
    assert sorted(os.listdir(tmp_path)) == sorted([s["file"] for s in manifest["shards"]] + ["manifest.json"])
    source = ArrayRecordExampleSource(str(tmp_path))
    assert len(source) == 10
    assert [source[i] for i in range(10)] == examples
    assert source[-1] == examples[-1]
    assert source.__getitems__([7, 0, 5]) == [examples[7], examples[0], examples[5]]
    assert list(grain.MapDataset.source(source)) == examples
    assert [source[i] for i in range(10)] == [pickle.loads(pickle.dumps(source))[i] for i in range(10)]
    with pytest.raises(IndexError, match=r"index 10 out of range .*\(10 records\)"):
        source[10]


def test_more_shards_than_records_and_stale_shards_removed(tmp_path):
    write(tmp_path, make_examples(5), num_shards=4)
    examples = make_examples(2)
    manifest = write(tmp_path, examples, num_shards=3)
    assert [s["num_records"] for s in manifest["shards"]] == [1, 1, 0]
    assert sorted(os.listdir(tmp_path)) == sorted([s["file"] for s in manifest["shards"]] + ["manifest.json"])
    source = ArrayRecordExampleSource(str(tmp_path))
    assert [source[i] for i in range(len(source))] == examples


def test_duplicate_id_raises_and_leaves_no_dataset(tmp_path):
    examples = make_examples(3)
    with pytest.raises(ValueError, match="duplicate example id 'ex-1'.*record 1 already has it"):
        with ShardedWriter(str(tmp_path), num_shards=2) as writer:
            for ex in examples + [examples[1]]:
                writer.write(ex)
    assert os.listdir(tmp_path) == []


def test_read_manifest_names_missing_shard_and_bad_version(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        read_manifest(str(tmp_path))
    write(tmp_path, make_examples(4), num_shards=2)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(manifest, schema_version=99)))
    with pytest.raises(ValueError, match="schema_version 99, this code reads version 1"):
        ArrayRecordExampleSource(str(tmp_path))
    path.write_text(json.dumps(manifest))
    os.remove(tmp_path / "data-00001-of-00002.array_record")
    with pytest.raises(FileNotFoundError, match="shard 'data-00001-of-00002.array_record', which is missing"):
        read_manifest(str(tmp_path))
