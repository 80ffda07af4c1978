"""LLaVA-format JSON and chat JSONL -> `Example`s, checked, and written as an ArrayRecord
dataset (`convert_llava`, `convert_jsonl`), or read into memory (`read_llava`, used by
evaluation). The command line is `data_pipelines/convert.py`:

    python -m data_pipelines.convert --format=llava --json llava_v1_5_mix665k.json \\
        --image_root /data/llava/images --out /data/llava665k --num_processes=16
    python -m data_pipelines.convert --format=jsonl --jsonl chats.jsonl --out /data/text

LLaVA records (a JSON list):

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",   # or [paths], or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the bus?"},
                       {"from": "gpt", "value": "An advertisement."}]}

Roles human/user -> user, gpt/assistant -> assistant, system -> system. Images are read
from `image_root` as raw bytes (stored undecoded) and must decode with PIL. LLaVA
convention: a record with images but no `<image>` tag gets "<image>\\n" (one per image)
prepended to its first user turn. JSONL lines: {"id"?, "messages": [{"role", "content"}],
"source"?} (text only). Keys other than these are not read. A record without "id" gets
"{source}-{index}" (LLaVA: 0-based list index; JSONL: 1-based line number).

Record identity: ids do not feed training, and LLaVA-style data reuses one id for several
conversations about one image, so a record that only shares an earlier record's id is kept,
its id made unique (`ID#2`, `ID#3`, ...); a record byte-identical to an earlier one (same id,
turns and image bytes) is a duplicate and rejected. Answers need a question: leading
assistant turns (before any user turn) are dropped, as LLaVA's preprocessing drops a leading
non-human turn, and a record left with no assistant turn after a user turn is rejected
(`no_answer`). Records kept with such a change are counted by `ADJUSTMENTS`.

Nothing is dropped silently: a bad record is counted and logged to `out/rejects.jsonl`
({"index" or "line", "id", "reason", "detail"}) with one of the `REASONS` below, and the
good ones are written. If more than `max_reject_fraction` of the records are rejected the
conversion fails (ConversionError; the CLI exits non-zero): the rejects log stays, the
shards are removed and no manifest is written.

Scale (the paper trains on 645M samples; a LLaVA JSON of that many is hundreds of GB):

- Streaming. The JSON list is parsed record by record (ijson, C backend: ~5 us for a 2 KB
  record, faster than `json.load`), never whole; a file that is not a list is refused before
  any work, and invalid JSON further on is a ConversionError naming the file and the record
  index where the parse failed, when the parse gets there (the partial output is removed).
- Processes. `num_processes` workers (spawned: JAX may be imported in the caller, and fork is
  unsafe then). Record identity is decided per id, so records are partitioned by a stable hash
  (BLAKE2b) of their id without "#k" suffixes ("{source}-{index}" when absent; by position
  when the id is unusable): every record whose final id could collide with another's goes to
  one worker, in input order, and the kept records, their ids and the rejects are the same
  for any `num_processes` (only the order of records in the dataset differs). Each worker
  streams the whole file itself and converts its share, rather than a parent parsing once
  and shipping records to the workers. Measured (`tools/benchmark_convert.py`, 620-byte
  records, a shared 2-core host): parsing 4-5 us a record; parsing, pickling and sending
  batches of 256 down a pipe 16 us on the parent's side alone; converting a record (checks,
  encoding, a small image read and decoded, the write) 100-450 us, milliseconds with real
  photos. So a worker's wall time is about records x (5 us + convert / N), where a
  dispatching parent caps the whole conversion at one record per ~16 us whatever N (3x
  the duplicated parse), and needs IPC; here workers share nothing and resume on their own.
- Chunks and resume. A worker commits every `chunk_size` of its input records: the chunk's
  `num_shards` shard file(s) are closed and synced, then its marker
  (`out/.conversion/data-wWWW-cCCCCCC.json`: counts, reject lines, the identity keys of
  the kept records) is renamed into place, last. A conversion killed at any point and rerun
  with the same input (path, size, mtime) and arguments (those in `out/.conversion/args.json`)
  resumes: committed chunks are kept (their records parsed and skipped, the identity state
  rebuilt from their markers), files of uncommitted ones are deleted and redone, so every
  record is converted exactly once. Other input/arguments into an out_dir that holds an
  unfinished conversion is a ConversionError naming the directory (a finished dataset
  there is replaced, as before). When every worker is done the parent merges the markers
  into the report, `rejects.jsonl` (by input position) and `manifest.json`, which lists
  every chunk's shards as one round-robin group each (`records.ShardedWriter`), so
  `ArrayRecordExampleSource` and the training pipeline read it unchanged; `.conversion/`
  is then removed. The reject-fraction rule applies to the merged counts.
- Memory. Bounded per worker: one record parsed at a time, a chunk's reject lines and 32
  bytes of identity keys per record, ArrayRecord writing without compression threads (its
  writer still buffers up to ~16 MiB of the records of an open shard, freed at the chunk's
  commit), freed heap returned after each chunk; only the identity state grows with the
  input: two sets of 16-byte digests (`_KeySet`: sorted numpy arrays, ~32 bytes per kept
  record, 320 MB for a worker's 10M records). `ConversionReport.peak_rss_kib` has each
  worker's peak RSS.
"""
import base64
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import re
import resource
import shutil

