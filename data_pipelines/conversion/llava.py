"""LLaVA-format JSON -> checked `Example`s, written as an ArrayRecord dataset (`convert_llava`)
or read into memory (`read_llava`, used by evaluation).

    python -m data_pipelines.convert --format=llava --json llava_v1_5_mix665k.json \\
        --image_root /data/llava/images --out /data/llava665k --num_processes=16

LLaVA records (a JSON list):

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",   # or [paths], or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the bus?"},
                       {"from": "gpt", "value": "An advertisement."}]}

Roles human/user -> user, gpt/assistant -> assistant, system -> system. Images are read
from `image_root` as raw bytes (stored undecoded) and must decode with PIL. Keys other than
these are not read. A record without "id" gets "{source}-{index}" (0-based list index). The
checks, identity rules and the LLaVA convention for untagged images are `checks`'.

Streaming: the JSON list is parsed record by record (ijson, C backend: ~5 us for a 2 KB
record, faster than `json.load`), never whole; a file that is not a list is refused before
any work, and invalid JSON further on is a ConversionError naming the file and the record
index where the parse failed, when the parse gets there (the partial output is removed).
Processes, chunks, resume and memory: `driver`.
"""
import dataclasses
import os

import ijson

from data_pipelines.conversion.checks import (
    Identity,
    ImagePolicy,
    Reject,
    answers_need_questions,
    llava_turns,
    read_image,
    record_id,
    with_images,
)
from data_pipelines.conversion.driver import (
    CHUNK_SIZE,
    ConversionError,
    ConversionReport,
    check_counts,
    input_args,
    run,
)
from data_pipelines.images import DEFAULT_MAX_PIXELS
from data_pipelines.records import Example

_JSON_START = {b"{": "dict", b'"': "str", b"t": "bool", b"f": "bool", b"n": "NoneType"}


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


def llava_records(path: str):
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


def llava_example(rec, index: int, images: ImagePolicy, source: str) -> tuple[Example, list[str]]:
    """One LLaVA record (list index `index`) -> (Example, adjustments); raises Reject(reason, detail)."""
    if not isinstance(rec, dict):
        raise Reject("malformed_record", f"record is a {type(rec).__name__}, not an object")
    rid = record_id(rec, f"{source}-{index}")
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise Reject("malformed_record", f"'conversations' must be a non-empty list, got {convs!r:.60}")
    turns, adjusted = answers_need_questions(llava_turns(convs))
    paths = rec.get("image")
    paths = [] if paths is None else [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list):
        raise Reject("malformed_record", f"'image' must be a path or a list of paths, got {paths!r:.60}")
    return with_images(rid, source, turns, paths, lambda k, path: read_image(images, path)), adjusted


@dataclasses.dataclass(frozen=True)
class LlavaReader:
    """The driver's `Reader` of one LLaVA JSON (picklable: each worker process streams the file)."""
    path: str
    images: ImagePolicy
    source: str
    label = "index"

    def records(self):
        """`llava_records` of the file."""
        return llava_records(self.path)

    def convert(self, rec, index: int) -> tuple[Example, list[str]]:
        """`llava_example` of one record."""
        return llava_example(rec, index, self.images, self.source)

    def threaded(self, rec) -> bool:
        """Records with an image read it: worth a thread; text-only ones are not."""
        return isinstance(rec, dict) and rec.get("image") is not None


def convert_llava(json_path: str, image_root: str, out_dir: str, *, num_shards: int = 1,
                  max_reject_fraction: float = 0.1, source: str = "llava", num_workers: int = 8,
                  allow_outside_image_root: bool = False, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                  num_processes: int = 1, chunk_size: int = CHUNK_SIZE) -> ConversionReport:
    """LLaVA JSON list -> dataset in `out_dir` (module docstring; checks and identity: `checks`;
    processes and resume: `driver`).

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
    check_counts(num_shards=num_shards, num_processes=num_processes, chunk_size=chunk_size)
    images = ImagePolicy(image_root, allow_outside_image_root, max_image_pixels)
    args = input_args("llava", json_path, image_root=os.path.abspath(image_root),
                      allow_outside_image_root=allow_outside_image_root, max_image_pixels=max_image_pixels,
                      source=source, num_shards=num_shards, num_processes=num_processes, chunk_size=chunk_size)
    with open(json_path, "rb") as f:
        _check_list(f, json_path)  # here, before any worker starts or out_dir is touched
    return run(LlavaReader(json_path, images, source), out_dir, input_label=json_path, num_shards=num_shards,
               chunk_size=chunk_size, max_reject_fraction=max_reject_fraction, num_threads=num_workers,
               num_processes=num_processes, resume_args=args)


def read_llava(json_path: str, image_root: str, *, source: str = "llava", allow_outside_image_root: bool = False,
               max_image_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Example], list[dict]]:
    """All records of a LLaVA JSON as `Example`s (in file order) and the rejected ones as
    {"index", "id", "reason", "detail"} (same checks and reasons as `convert_llava`), e.g.
    for evaluating straight from the JSON without converting it first. The JSON is streamed
    (only the Examples are held). FileNotFoundError / ConversionError as `convert_llava`."""
    if not os.path.exists(json_path):
        raise FileNotFoundError(f"{json_path}: no such LLaVA JSON file")
    images = ImagePolicy(image_root, allow_outside_image_root, max_image_pixels)
    examples, rejects, identity = [], [], Identity()
    for i, rec in llava_records(json_path):
        try:
            ex, _ = llava_example(rec, i, images, source)
            examples.append(identity.admit(ex)[0])
        except Reject as r:
            rid = rec.get("id") if isinstance(rec, dict) else None
            rejects.append({"index": i, "id": rid, "reason": r.reason, "detail": r.detail})
    return examples, rejects
