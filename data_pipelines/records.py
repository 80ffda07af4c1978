"""The training record: one chat `Example`, stored as msgpack in sharded ArrayRecord files.

A dataset directory holds `{name}-{i:05d}-of-{n:05d}.array_record` shards and a
`manifest.json`. `ShardedWriter` deals records round-robin over the shards (record k goes
to shard k % n) and `ArrayRecordExampleSource` undoes that, so index k reads the k-th
record written whatever the number of shards. A manifest may also list several such
round-robin groups one after the other ("groups": shards per group; what the chunked,
multi-process converter writes, one group per committed chunk): index k then reads the
k-th record of the groups' concatenation.

    with ShardedWriter("/data/vqa", num_shards=4) as writer:
        for ex in examples:
            writer.write(ex)
    source = ArrayRecordExampleSource("/data/vqa")      # a Grain RandomAccessDataSource
    dataset = grain.MapDataset.source(source).shuffle(seed=0)

An `Example` is validated whenever it is encoded or decoded (`check_example`): roles are
system / user / assistant, and the `<image>` tags (user turns only) match the images 1:1.

>>> ex = Example("a1", "caption", [{"role": "user", "content": "<image>\\nDescribe."},
...                                {"role": "assistant", "content": "A cat."}], [b"PNG..."])
>>> decode_example(encode_example(ex)) == ex
True
>>> decode_example(encode_example(ex)[:-3])  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: not a valid encoded Example (msgpack: ...)
"""
import bisect
import dataclasses
import glob
import hashlib
import json
import os
import re

import msgpack
from array_record.python import array_record_module

SCHEMA_VERSION = 1
IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant")
MANIFEST = "manifest.json"
# group_size:1 makes every record its own chunk: true random access (Grain's advice);
# the ArrayRecord default compression (zstd:3) stays.
_WRITER_OPTIONS = "group_size:1"
_FIELDS = ("schema_version", "id", "source", "turns", "images")


@dataclasses.dataclass
class Example:
    """One training sample: a chat and the images its `<image>` tags refer to, in tag order."""
    id: str
    source: str
    turns: list[dict]
    images: list[bytes] = dataclasses.field(default_factory=list)


def check_example(ex: Example) -> None:
    """Raises ValueError naming the example id and the problem if `ex` breaks the schema."""
    if not isinstance(ex.id, str) or not ex.id:
        raise ValueError(f"example id must be a non-empty str, got {ex.id!r}")
    where = f"example {ex.id!r}"
    if not isinstance(ex.source, str) or not ex.source:
        raise ValueError(f"{where}: source must be a non-empty str, got {ex.source!r}")
    if not isinstance(ex.turns, list) or not ex.turns:
        raise ValueError(f"{where}: turns must be a non-empty list")
    tags = 0
    for i, turn in enumerate(ex.turns):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise ValueError(f"{where}: turn {i} must be a dict with exactly the keys "
                             f"'role' and 'content', got {turn!r:.80}")
        if turn["role"] not in ROLES:
            raise ValueError(f"{where}: turn {i} has role {turn['role']!r}, expected one of {ROLES}")
        if not isinstance(turn["content"], str):
            raise ValueError(f"{where}: turn {i} content must be a str, "
                             f"got {type(turn['content']).__name__}")
        n = turn["content"].count(IMAGE_TAG)
        if n and turn["role"] != "user":
            raise ValueError(f"{where}: turn {i} ({turn['role']}) contains {IMAGE_TAG}; "
                             "image tags belong in user turns")
        tags += n
    if not isinstance(ex.images, list) or not all(isinstance(im, bytes) for im in ex.images):
        raise ValueError(f"{where}: images must be a list of bytes")
    if tags != len(ex.images):
        raise ValueError(f"{where}: {tags} {IMAGE_TAG} tag(s) but {len(ex.images)} image(s)")


def encode_example(ex: Example) -> bytes:
    """Validates `ex` and returns its msgpack encoding (deterministic: same Example, same bytes)."""
    check_example(ex)
    return msgpack.packb({
        "schema_version": SCHEMA_VERSION, "id": ex.id, "source": ex.source,
        "turns": [{"role": t["role"], "content": t["content"]} for t in ex.turns],
        "images": list(ex.images)}, use_bin_type=True)