import ijson
import numpy as np
from absl import logging

from data_pipelines.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, decode_image
from data_pipelines.records import IMAGE_TAG, MANIFEST, ROLES, SCHEMA_VERSION, Example, ShardedWriter, encode_example

REASONS = {
    "missing_image": "an image file named by the record does not exist under image_root",
    "undecodable_image": "an image file that PIL cannot decode",
    "image_too_large": "an image whose header declares more than max_image_pixels pixels (decompression bomb)",
    "outside_image_root": "an image path that leads outside image_root (../, absolute, a symlink out)",
    "image_tag_mismatch": "the number of <image> tags differs from the number of images "
                          "(or a tag outside a user turn)",
    "malformed_record": "missing/invalid fields, unknown role, empty turn",
    "malformed_json": "a JSONL line that is not valid JSON",
    "duplicate_record": "byte-identical to an earlier record (same id, turns and image bytes)",
    "no_answer": "no assistant turn after a user turn: nothing to train or score",
}
ADJUSTMENTS = {
    "id_made_unique": "the id of an earlier, different record: kept as ID#2, ID#3, ...",
    "leading_answer_dropped": "assistant turn(s) before the first user turn: dropped (an answer needs a question)",
}
REJECTS_FILE = "rejects.jsonl"
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}
_CHUNK = 256  # records read and converted at once (images checked on threads)


class ConversionError(ValueError):
    """The input cannot be converted (bad file, too many rejects); `report` when known."""

    def __init__(self, message: str, report: "ConversionReport | None" = None):
        super().__init__(message)
        self.report = report


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: counts, reject reasons, the manifest; `summary()` prints it."""
    input: str
    out_dir: str
    total: int = 0
    written: int = 0                                         # good records (written if it succeeded)
    rejected: int = 0
    reasons: dict = dataclasses.field(default_factory=dict)  # reason -> count
    adjusted: dict = dataclasses.field(default_factory=dict)  # ADJUSTMENTS key -> records kept with it
    manifest: dict | None = None                             # None when the conversion failed
    peak_rss_kib: list = dataclasses.field(default_factory=list)  # per worker process (KiB): `_peak_rss_kib`

    @property
    def rejects_path(self) -> str:
        """out_dir/rejects.jsonl: one JSON line per rejected record."""
        return os.path.join(self.out_dir, REJECTS_FILE)

    @property
    def reject_fraction(self) -> float:
        """Rejected / total records (0 for an empty input)."""
        return self.rejected / self.total if self.total else 0.0

    def summary(self) -> str:
        """The printed report: totals, written, rejected per reason, adjustments, the rejects log."""
        lines = [f"converted {self.input} -> {self.out_dir}",
                 f"  total     {self.total}",
                 f"  written   {self.written}" if self.manifest is not None else
                 f"  written   0 ({self.written} good records discarded: the conversion failed)",
                 f"  rejected  {self.rejected} ({100 * self.reject_fraction:.1f}%)"]
        lines += [f"    {reason:<20} {n}" for reason, n in sorted(self.reasons.items())]
        if self.adjusted:
            lines.append(f"  kept, adjusted  {sum(self.adjusted.values())}")
            lines += [f"    {name:<22} {n}" for name, n in sorted(self.adjusted.items())]
        lines.append(f"  rejects log: {self.rejects_path}")
        return "\n".join(lines)


def _check_text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Reject("malformed_record", f"{where} must be a non-empty string, got {value!r:.60}")
    return value


def _record_id(rec: dict, default: str) -> str:
    if "id" not in rec:
        return default
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise _Reject("malformed_record", f"id must be a non-empty string or integer, got {rid!r:.60}")
    return str(rid)


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how big they may be: paths resolve (symlinks followed)
    inside `image_root` unless `allow_outside_root` (for datasets that really use absolute
    paths); headers declaring more than `max_pixels` pixels are refused before decoding."""
    image_root: str
    allow_outside_root: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


