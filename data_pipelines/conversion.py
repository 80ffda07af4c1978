"""LLaVA-format JSON and chat JSONL -> `Example`s, checked, and written as an ArrayRecord
dataset (`convert_llava`, `convert_jsonl`), or read into memory (`read_llava`, used by
evaluation). The command line is `data_pipelines/convert.py`:

    python -m data_pipelines.convert --format=llava --json llava_v1_5_mix665k.json \\
        --image_root /data/llava/images --out /data/llava665k --num_shards=64
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
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import os

from absl import logging

from data_pipelines.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, decode_image
from data_pipelines.records import IMAGE_TAG, ROLES, Example, ShardedWriter, encode_example

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
_CHUNK = 256  # records in flight at once when images are checked on worker threads


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


class _Identity:
    """Record identity over one input (module docstring): `admit(ex)` returns `ex` (its id made
    unique if an earlier, different record had it) and the adjustments made, or raises
    _Reject("duplicate_record") for a byte-identical repeat."""

    def __init__(self):
        self.ids: set[str] = set()
        self.digests: set[bytes] = set()

    def admit(self, ex: Example) -> tuple[Example, list[str]]:
        digest = hashlib.blake2b(encode_example(ex), digest_size=16).digest()
        if digest in self.digests:
            raise _Reject("duplicate_record", f"id {ex.id!r}: byte-identical to an earlier record")
        self.digests.add(digest)
        adjusted = []
        if ex.id in self.ids:
            k = 2
            while f"{ex.id}#{k}" in self.ids:
                k += 1
            ex, adjusted = dataclasses.replace(ex, id=f"{ex.id}#{k}"), ["id_made_unique"]
        self.ids.add(ex.id)
        return ex, adjusted


def _check_schema(ex: Example) -> None:
    """Anything else `encode_example` refuses (e.g. text that is not valid UTF-8)."""
    try:
        encode_example(ex)
    except ValueError as e:
        raise _Reject("malformed_record", str(e)) from None


def _llava_example(rec, index: int, images: ImagePolicy, source: str) -> tuple[Example, list[str]]:
    """One LLaVA record -> (Example, adjustments); raises _Reject(reason, detail)."""
    if not isinstance(rec, dict):
        raise _Reject("malformed_record", f"record is a {type(rec).__name__}, not an object")
    rid = _record_id(rec, f"{source}-{index}")
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise _Reject("malformed_record", f"'conversations' must be a non-empty list, got {convs!r:.60}")
    turns = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise _Reject("malformed_record", f"conversations[{i}] is not an object")
        role = turn.get("from")
        if not isinstance(role, str) or role not in _LLAVA_ROLES:
            raise _Reject("malformed_record", f"conversations[{i}] has unknown role 'from'={role!r:.40}")
        turns.append({"role": _LLAVA_ROLES[role],
                      "content": _check_text(turn.get("value"), f"conversations[{i}].value")})
    turns, adjusted = _answers_need_questions(turns)
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


def _convert(records, label: str, convert_one, input_path: str, out_dir: str, *, num_shards: int,
             max_reject_fraction: float, num_workers: int) -> ConversionReport:
    """Shared driver: `records` yields (position, record); `convert_one` may raise _Reject."""
    os.makedirs(out_dir, exist_ok=True)
    report = ConversionReport(input_path, out_dir)

    def attempt(item):
        pos, rec = item
        try:
            if isinstance(rec, _Reject):
                raise rec
            return pos, rec, convert_one(rec, pos)
        except _Reject as r:
            return pos, rec, r

    def chunks():
        chunk = []
        for item in records:
            chunk.append(item)
            if len(chunk) == _CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def reject(f, pos, rec, r: _Reject, rid=None):
        if rid is None and isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)):
            rid = rec["id"]
        f.write(json.dumps({label: pos, "id": rid, "reason": r.reason, "detail": r.detail}) + "\n")
        report.rejected += 1
        report.reasons[r.reason] = report.reasons.get(r.reason, 0) + 1

    writer = ShardedWriter(out_dir, num_shards=num_shards)
    identity = _Identity()
    with open(report.rejects_path, "w") as rejects, \
            concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        try:
            for chunk in chunks():
                for pos, rec, result in pool.map(attempt, chunk):  # map keeps input order
                    report.total += 1
                    try:
                        if isinstance(result, _Reject):
                            raise result
                        ex, adjusted = result
                        ex, more = identity.admit(ex)
                    except _Reject as r:
                        reject(rejects, pos, rec, r)
                        continue
                    for name in adjusted + more:
                        report.adjusted[name] = report.adjusted.get(name, 0) + 1
                    writer.write(ex)
                    report.written += 1
                if report.total // 50_000 != (report.total - len(chunk)) // 50_000:
                    logging.info("%s: %d records, %d rejected", input_path, report.total, report.rejected)
        except BaseException:
            writer.abort()
            raise
    if report.total == 0:
        writer.abort()
        raise ConversionError(f"{input_path}: no records to convert", report)
    if report.reject_fraction > max_reject_fraction:
        writer.abort()
        raise ConversionError(
            f"{input_path}: rejected {report.rejected} of {report.total} records "
            f"(fraction {report.reject_fraction:.4f}) > max_reject_fraction {max_reject_fraction}; "
            f"reasons {dict(sorted(report.reasons.items()))}; see {report.rejects_path}. "
            "No dataset was written.", report)
    report.manifest = writer.close()
    return report


def convert_llava(json_path: str, image_root: str, out_dir: str, *, num_shards: int = 1,
                  max_reject_fraction: float = 0.1, source: str = "llava", num_workers: int = 8,
                  allow_outside_image_root: bool = False,
                  max_image_pixels: int = DEFAULT_MAX_PIXELS) -> ConversionReport:
    """LLaVA JSON list -> dataset in `out_dir`; images are checked on `num_workers` threads
    (inside `image_root` unless `allow_outside_image_root`; at most `max_image_pixels`)."""
    images = ImagePolicy(image_root, allow_outside_image_root, max_image_pixels)
    try:
        with open(json_path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise ConversionError(f"{json_path}: expected a JSON list of LLaVA records, "
                              f"got a JSON {type(records).__name__}")
    return _convert(enumerate(records), "index",
                    lambda rec, i: _llava_example(rec, i, images, source), json_path, out_dir,
                    num_shards=num_shards, max_reject_fraction=max_reject_fraction,
                    num_workers=num_workers)


def read_llava(json_path: str, image_root: str, *, source: str = "llava", allow_outside_image_root: bool = False,
               max_image_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Example], list[dict]]:
    """All records of a LLaVA JSON as `Example`s (in file order) and the rejected ones as
    {"index", "id", "reason", "detail"} (same checks and reasons as `convert_llava`), e.g.
    for evaluating straight from the JSON without converting it first."""
    try:
        with open(json_path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{json_path}: no such LLaVA JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise ConversionError(f"{json_path}: expected a JSON list of LLaVA records, got a JSON "
                              f"{type(records).__name__}")
    images = ImagePolicy(image_root, allow_outside_image_root, max_image_pixels)
    examples, rejects, identity = [], [], _Identity()
    for i, rec in enumerate(records):
        try:
            ex, _ = _llava_example(rec, i, images, source)
            examples.append(identity.admit(ex)[0])
        except _Reject as r:
            rid = rec.get("id") if isinstance(rec, dict) else None
            rejects.append({"index": i, "id": rid, "reason": r.reason, "detail": r.detail})
    return examples, rejects


def _jsonl_records(path: str):
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines are not records
            try:
                yield line_no, json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield line_no, _Reject("malformed_json", f"line {line_no}: {e}")


def convert_jsonl(jsonl_path: str, out_dir: str, *, num_shards: int = 1,
                  max_reject_fraction: float = 0.1, source: str = "text") -> ConversionReport:
    """Text-only chat JSONL -> dataset in `out_dir` (a line's "source" overrides `source`)."""
    return _convert(_jsonl_records(jsonl_path), "line",
                    lambda rec, line: _chat_example(rec, line, source), jsonl_path, out_dir,
                    num_shards=num_shards, max_reject_fraction=max_reject_fraction, num_workers=1)
