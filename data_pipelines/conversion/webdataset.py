"""WebDataset tar shards -> the same checked `Example`s and ArrayRecord dataset as the LLaVA
converter (`convert_webdataset`), through the same checks (`checks`) and driver (`driver`).
Images are stored as their members' bytes (never re-encoded) after they decode with the
pipeline's own decoder.

    python -m data_pipelines.convert --format=webdataset --wds "/data/shards/train-{000000..000099}.tar" \\
        --out /data/wds

Samples are files sharing a key (the webdataset convention: the key is the file name up to its
first dot; a key with dots, `img.001.json` beside `img.002.json`, is one sample per json
file all the same, its members being those named after it: `img.001.jpg`, `img.001.0.png`):

    000042.json         {"id"?, "conversations" | "messages" | "texts": [...]} (`checks.conversation_turns`;
                        the layouts of `data_pipelines.conversion.hf`)
    000042.jpg          one image: the extension jpg, jpeg, png, webp, gif, bmp, tif or tiff
    000042.0.png  000042.1.jpg  ...   several images: N.EXT, numbered 0, 1, ... in tag order

(an "image"/"images" field in the json is not read: a sample's images are its members).
Read with `webdataset`, nothing decoded. A sample without a json, with json that does not
parse (malformed_json), with an image member named otherwise, with both an unnumbered and
numbered images, or with a gap in the numbers (missing_image) is rejected; a sample without
an "id" is named by its key. Positions in the rejects log: {"sample": "SHARD/KEY"}.

    report = convert_webdataset("/data/wds/train-{000000..000099}.tar", "/data/train_ar")
    print(report.summary())
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tarfile
from typing import Sequence

from data_pipelines.conversion.checks import (
    Reject,
    answers_need_questions,
    conversation_turns,
    image_bytes,
    record_id,
    with_images,
)
from data_pipelines.conversion.driver import (
    CHUNK_SIZE,
    ConversionError,
    ConversionReport,
    check_counts,
    files_digest,
    import_optional,
    run,
)
from data_pipelines.images import DEFAULT_MAX_PIXELS
from data_pipelines.records import Example

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_NUMBERED = re.compile(r"^(\d+)\.([^.]+)$")


def sample_images(members: dict, where: str) -> list[tuple[str, bytes]]:
    """A sample's image members ({name after the key: bytes}) as (name, bytes) in tag order:
    one unnumbered EXT, or 0.EXT, 1.EXT, ...; Reject for any other naming or a gap.

    >>> [name for name, _ in sample_images({"1.png": b"", "0.jpg": b"", "json": b""}, "s/k")]
    ['0.jpg', '1.png']
    """
    plain, numbered = [], {}
    for name, data in members.items():
        ext = name.rsplit(".", 1)[-1].lower()
        if ext not in WDS_IMAGE_EXTENSIONS:
            continue
        m = _NUMBERED.match(name)
        if name.lower() == ext:
            plain.append((name, data))
        elif m and int(m.group(1)) not in numbered:
            numbered[int(m.group(1))] = (name, data)
        else:
            raise Reject("malformed_record", f"{where}: image member {name!r} is neither EXT nor N.EXT "
                         "(one image: KEY.jpg; several: KEY.0.jpg, KEY.1.png, ...)")
    if len(plain) + bool(numbered) > 1:
        raise Reject("malformed_record", f"{where}: images {sorted(n for n, _ in plain)} "
                     f"{sorted(n for n, _ in numbered.values())}: one unnumbered image or numbered ones, "
                     "the order is ambiguous")
    if plain:
        return plain
    gaps = [k for k in range(max(numbered, default=-1) + 1) if k not in numbered]
    if gaps:
        raise Reject("missing_image", f"{where}: image(s) {gaps} missing (have {sorted(numbered)}; numbered "
                     "images run 0, 1, ...)")
    return [numbered[k] for k in sorted(numbered)]


def split_dotted_keys(key: str, members: dict) -> list[tuple[str, dict]]:
    """One (key, members) per json member of what webdataset grouped under `key`, the name up to
    the first dot: the files of `img.001.json` and `img.002.json` arrive as one group {"001.json",
    "002.json", "001.jpg", ...}. Each other member goes to the longest json key its name starts
    with ({"json": ..., "jpg": ...} as webdataset names a plain sample's members); members that
    no json names stay as one sample without a json (a counted rejection).

    >>> [(k, sorted(m)) for k, m in split_dotted_keys("img", {"001.json": b"", "001.jpg": b"", "002.json": b""})]
    [('img.001', ['jpg', 'json']), ('img.002', ['json'])]
    """
    json_keys = [n[:-len(".json")] if n != "json" else "" for n in members if n == "json" or n.endswith(".json")]
    if json_keys in ([], [""]):
        return [(key, members)]  # webdataset's own case: one sample (with or without its json)
    longest_first = sorted(json_keys, key=len, reverse=True)
    groups: dict[str, dict] = {k: {} for k in json_keys}
    unnamed: dict = {}
    for name, data in members.items():
        owner = next((k for k in longest_first if not k or name.startswith(f"{k}.")), None)
        if owner is None:
            unnamed[name] = data
        else:
            groups[owner][name[len(owner) + 1:] if owner else name] = data
    out = [(f"{key}.{k}" if k else key, m) for k, m in groups.items()]
    return out + ([(key, unnamed)] if unnamed else [])


def wds_samples(urls):
    """("SHARD/KEY", sample) per sample of the shards `urls`, in order: sample {"id", "key",
    "json", "members"}, its json parsed here so that a rejected sample's log line carries its
    id, or a Reject (no json, json that does not parse). ConversionError naming a shard that
    is not a readable tar."""
    wds = import_optional("webdataset")
    samples = iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except (tarfile.TarError, OSError, ValueError) as e:
            # A ConversionError: the driver then clears out_dir (nothing worth resuming).
            url = e.args[-1] if len(e.args) > 1 and isinstance(e.args[-1], str) else "a shard"
            raise ConversionError(f"{url}: not a readable WebDataset tar shard ({e.args[0] if e.args else e})") \
                from None
        url = sample["__url__"]
        for key, members in split_dotted_keys(sample["__key__"],
                                              {k: v for k, v in sample.items() if not k.startswith("__")}):
            where = f"{url}/{key}"
            if "json" not in members:
                yield where, Reject("malformed_record", f"{where}: no {key}.json member (members: {sorted(members)})")
                continue
            try:
                obj = json.loads(members.pop("json").decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield where, Reject("malformed_json", f"{where}.json: {e}")
                continue
            rid = obj.get("id") if isinstance(obj, dict) else None
            yield where, {"id": rid, "key": key, "json": obj, "members": members}


@dataclasses.dataclass(frozen=True)
class WebDatasetReader:
    """The driver's `Reader` of a list of tar shards (one process; samples converted on the
    driver's threads)."""
    shards: list
    source: str
    max_pixels: int
    label = "sample"

    def records(self):
        """`wds_samples` of the shards."""
        return wds_samples(self.shards)

    def threaded(self, sample) -> bool:
        """Always: a sample's images are decoded."""
        return True

    def convert(self, sample: dict, where: str) -> tuple[Example, list[str]]:
        """(Example, adjustments) of one sample; raises Reject."""
        obj = sample["json"]
        if not isinstance(obj, dict):
            raise Reject("malformed_record", f"{where}.json is a JSON {type(obj).__name__}, not an object")
        rid = record_id(obj, sample["key"])
        images = sample_images(sample["members"], where)
        turns, adjusted = answers_need_questions(conversation_turns(obj, f"{where}.json"))
        return with_images(rid, self.source, turns, images,
                           lambda k, im: image_bytes(im[1], f"{where}.{im[0]}", self.max_pixels)), adjusted


def convert_webdataset(urls: str | Sequence[str], out_dir: str, *, num_shards: int = 1,
                       max_reject_fraction: float = 0.1, source: str = "webdataset", num_workers: int = 8,
                       max_image_pixels: int = DEFAULT_MAX_PIXELS, chunk_size: int = CHUNK_SIZE) -> ConversionReport:
    """WebDataset tar shards (module docstring) -> an ArrayRecord dataset of Examples in
    `out_dir`, with `rejects.jsonl` ({"sample": "SHARD/KEY", "id", "reason", "detail"}) and the
    returned report. `urls`: a list of local shard paths, or one string: a directory (its *.tar
    files, sorted), or webdataset's notation ("/data/shard-{000000..000063}.tar", "::" between
    several). Images are kept byte for byte, checked to decode with at most `max_image_pixels`
    pixels on `num_workers` threads. Committed every `chunk_size` samples: rerunning with the
    same shards (names, sizes, mtimes) and arguments resumes an unfinished conversion. Raises
    FileNotFoundError (a shard that is not there), ConversionError (no samples, more than
    `max_reject_fraction` rejected: no dataset is written, or another unfinished conversion in
    `out_dir`), ValueError (a count < 1), ImportError without the `webdataset` package; a file
    that is not a tar (or is cut short) is a ConversionError naming it. Example:

        report = convert_webdataset("/data/wds/train-{000000..000099}.tar", "/data/train")
    """
    check_counts(num_shards=num_shards, chunk_size=chunk_size)
    wds = import_optional("webdataset")
    if isinstance(urls, str) and os.path.isdir(urls):
        shards = sorted(glob.glob(os.path.join(glob.escape(urls), "*.tar")))
    else:
        shards = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    if not shards:
        raise ConversionError(f"convert_webdataset: no shards in {urls!r}")
    missing = [url for url in shards if not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(f"no such WebDataset shard(s): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    label = shards[0] if len(shards) == 1 else f"{shards[0]} ... ({len(shards)} shards)"
    args = {"format": "webdataset", "input": [os.path.abspath(u) for u in shards], "input_files": files_digest(shards),
            "max_image_pixels": max_image_pixels, "source": source, "num_shards": num_shards, "chunk_size": chunk_size}
    return run(WebDatasetReader(shards, source, max_image_pixels), out_dir, input_label=label, num_shards=num_shards,
               max_reject_fraction=max_reject_fraction, num_threads=num_workers, chunk_size=chunk_size,
               resume_args=args)