def _read_image(policy: ImagePolicy, rel) -> bytes:
    if not isinstance(rel, str) or not rel:
        raise _Reject("malformed_record", f"image path must be a non-empty string, got {rel!r:.60}")
    path = os.path.join(policy.image_root, rel)
    if not policy.allow_outside_root:
        root = os.path.realpath(policy.image_root)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:  # nothing of the file is read
            raise _Reject("outside_image_root", f"{rel!r} leads outside image_root {policy.image_root} (pass "
                          "--allow_outside_image_root if the dataset really uses such paths)")
    if not os.path.isfile(path):
        raise _Reject("missing_image", f"{path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        decode_image(data, max_pixels=policy.max_pixels)  # the pipeline's own decoder: what converts here trains
    except ImageTooLargeError as e:
        raise _Reject("image_too_large", f"{path}: {e}") from None
    except ImageDecodeError as e:
        raise _Reject("undecodable_image", f"{path}: {e}") from None
    return data


def _check_tags(turns: list[dict], num_images: int) -> None:
    for i, turn in enumerate(turns):
        if turn["role"] != "user" and IMAGE_TAG in turn["content"]:
            raise _Reject("image_tag_mismatch", f"turn {i} ({turn['role']}) contains {IMAGE_TAG}; "
                          "image tags belong in user turns")
    tags = sum(t["content"].count(IMAGE_TAG) for t in turns)
    if tags != num_images:
        raise _Reject("image_tag_mismatch", f"{tags} {IMAGE_TAG} tag(s) but {num_images} image(s)")


def _answers_need_questions(turns: list[dict]) -> tuple[list[dict], list[str]]:
    """`turns` without the assistant turns before the first user turn (system turns stay);
    raises _Reject("no_answer") when no assistant turn follows a user turn."""
    first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
    if first_user is None or not any(t["role"] == "assistant" for t in turns[first_user:]):
        raise _Reject("no_answer", f"roles {[t['role'] for t in turns]}: no assistant turn after a user turn")
    kept = [t for i, t in enumerate(turns) if i >= first_user or t["role"] != "assistant"]
    return kept, (["leading_answer_dropped"] if len(kept) < len(turns) else [])


class _KeySet:
    """A set of 16-byte keys at about 16 bytes each (a Python set costs ~100): new keys in a
    small Python set, merged into one sorted numpy array whenever it holds `_RECENT` keys (an
    O(size) copy, so O(n^2 / _RECENT) in all: seconds for the 10M keys of one worker of a 645M
    conversion). Membership: the set, then one binary search."""
    _RECENT = 8192

    def __init__(self):
        self._recent: set[bytes] = set()
        self._sorted = np.empty(0, dtype="S16")

    def __len__(self) -> int:
        return len(self._recent) + self._sorted.size

    def __contains__(self, key: bytes) -> bool:
        if key in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, key))
        # "S16" items drop trailing NUL bytes; every key has 16, so compare without them.
        return i < self._sorted.size and self._sorted[i] == key.rstrip(b"\0")

    def add(self, key: bytes) -> None:
        self._recent.add(key)
        if len(self._recent) >= self._RECENT:
            self.merge(np.array(list(self._recent), dtype="S16"))
            self._recent = set()

    def merge(self, keys: np.ndarray) -> None:
        """Adds "S16" `keys`, none of them in the set yet (a committed chunk's, on resume)."""
        keys = np.sort(keys)
        self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, keys), keys)


class _Identity:
    """Record identity over one input (module docstring): `admit(ex)` returns `ex` (its id made
    unique if an earlier, different record had it) and the adjustments made, or raises
    _Reject("duplicate_record") for a byte-identical repeat.

    The state is two `_KeySet`s of 16-byte BLAKE2b digests, ~32 bytes per kept record: of
    final ids (a collision, 2^-128 per pair, would only add a needless "#k") and of encoded
    records (the byte-identical check)."""

    def __init__(self):
        self.ids = _KeySet()
        self.digests = _KeySet()
        self.last_id_key = b""   # of the record admitted last: what a chunk marker keeps
        self.last_digest = b""
        self.last_encoded = b""  # its `encode_example` bytes (under its final id): what is written

    @staticmethod
    def id_key(rid: str) -> bytes:
        return hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def restore(self, id_keys: bytes, digests: bytes) -> None:
        """Adds the concatenated 16-byte `last_id_key`s / `last_digest`s of records admitted
        before (a committed chunk's)."""
        self.ids.merge(np.frombuffer(id_keys, dtype="S16"))
        self.digests.merge(np.frombuffer(digests, dtype="S16"))

    def admit(self, ex: Example) -> tuple[Example, list[str]]:
        encoded = encode_example(ex)
        digest = hashlib.blake2b(encoded, digest_size=16).digest()
        if digest in self.digests:
            raise _Reject("duplicate_record", f"id {ex.id!r}: byte-identical to an earlier record")
        self.digests.add(digest)
        adjusted = []
        key = self.id_key(ex.id)
        if key in self.ids:
            k = 2
            while (key := self.id_key(f"{ex.id}#{k}")) in self.ids:
                k += 1
            ex, adjusted = dataclasses.replace(ex, id=f"{ex.id}#{k}"), ["id_made_unique"]
            encoded = encode_example(ex)
        self.ids.add(key)
        self.last_id_key, self.last_digest, self.last_encoded = key, digest, encoded
        return ex, adjusted


def _check_schema(ex: Example) -> None:
    """Anything else `encode_example` refuses (e.g. text that is not valid UTF-8)."""
    try:
        encode_example(ex)
    except ValueError as e:
        raise _Reject("malformed_record", str(e)) from None


