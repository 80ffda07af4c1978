"""Text-only chat JSONL -> checked `Example`s, written as an ArrayRecord dataset (`convert_jsonl`).

    python -m data_pipelines.convert --format=jsonl --jsonl chats.jsonl --out /data/text

One record a line: {"id"?, "messages": [{"role", "content"}], "source"?} (roles system / user /
assistant; text only: an `<image>` tag is an image_tag_mismatch). Keys other than these are not
read; blank lines are not records. A record without "id" gets "{source}-{line}" (1-based line
number); a line's "source" overrides `source`. A line that is not JSON is a `malformed_json`
rejection. The checks and identity rules are `checks`'; processes, chunks and resume `driver`'s.
"""
import dataclasses
import json

from data_pipelines.conversion.checks import (
    Reject,
    answers_need_questions,
    check_schema,
    check_tags,
    message_turns,
    record_id,
)
from data_pipelines.conversion.driver import CHUNK_SIZE, ConversionReport, check_counts, input_args, run
from data_pipelines.records import Example


def jsonl_records(path: str):
    """(line number, record) for each non-blank line of `path`, read one line at a time; a
    Reject("malformed_json") in place of a line that is not JSON."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines are not records
            try:
                yield line_no, json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield line_no, Reject("malformed_json", f"line {line_no}: {e}")


def chat_example(rec, line: int, source: str) -> tuple[Example, list[str]]:
    """One JSONL chat record -> (Example (text only), adjustments); raises Reject(reason, detail)."""
    if not isinstance(rec, dict):
        raise Reject("malformed_record", f"line is a JSON {type(rec).__name__}, not an object")
    rid = record_id(rec, f"{source}-{line}")
    src = rec.get("source", source)
    if not isinstance(src, str) or not src:
        raise Reject("malformed_record", f"'source' must be a non-empty string, got {src!r:.60}")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise Reject("malformed_record", f"'messages' must be a non-empty list, got {msgs!r:.60}")
    turns = message_turns(msgs, parts=False)  # a content must be a string here
    check_tags(turns, 0)
    turns, adjusted = answers_need_questions(turns)
    ex = Example(rid, src, turns)
    check_schema(ex)
    return ex, adjusted


@dataclasses.dataclass(frozen=True)
class JsonlReader:
    """The driver's `Reader` of one chat JSONL file (picklable: each worker process reads it)."""
    path: str
    source: str
    label = "line"

    def records(self):
        """`jsonl_records` of the file."""
        return jsonl_records(self.path)

    def convert(self, rec, line: int) -> tuple[Example, list[str]]:
        """`chat_example` of one line's record."""
        return chat_example(rec, line, self.source)

    def threaded(self, rec) -> bool:
        """Never: text only, a thread hand-off costs more than the conversion."""
        return False


def convert_jsonl(jsonl_path: str, out_dir: str, *, num_shards: int = 1, max_reject_fraction: float = 0.1,
                  source: str = "text", num_processes: int = 1, chunk_size: int = CHUNK_SIZE) -> ConversionReport:
    """Text-only chat JSONL -> dataset in `out_dir` (a line's "source" overrides `source`);
    streamed line by line, `num_processes` / `chunk_size` / resume and errors as `convert_llava`.

        report = convert_jsonl("chats.jsonl", "/data/text", num_processes=4)
    """
    check_counts(num_shards=num_shards, num_processes=num_processes, chunk_size=chunk_size)
    args = input_args("jsonl", jsonl_path, source=source, num_shards=num_shards, num_processes=num_processes,
                      chunk_size=chunk_size)
    return run(JsonlReader(jsonl_path, source), out_dir, input_label=jsonl_path, num_shards=num_shards,
               chunk_size=chunk_size, max_reject_fraction=max_reject_fraction, num_processes=num_processes,
               resume_args=args)