def decode_example(data: bytes) -> Example:
    """Inverse of `encode_example`; raises ValueError naming what is wrong with `data`."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ValueError(f"not a valid encoded Example (msgpack: {type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"not an encoded Example: expected fields {list(_FIELDS)}, got {keys}")
    if obj["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"example {obj['id']!r} has schema version {obj['schema_version']!r}; "
                         f"this code reads version {SCHEMA_VERSION}")
    ex = Example(obj["id"], obj["source"], obj["turns"], obj["images"])
    check_example(ex)
    return ex


def _shard_file(name: str, i: int, n: int) -> str:
    return f"{name}-{i:05d}-of-{n:05d}.array_record"


class ShardedWriter:
    """Writes Examples round-robin into `num_shards` ArrayRecord files plus `manifest.json`.

    The manifest is written last, by `close()` (or on leaving the `with` block), so a
    directory with a manifest is complete. Opening a writer removes an existing manifest
    and this `name`'s shards: re-writing a directory replaces the dataset. Leaving the
    `with` block on an exception (or `abort()`) removes the partial shards.

    manifest.json: {"schema_version", "num_records", "num_bytes" (encoded record bytes,
    before ArrayRecord's compression), "shards": [{"file", "num_records", "num_bytes"}],
    "sources": {source: count}, "content_hash"}. content_hash is the sha256 of the encoded
    records concatenated in write order (msgpack records delimit themselves), so it does
    not depend on the number of shards. A manifest of several groups (written by
    `data_pipelines.conversion`) adds "groups": [shards in group 0, ...] and its
    content_hash is the sha256 of the groups' content hashes (32 bytes each) in order.

    `write_manifest=False` (one group of a larger dataset): `close()` returns the manifest
    dict without writing manifest.json, and opening leaves an existing manifest alone.
    `check_ids=False`: the caller guarantees unique ids (the converter's identity check), so
    the writer holds no per-record state (memory independent of the number of records).
    `max_parallelism`: ArrayRecord's compression threads per shard (None: its default, auto,
    which keeps chunks in flight: ~0.4 KB per record written until close); 1 for callers that
    are parallel themselves (the converter's worker processes). The bytes written are the same.
    """

    def __init__(self, out_dir: str, *, num_shards: int = 1, name: str = "data", write_manifest: bool = True,
                 check_ids: bool = True, max_parallelism: int | None = None):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.out_dir, self.num_shards, self.name = out_dir, num_shards, name
        self.write_manifest = write_manifest
        os.makedirs(out_dir, exist_ok=True)
        for stale in ([os.path.join(out_dir, MANIFEST)] if write_manifest else []) + glob.glob(
                os.path.join(glob.escape(out_dir), f"{glob.escape(name)}-?????-of-?????.array_record")):
            if os.path.exists(stale):
                os.remove(stale)
        self._files = [_shard_file(name, i, num_shards) for i in range(num_shards)]
        options = _WRITER_OPTIONS + ("" if max_parallelism is None else f",max_parallelism:{max_parallelism}")
        self._writers = [array_record_module.ArrayRecordWriter(os.path.join(out_dir, f), options)
                         for f in self._files]
        self._counts, self._bytes = [0] * num_shards, [0] * num_shards
        self._ids: dict[str, int] | None = {} if check_ids else None
        self._count = 0
        self._sources: dict[str, int] = {}
        self._hash = hashlib.sha256()
        self._manifest = None

    def write(self, ex: Example, encoded: bytes | None = None) -> None:
        """Appends `ex`; raises ValueError on a duplicate id (naming it) or an invalid Example.
        `encoded`: `encode_example(ex)` when the caller has it already (written as given)."""
        if self._writers is None:
            raise ValueError(f"ShardedWriter({self.out_dir!r}) is closed")
        if self._ids is not None and ex.id in self._ids:
            raise ValueError(f"duplicate example id {ex.id!r} in {self.out_dir} "
                             f"(record {self._ids[ex.id]} already has it)")
        data = encode_example(ex) if encoded is None else encoded
        k = self._count
        shard = k % self.num_shards
        self._writers[shard].write(data)
        if self._ids is not None:
            self._ids[ex.id] = k
        self._count += 1
        self._counts[shard] += 1
        self._bytes[shard] += len(data)
        self._sources[ex.source] = self._sources.get(ex.source, 0) + 1
        self._hash.update(data)

    def close(self) -> dict:
        """Finishes the shards, writes `manifest.json` and returns the manifest."""
        if self._manifest is not None:
            return self._manifest
        if self._writers is None:
            raise ValueError(f"ShardedWriter({self.out_dir!r}) was aborted")
        for w in self._writers:
            w.close()
        self._writers = None
        self._manifest = {
            "schema_version": SCHEMA_VERSION,
            "num_records": sum(self._counts),
            "num_bytes": sum(self._bytes),
            "shards": [{"file": f, "num_records": c, "num_bytes": b}
                       for f, c, b in zip(self._files, self._counts, self._bytes)],
            "sources": dict(sorted(self._sources.items())),
            "content_hash": self._hash.hexdigest(),
        }
        if not self.write_manifest:
            return self._manifest
        tmp = os.path.join(self.out_dir, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self._manifest, f, indent=2)
        os.replace(tmp, os.path.join(self.out_dir, MANIFEST))
        return self._manifest

    def abort(self) -> None:
        """Closes and removes the shards written so far; no manifest is written."""
        if self._writers is None:
            return
        for w, f in zip(self._writers, self._files):
            w.close()
            os.remove(os.path.join(self.out_dir, f))
        self._writers = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def read_manifest(dataset_dir: str) -> dict:
    """Loads and checks `dataset_dir/manifest.json`: schema version, shard files, counts.

    Raises FileNotFoundError naming a missing manifest or shard file, ValueError naming a
    bad schema version or inconsistent counts.
    """
    path = os.path.join(dataset_dir, MANIFEST)
    if not os.path.isfile(path):
        convert = "python -m data_pipelines.convert --format={fmt} --{flag} {src} --out DIR"
        if os.path.isfile(dataset_dir):  # the raw data given where its converted dataset belongs
            fmt, flag = ("jsonl", "jsonl") if str(dataset_dir).endswith(".jsonl") else ("llava", "json")
            raise FileNotFoundError(f"{dataset_dir} is a file, not a converted dataset: convert it first ("
                                    + convert.format(fmt=fmt, flag=flag, src=dataset_dir) + ") and give DIR")
        if not os.path.isdir(dataset_dir):
            raise FileNotFoundError(f"{dataset_dir}: no such dataset directory (a dataset is what "
                                    + convert.format(fmt="llava", flag="json", src="FILE") + " writes)")
        raise FileNotFoundError(f"{path} not found: {dataset_dir} is not a converted dataset (data_pipelines."
                                "convert writes the manifest last: a conversion that did not finish has none)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in ("schema_version", "num_records", "shards") if k not in manifest]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest['schema_version']!r}, "
                         f"this code reads version {SCHEMA_VERSION}")
    shards = manifest["shards"]
    for shard in shards:
        if not os.path.isfile(os.path.join(dataset_dir, shard["file"])):
            raise FileNotFoundError(f"{path} lists shard {shard['file']!r}, which is missing "
                                    f"from {dataset_dir}")
    total = manifest["num_records"]
    if sum(s["num_records"] for s in shards) != total:
        raise ValueError(f"{path}: shard record counts add up to "
                         f"{sum(s['num_records'] for s in shards)}, not num_records={total}")
    groups = manifest.get("groups", [len(shards)])
    if (not isinstance(groups, list) or not all(isinstance(g, int) and g >= 1 for g in groups)
            or sum(groups) != len(shards)):
        raise ValueError(f"{path}: groups {groups!r:.80} must be positive shard counts adding up to "
                         f"the {len(shards)} shards")
    first = 0
    for n in groups:  # round-robin layout within a group: its shard i holds its records i, i+n, ...
        group = shards[first:first + n]
        count = sum(s["num_records"] for s in group)
        for i, shard in enumerate(group):
            if shard["num_records"] != (count - i + n - 1) // n:
                raise ValueError(f"{path}: shard {shard['file']!r} has {shard['num_records']} records; "
                                 f"a round-robin split of {count} over {n} shards gives it "
                                 f"{(count - i + n - 1) // n}")
        first += n
    return manifest


@dataclasses.dataclass
class CorruptRecord:
    """What `ArrayRecordExampleSource` returns for a record it cannot read or decode (a damaged
    shard): which record and why. The pipeline counts and logs it as a rejection ("corrupt
    record") and training goes on; a resume skips it again the same way."""
    id: str       # "DATASET_DIR[INDEX]"
    source: str   # the dataset's source name (its manifest's, when it has one)
    where: str    # "SHARD_FILE record K"
    reason: str


class ArrayRecordExampleSource:
    """Random access to a ShardedWriter dataset: a Grain `RandomAccessDataSource` of Examples.

    Index k is the k-th record written (the round-robin sharding is undone). Picklable, so
    Grain worker processes can each open it.
    """

    def __init__(self, dataset_dir: str):
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(dataset_dir)):
            # ArrayRecord's C++ reader opens files by path: on a gs:// URL it does not fail, it hangs.
            raise ValueError(f"{dataset_dir}: ArrayRecord shards are read through the file system; mount the "
                             f"bucket (e.g. gcsfuse --implicit-dirs BUCKET /gcs/BUCKET, as Grain and MaxText "
                             f"advise) and give the mounted path")
        self.dataset_dir = dataset_dir
        self.manifest = read_manifest(dataset_dir)
        shards = self.manifest["shards"]
        paths = [os.path.join(dataset_dir, s["file"]) for s in shards]
        for path, shard in zip(paths, shards):
            reader = array_record_module.ArrayRecordReader(path)
            n = reader.num_records()
            reader.close()
            if n != shard["num_records"]:
                raise ValueError(f"{path} holds {n} records, its manifest says {shard['num_records']}")
        from grain import sources as grain_sources  # here: writers (the convert CLI) skip its 2 s import
        nonempty = [p for p, s in zip(paths, shards) if s["num_records"]]
        self._source = grain_sources.ArrayRecordDataSource(nonempty) if nonempty else None
        self._offsets, offset = [], 0  # start of each shard in the concatenated files
        for s in shards:
            self._offsets.append(offset)
            offset += s["num_records"]
        self._len = offset
        # Round-robin groups: (first index, first shard, shards) each; one group unless "groups".
        self._groups, first_index, first_shard = [], 0, 0
        for n in self.manifest.get("groups", [len(shards)]):
            self._groups.append((first_index, first_shard, n))
            first_index += sum(s["num_records"] for s in shards[first_shard:first_shard + n])
            first_shard += n
        self._group_starts = [g[0] for g in self._groups]

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, record within that shard) of the index-th record (0 <= index < len)."""
        first_index, first_shard, n = self._groups[bisect.bisect_right(self._group_starts, index) - 1]
        local = index - first_index
        return first_shard + local % n, local // n

    def __len__(self) -> int:
        return self._len

    def _key(self, index: int) -> int:
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self.dataset_dir} "
                             f"({self._len} records)")
        shard, k = self._locate(index % self._len)
        return self._offsets[shard] + k

    def _corrupt(self, index: int, error: Exception) -> CorruptRecord:
        index %= self._len
        shard, k = self._locate(index)
        sources = list(self.manifest.get("sources") or {})
        return CorruptRecord(f"{self.dataset_dir}[{index}]", sources[0] if len(sources) == 1 else "?",
                             f"{os.path.join(self.dataset_dir, self.manifest['shards'][shard]['file'])} record {k}",
                             f"{type(error).__name__}: {str(error)[:300]}")

    def _decode(self, index: int, data: bytes) -> Example | CorruptRecord:
        try:
            return decode_example(data)
        except ValueError as e:
            return self._corrupt(index, e)

    def __getitem__(self, index: int) -> Example | CorruptRecord:
        """The index-th record; a `CorruptRecord` (not an exception) for one a damaged shard
        cannot give back (riegeli's chunk hash, or an undecodable payload)."""
        key = self._key(index)
        try:
            data = self._source[key]
        except (RuntimeError, ValueError, OSError) as e:
            return self._corrupt(index, e)
        return self._decode(index, data)

    def __getitems__(self, indices) -> list[Example | CorruptRecord]:
        """Batched read (Grain uses it when present); record by record when a batch hits a
        damaged record."""
        try:
            data = self._source.__getitems__([self._key(i) for i in indices]) if len(indices) else []
        except (RuntimeError, ValueError, OSError):
            return [self[i] for i in indices]
        return [self._decode(i, d) for i, d in zip(indices, data)]

    def __repr__(self) -> str:
        return (f"ArrayRecordExampleSource({self.dataset_dir!r}, {self._len} records, "
                f"{len(self._offsets)} shards)")