def _llava_turns(convs: list) -> list[dict]:
    """LLaVA `conversations` ([{"from", "value"}, ...]) -> [{"role", "content"}]; raises _Reject."""
    turns = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise _Reject("malformed_record", f"conversations[{i}] is not an object")
        role = turn.get("from")
        if not isinstance(role, str) or role not in _LLAVA_ROLES:
            raise _Reject("malformed_record", f"conversations[{i}] has unknown role 'from'={role!r:.40}")
        turns.append({"role": _LLAVA_ROLES[role],
                      "content": _check_text(turn.get("value"), f"conversations[{i}].value")})
    return turns


def _llava_example(rec, index: int, images: ImagePolicy, source: str) -> tuple[Example, list[str]]:
    """One LLaVA record -> (Example, adjustments); raises _Reject(reason, detail)."""
    if not isinstance(rec, dict):
        raise _Reject("malformed_record", f"record is a {type(rec).__name__}, not an object")
    rid = _record_id(rec, f"{source}-{index}")
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise _Reject("malformed_record", f"'conversations' must be a non-empty list, got {convs!r:.60}")
    turns, adjusted = _answers_need_questions(_llava_turns(convs))
    paths = rec.get("image")
    paths = [] if paths is None else [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list):
        raise _Reject("malformed_record", f"'image' must be a path or a list of paths, got {paths!r:.60}")
    if paths and not any(IMAGE_TAG in t["content"] for t in turns):
        # LLaVA convention: images without tags go before the first question.
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise _Reject("malformed_record", "record has images but no human turn to put them in")
        first_user["content"] = (IMAGE_TAG + "\n") * len(paths) + first_user["content"]
    _check_tags(turns, len(paths))
    _check_schema(Example(rid, source, turns, [b""] * len(paths)))  # before any image I/O
    return Example(rid, source, turns, [_read_image(images, p) for p in paths]), adjusted


def _chat_example(rec, line: int, source: str) -> tuple[Example, list[str]]:
    """One JSONL chat record -> (Example (text only), adjustments); raises _Reject(reason, detail)."""
    if not isinstance(rec, dict):
        raise _Reject("malformed_record", f"line is a JSON {type(rec).__name__}, not an object")
    rid = _record_id(rec, f"{source}-{line}")
    src = rec.get("source", source)
    if not isinstance(src, str) or not src:
        raise _Reject("malformed_record", f"'source' must be a non-empty string, got {src!r:.60}")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Reject("malformed_record", f"'messages' must be a non-empty list, got {msgs!r:.60}")
    turns = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise _Reject("malformed_record", f"messages[{i}] is not an object")
        if msg.get("role") not in ROLES:
            raise _Reject("malformed_record", f"messages[{i}] has unknown role {msg.get('role')!r:.40}")
        turns.append({"role": msg["role"],
                      "content": _check_text(msg.get("content"), f"messages[{i}].content")})
    _check_tags(turns, 0)
    turns, adjusted = _answers_need_questions(turns)
    ex = Example(rid, src, turns)
    _check_schema(ex)
    return ex, adjusted


# A worker's input records per committed chunk: the resume granularity (a killed worker redoes at most
# this many), memory held until the commit (a few hundred bytes a record), --num_shards files per chunk (at the
# paper's 645M records, --chunk_size=1000000 keeps the dataset at ~650 files).
CHUNK_SIZE = 10_000
_STATE_DIR = ".conversion"  # args.json + chunk markers of an unfinished conversion; removed when it finishes
_ARGS = "args.json"
_CHUNK_FILE = re.compile(r"data-w([0-9]{3})-c([0-9]{6})-[0-9]{5}-of-[0-9]{5}\.array_record")
_WRITER_FILE = re.compile(r"data-[0-9]{5}-of-[0-9]{5}\.array_record")  # a ShardedWriter("data") dataset
_SUFFIXES = re.compile(r"(#[0-9]+)+$")  # "X#2#3" -> "X": ids made unique stay with their base id
_LIBC = None  # glibc, for malloc_trim (False where there is none)
_JSON_START = {b"{": "dict", b'"': "str", b"t": "bool", b"f": "bool", b"n": "NoneType"}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What every worker of one conversion needs (picklable: spawned workers receive it)."""
    out_dir: str
    label: str                 # "index" (LLaVA) / "line" (JSONL): the rejects' position key
    num_shards: int            # shard files per committed chunk
    chunk_size: int
    num_threads: int = 1       # image-checking threads per worker
    num_processes: int = 1
    source: str = ""
    fmt: str | None = None     # "llava" / "jsonl": each worker opens input_path itself
    input_path: str = ""
    images: ImagePolicy | None = None
    parent_pid: int = 0        # spawned workers stop when this process is gone


def _peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: Linux's VmHWM, which belongs to this process
    image (ru_maxrss, the fallback, is carried over from the parent across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _chunk_name(worker: int, chunk: int) -> str:
    return f"data-w{worker:03d}-c{chunk:06d}"


def _marker_path(out_dir: str, worker: int, chunk: int) -> str:
    return os.path.join(out_dir, _STATE_DIR, _chunk_name(worker, chunk) + ".json")


def _done_path(out_dir: str, worker: int) -> str:
    return os.path.join(out_dir, _STATE_DIR, f"w{worker:03d}.done.json")


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a marker is there whole or not at all


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a marker must never outlive the data it vouches for (a machine crash)
    finally:
        os.close(fd)


def _json_error(path: str, e: Exception, index: int, offset: int) -> ConversionError:
    text = e.args[0] if e.args else ""
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    reason = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return ConversionError(f"{path}: not valid JSON ({reason}) at record index {index} of the list "
                           f"({index} record(s) parsed before it; the parser had read {offset} bytes)")


def _check_list(f, path: str) -> None:
    """Raises ConversionError unless the JSON text in binary file `f` starts with '['; rewinds `f`."""
    first = b""
    while block := f.read(1 << 16):
        if stripped := block.lstrip(b" \t\r\n"):
            first = stripped[:1]
            break
    f.seek(0)
    if first == b"[":
        return
    kind = _JSON_START.get(first, "number" if first and first in b"-0123456789" else None)
    if kind is None:
        raise ConversionError(f"{path}: not valid JSON ({'empty file' if not first else f'starts with {first!r}'})")
    raise ConversionError(f"{path}: expected a JSON list of LLaVA records, got a JSON {kind}")


def _llava_records(path: str):
    """(index, record) for each element of the JSON list in `path`, parsed incrementally by
    ijson's C backend (yajl2_c where built): one record in memory at a time, the same
    values as `json.load` (use_float: floats, not Decimals). ConversionError naming the
    file for a non-list top level, or for invalid JSON (with the record index where the
    parse failed) when the parse reaches it."""
    with open(path, "rb") as f:
        _check_list(f, path)
        index = 0
        try:
            for rec in ijson.items(f, "item", use_float=True):
                yield index, rec
                index += 1
        except ijson.JSONError as e:
            raise _json_error(path, e, index, f.tell()) from None


def _jsonl_records(path: str):
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines are not records
            try:
                yield line_no, json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield line_no, _Reject("malformed_json", f"line {line_no}: {e}")


def _open_input(plan: _Plan):
    """A spawned (or the only) worker's (records, convert_one) for `plan.fmt`."""
    if plan.fmt == "llava":
        return (_llava_records(plan.input_path),
                lambda rec, i: _llava_example(rec, i, plan.images, plan.source))
    return _jsonl_records(plan.input_path), lambda rec, line: _chat_example(rec, line, plan.source)


def _owner(item, num_processes: int, source: str) -> int:
    """The worker of record (position, rec): a stable hash of its id without "#k" suffixes, so
    every record whose final id could collide with another's goes to the same worker, in input
    order; a record without a usable id (rejected anyway) by its position."""
    pos, rec = item
    rid = None
    if isinstance(rec, dict):
        try:
            rid = _record_id(rec, f"{source}-{pos}")
        except _Reject:
            pass
    key = f"\0{pos}" if rid is None else _SUFFIXES.sub("", rid)
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_processes


def _attempt(convert_one, item):
    pos, rec = item
    try:
        if isinstance(rec, _Reject):
            raise rec
        return pos, rec, convert_one(rec, pos)
    except _Reject as r:
        return pos, rec, r


def _attempt_all(convert_one, batch: list, pool, fmt: str | None):
    """`_attempt` of each item of `batch`, in input order, on the `pool` threads (file reads and
    decodes release the GIL), except records known to be text only (LLaVA ones without an
    "image", JSONL lines), converted inline: a thread hand-off costs more than those."""
    futures = {} if pool is None else {
        i: pool.submit(_attempt, convert_one, item) for i, item in enumerate(batch)
        if fmt is None or (fmt == "llava" and isinstance(item[1], dict) and item[1].get("image") is not None)}
    for i, item in enumerate(batch):
        yield futures.pop(i).result() if i in futures else _attempt(convert_one, item)


def _count(counts: dict, key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _write_chunk(plan: _Plan, worker: int, chunk: int, batch: list, mine, pool, identity: _Identity,
                 convert_one) -> None:
    """Converts `batch` and further records of `mine` up to `plan.chunk_size` inputs into this
    chunk's shards, then commits it: shards closed and synced, then its marker (counts, reject
    lines, the identity keys of the kept records) renamed into place last."""
    writer = ShardedWriter(plan.out_dir, num_shards=plan.num_shards, name=_chunk_name(worker, chunk),
                           write_manifest=False, check_ids=False,  # `identity` makes ids unique
                           max_parallelism=1)  # the workers are the parallelism; flat memory
    m = {"total": 0, "written": 0, "rejected": 0, "reasons": {}, "adjusted": {}, "rejects": []}
    id_keys, digests = bytearray(), bytearray()  # the identity state this chunk adds, 32 bytes a record
    try:
        while batch:
            if plan.parent_pid and os.getppid() != plan.parent_pid:
                writer.abort()  # the parent was killed: stop, so a restart never races this worker
                os._exit(1)
            for pos, rec, result in _attempt_all(convert_one, batch, pool, plan.fmt):
                m["total"] += 1
                try:
                    if isinstance(result, _Reject):
                        raise result
                    ex, adjusted = result
                    ex, more = identity.admit(ex)
                except _Reject as r:
                    rid = rec["id"] if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) else None
                    m["rejects"].append({plan.label: pos, "id": rid, "reason": r.reason, "detail": r.detail})
                    m["rejected"] += 1
                    _count(m["reasons"], r.reason)
                    continue
                for name in adjusted + more:
                    _count(m["adjusted"], name)
                writer.write(ex, identity.last_encoded)
                id_keys += identity.last_id_key
                digests += identity.last_digest
                m["written"] += 1
            batch = list(itertools.islice(mine, min(_CHUNK, plan.chunk_size - m["total"])))
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    for shard in shards["shards"]:
        _fsync(os.path.join(plan.out_dir, shard["file"]))
    m.update({k: shards[k] for k in ("shards", "sources", "num_bytes", "content_hash")})
    m.update(id_keys=base64.b64encode(id_keys).decode(), digests=base64.b64encode(digests).decode())
    _write_json_atomic(_marker_path(plan.out_dir, worker, chunk), m)
    logging.info("%s: worker %d committed chunk %d (%d records, %d rejected)", plan.out_dir, worker, chunk,
                 m["total"], m["rejected"])
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Hands the heap a committed chunk freed back to the OS (glibc's malloc_trim; elsewhere
    nothing): without it fragmentation adds a MB or so per chunk to a worker's RSS."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (absent outside glibc)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _run_worker(plan: _Plan, worker: int, records=None, convert_one=None) -> None:
    """Worker `worker` of `plan.num_processes`: converts its records (all of them when there is
    one worker) chunk by chunk; resumes after its committed chunks, their identity state
    rebuilt from their markers; writes its done marker (its number of chunks) at the end."""
    if os.path.exists(_done_path(plan.out_dir, worker)):
        return
    if records is None:
        records, convert_one = _open_input(plan)
    identity, chunk, skip = _Identity(), 0, 0
    while os.path.exists(path := _marker_path(plan.out_dir, worker, chunk)):
        marker = _read_json(path)
        identity.restore(base64.b64decode(marker["id_keys"]), base64.b64decode(marker["digests"]))
        skip += marker["total"]
        chunk += 1
    if plan.num_processes > 1:
        records = (item for item in records if _owner(item, plan.num_processes, plan.source) == worker)
    mine = itertools.islice(records, skip, None)  # committed records are parsed, not converted again
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(plan.num_threads)) \
            if plan.num_threads > 1 else None
        while batch := list(itertools.islice(mine, min(_CHUNK, plan.chunk_size))):
            _write_chunk(plan, worker, chunk, batch, mine, pool, identity, convert_one)
            chunk += 1
    _write_json_atomic(_done_path(plan.out_dir, worker), {"chunks": chunk, "peak_rss_kib": _peak_rss_kib()})


def _clear(out_dir: str, keep_rejects: bool = False) -> None:
    """Removes what a conversion writes in `out_dir` (other files stay)."""
    shutil.rmtree(os.path.join(out_dir, _STATE_DIR), ignore_errors=True)
    for name in os.listdir(out_dir):
        if (name == MANIFEST or _CHUNK_FILE.fullmatch(name) or _WRITER_FILE.fullmatch(name)
                or (name == REJECTS_FILE and not keep_rejects)):
            os.remove(os.path.join(out_dir, name))


def _prepare(out_dir: str, args: dict | None) -> bool:
    """Starts a conversion in `out_dir`: True to resume an unfinished one with the same `args`
    (its uncommitted chunk files removed), False for a fresh start (earlier outputs removed).
    ConversionError naming the directory if it holds an unfinished conversion of other
    input/arguments; `args` None: never resumed."""
    os.makedirs(out_dir, exist_ok=True)
    args_path = os.path.join(out_dir, _STATE_DIR, _ARGS)
    if os.path.exists(args_path) and not os.path.exists(os.path.join(out_dir, MANIFEST)):
        try:
            stored = _read_json(args_path)
        except (OSError, ValueError):
            stored = {"unreadable": args_path}
        if args is not None and stored == args:
            for name in os.listdir(out_dir):
                match = _CHUNK_FILE.fullmatch(name)
                if match and not os.path.exists(_marker_path(out_dir, int(match[1]), int(match[2]))):
                    os.remove(os.path.join(out_dir, name))  # a chunk cut short: redone
            return True
        if stored is not None or args is not None:
            differ = sorted(k for k in set(stored or {}) | set(args or {})
                            if (stored or {}).get(k) != (args or {}).get(k))
            raise ConversionError(f"{out_dir} holds an unfinished conversion of other input or arguments "
                                  f"(differing: {', '.join(differ)}; see {args_path}); rerun that conversion "
                                  "to finish it, or remove the directory")
    _clear(out_dir)
    os.makedirs(os.path.join(out_dir, _STATE_DIR))
    _write_json_atomic(args_path, args)
    return False


def _finish(plan: _Plan, num_workers: int, input_path: str, max_reject_fraction: float) -> ConversionReport:
    """All chunks committed: merges the markers into one report, rejects.jsonl (by input
    position) and manifest.json (every chunk's shards, one round-robin group per chunk)."""
    out_dir = plan.out_dir
    report = ConversionReport(input_path, out_dir)
    done = [_read_json(_done_path(out_dir, w)) for w in range(num_workers)]
    chunks = [d["chunks"] for d in done]
    report.peak_rss_kib = [d["peak_rss_kib"] for d in done]
    shards, groups, hashes, sources, num_bytes = [], [], [], {}, 0
    for w, n in enumerate(chunks):
        for c in range(n):
            m = _read_json(_marker_path(out_dir, w, c))
            report.total += m["total"]
            report.written += m["written"]
            report.rejected += m["rejected"]
            for key, counts in (("reasons", report.reasons), ("adjusted", report.adjusted)):
                for name, k in m[key].items():
                    counts[name] = counts.get(name, 0) + k
            if not m["written"]:  # every record of the chunk rejected: its empty files go
                for shard in m["shards"]:
                    os.remove(os.path.join(out_dir, shard["file"]))
                continue
            shards += m["shards"]
            groups.append(len(m["shards"]))
            hashes.append(m["content_hash"])
            num_bytes += m["num_bytes"]
            for name, k in m["sources"].items():
                sources[name] = sources.get(name, 0) + k

    def rejects_of(w):  # one marker in memory at a time
        for c in range(chunks[w]):
            yield from _read_json(_marker_path(out_dir, w, c))["rejects"]

    tmp = report.rejects_path + ".tmp"
    with open(tmp, "w") as f:
        for line in heapq.merge(*(rejects_of(w) for w in range(num_workers)), key=lambda r: r[plan.label]):
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, report.rejects_path)
    if report.total == 0:
        _clear(out_dir, keep_rejects=True)
        raise ConversionError(f"{input_path}: no records to convert", report)
    if report.reject_fraction > max_reject_fraction:
        _clear(out_dir, keep_rejects=True)
        raise ConversionError(
            f"{input_path}: rejected {report.rejected} of {report.total} records "
            f"(fraction {report.reject_fraction:.4f}) > max_reject_fraction {max_reject_fraction}; "
            f"reasons {dict(sorted(report.reasons.items()))}; see {report.rejects_path}. "
            "No dataset was written.", report)
    manifest = {"schema_version": SCHEMA_VERSION, "num_records": report.written, "num_bytes": num_bytes,
                "shards": shards}
    if len(groups) != 1:
        manifest["groups"] = groups
    manifest["sources"] = dict(sorted(sources.items()))
    manifest["content_hash"] = hashes[0] if len(hashes) == 1 else \
        hashlib.sha256(b"".join(bytes.fromhex(h) for h in hashes)).hexdigest()
    _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    shutil.rmtree(os.path.join(out_dir, _STATE_DIR))
    report.manifest = manifest
    return report


def _run(plan: _Plan, args: dict | None, input_path: str, max_reject_fraction: float, records=None,
         convert_one=None) -> ConversionReport:
    """Prepares (or resumes) `plan.out_dir`, runs the workers, merges their results."""
    if _prepare(plan.out_dir, args):
        logging.info("%s: resuming the unfinished conversion of %s", plan.out_dir, input_path)
    num_workers = 1 if records is not None else plan.num_processes
    try:
        if num_workers == 1:
            _run_worker(plan, 0, records, convert_one)
        else:
            plan = dataclasses.replace(plan, parent_pid=os.getpid())
            context = multiprocessing.get_context("spawn")  # JAX may be imported here: never fork
            with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
                for future in [pool.submit(_run_worker, plan, w) for w in range(num_workers)]:
                    future.result()
    except ConversionError:
        _clear(plan.out_dir)  # the input itself is unreadable: nothing worth resuming
        raise
    return _finish(plan, num_workers, input_path, max_reject_fraction)


def _convert(records, label: str, convert_one, input_path: str, out_dir: str, *, num_shards: int,
             max_reject_fraction: float, num_workers: int, chunk_size: int = CHUNK_SIZE,
             resume_args: dict | None = None) -> ConversionReport:
    """Shared in-process driver: `records` yields (position, record) in input order;
    `convert_one(record, position)` returns (Example, adjustments) or raises _Reject; records
    are converted on `num_workers` threads, committed every `chunk_size` records. With
    `resume_args` (a JSON-able dict naming the input and every argument that shapes the
    output) an unfinished conversion into `out_dir` with equal `resume_args` is resumed;
    without, `out_dir` is always started afresh."""
    plan = _Plan(out_dir, label, num_shards, chunk_size, num_threads=num_workers)
    return _run(plan, resume_args, input_path, max_reject_fraction, records, convert_one)


def _input_args(fmt: str, path: str, **arguments) -> dict:
    """What a resume must match: the input file (path, size, mtime) and the arguments."""
    st = os.stat(path)
    return {"format": fmt, "input": os.path.abspath(path), "input_bytes": st.st_size,
            "input_mtime_ns": st.st_mtime_ns, **arguments}


def _check_counts(num_shards: int, num_processes: int, chunk_size: int) -> None:
    for name, value in (("num_shards", num_shards), ("num_processes", num_processes), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def convert_llava(json_path: str, image_root: str, out_dir: str, *, num_shards: int = 1,
                  max_reject_fraction: float = 0.1, source: str = "llava", num_workers: int = 8,
                  allow_outside_image_root: bool = False, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                  num_processes: int = 1, chunk_size: int = CHUNK_SIZE) -> ConversionReport:
    """LLaVA JSON list -> dataset in `out_dir` (module docstring: checks, identity, resume).

    The JSON is streamed (ijson); `num_processes` worker processes each convert the records
    whose id hashes to them, committing every `chunk_size` of their input records as
    `num_shards` shard file(s) plus a marker; images are checked on `num_workers` threads per
    process (inside `image_root` unless `allow_outside_image_root`; at most
    `max_image_pixels`). The same input gives the same records, ids and rejects for any
    `num_processes` (only their order in the dataset differs). Rerunning into an out_dir
    holding an unfinished conversion with the same input and arguments resumes it.

    Raises ConversionError (the file is not a JSON list, invalid JSON, too many rejects, an
    unfinished conversion of other input/arguments in `out_dir`), FileNotFoundError, ValueError
    (a count < 1). Example:

        report = convert_llava("mix665k.json", "/data/images", "/data/mix665k", num_processes=16)
        print(report.summary())  # total / written / rejected per reason
        ArrayRecordExampleSource("/data/mix665k")[0]  # an Example
    """
    _check_counts(num_shards, num_processes, chunk_size)
    images = ImagePolicy(image_root, allow_outside_image_root, max_image_pixels)
    args = _input_args("llava", json_path, image_root=os.path.abspath(image_root),
                       allow_outside_image_root=allow_outside_image_root, max_image_pixels=max_image_pixels,
                       source=source, num_shards=num_shards, num_processes=num_processes, chunk_size=chunk_size)
    with open(json_path, "rb") as f:
        _check_list(f, json_path)  # here, before any worker starts or out_dir is touched
    plan = _Plan(out_dir, "index", num_shards, chunk_size, num_threads=num_workers, num_processes=num_processes,
                 source=source, fmt="llava", input_path=json_path, images=images)
    return _run(plan, args, json_path, max_reject_fraction)


def read_llava(json_path: str, image_root: str, *, source: str = "llava", allow_outside_image_root: bool = False,
               max_image_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Example], list[dict]]:
    """All records of a LLaVA JSON as `Example`s (in file order) and the rejected ones as
    {"index", "id", "reason", "detail"} (same checks and reasons as `convert_llava`), e.g.
    for evaluating straight from the JSON without converting it first. The JSON is streamed
    (only the Examples are held). FileNotFoundError / ConversionError as `convert_llava`."""
    if not os.path.exists(json_path):
        raise FileNotFoundError(f"{json_path}: no such LLaVA JSON file")
    images = ImagePolicy(image_root, allow_outside_image_root, max_image_pixels)
    examples, rejects, identity = [], [], _Identity()
    for i, rec in _llava_records(json_path):
        try:
            ex, _ = _llava_example(rec, i, images, source)
            examples.append(identity.admit(ex)[0])
        except _Reject as r:
            rid = rec.get("id") if isinstance(rec, dict) else None
            rejects.append({"index": i, "id": rid, "reason": r.reason, "detail": r.detail})
    return examples, rejects


def convert_jsonl(jsonl_path: str, out_dir: str, *, num_shards: int = 1, max_reject_fraction: float = 0.1,
                  source: str = "text", num_processes: int = 1, chunk_size: int = CHUNK_SIZE) -> ConversionReport:
    """Text-only chat JSONL -> dataset in `out_dir` (a line's "source" overrides `source`);
    streamed line by line, `num_processes` / `chunk_size` / resume as `convert_llava`.

        report = convert_jsonl("chats.jsonl", "/data/text", num_processes=4)
    """
    _check_counts(num_shards, num_processes, chunk_size)
    args = _input_args("jsonl", jsonl_path, source=source, num_shards=num_shards, num_processes=num_processes,
                       chunk_size=chunk_size)
    plan = _Plan(out_dir, "line", num_shards, chunk_size, num_processes=num_processes, source=source,
                 fmt="jsonl", input_path=jsonl_path)
    return _run(plan, args, jsonl_path, max_reject_fraction)
