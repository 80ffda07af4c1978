"""Hugging Face datasets and WebDataset tar shards -> the same checked `Example`s and ArrayRecord
dataset as the LLaVA converter (`data_pipelines.conversion`): `convert_hf`, `convert_webdataset`.

Both feed the LLaVA converter's own driver, so everything it guarantees holds here too: the
rejection reasons (`conversion.REASONS`), `out/rejects.jsonl`, `ConversionReport.summary()`,
`max_reject_fraction`, record identity (ids made unique, byte-identical repeats rejected as
`duplicate_record`), answers needing questions, the LLaVA convention for untagged images (one
"<image>\\n" per image before the first user turn). Images are stored as the original encoded
file bytes (never re-encoded) after they decode with the pipeline's own decoder.

Hugging Face datasets (`convert_hf`): a directory written by `Dataset.save_to_disk` (or
`DatasetDict.save_to_disk`: pick `split`), a directory of parquet files (splits inferred by
`datasets`' file-name conventions, e.g. `train-00000-of-00004.parquet`, `data/test-*.parquet`)
or one parquet file; read locally (nothing downloaded), a batch at a time (nothing materialised
in Python lists) and never decoded (the columns' Arrow storage is read: an image is its
{"bytes", "path"} struct). The layout is read from the features:

    conversation column (exactly one of)
      conversations   LLaVA style, the roles human/user, gpt/assistant, system:
                      [{"from": "human", "value": "<image>\\nWhat is on the bus?"},
                       {"from": "gpt", "value": "An advertisement."}]
      messages        role/content (TRL, LLaVA-OneVision, HF chat templates),
                      the roles user / assistant / system; content a string, or typed parts:
                      [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": "What is on the bus?"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "An advertisement."}]}]
      texts           the Cauldron's own layout (HuggingFaceM4/the_cauldron): question/answer pairs,
                      [{"user": "What is on the bus?", "assistant": "An advertisement.", "source": ...}]
                      (no tags: the images go before the first question, the LLaVA convention)
    image column (at most one of; absent: text only)
      image           one image per record (null: none)
      images          a list of images per record, in the order their tags appear
    id column         optional; a record without one (or with a null id) is "{source}-{row}"

An image is a `datasets.Image` value (or its raw {"bytes", "path"} struct): its bytes when it
has them, else its file `path` read under `image_root` with the LLaVA converter's checks
(missing_image, outside_image_root, undecodable_image, image_too_large). A plain string column
is a path too. Typed parts become text in order: a text part is its text, an image part is an
"<image>" tag, taking the next image of the `images` column (an image part's "index", when
present, must be that position: images are never reordered), and a tag is separated from a
text part next to it by "\\n" unless that text already has whitespace there:

    [{"type": "image"}, {"type": "text", "text": "What is on the bus?"}] -> "<image>\\nWhat is on the bus?"
    [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]  -> "Compare\\n<image><image>"

Other columns are not read (nor images inside content parts: images come from the image
column). Any other layout (no or several conversation columns, both image columns, an image
column that holds no images) is a ConversionError naming the dataset and its columns.
Positions in the rejects log: {"index": row in the split}.

WebDataset (`convert_webdataset`): tar shards whose samples (files sharing a key, the
webdataset convention: the key is the file name up to its first dot, so keys hold no dots) are

    000042.json         {"id"?, "conversations" | "messages" | "texts": [...]}, as above
    000042.jpg          one image: the extension jpg, jpeg, png, webp, gif, bmp, tif or tiff
    000042.0.png  000042.1.jpg  ...   several images: N.EXT, numbered 0, 1, ... in tag order

(an "image"/"images" field in the json is not read: a sample's images are its members).
Read with `webdataset`, nothing decoded. A sample without a json, with json that does not
parse (malformed_json), with an image member named otherwise, with both an unnumbered and
numbered images, or with a gap in the numbers (missing_image) is rejected; a sample without
an "id" is named by its key. Positions in the rejects log: {"sample": "SHARD/KEY"}.

    report = convert_hf("/data/ov_si", "/data/ov_si_ar", split="train")        # save_to_disk output
    report = convert_hf("/data/vsft/data", "/data/vsft_ar", image_root="/data/images")  # parquet
    report = convert_webdataset("/data/wds/train-{000000..000099}.tar", "/data/train_ar")
    print(report.summary())

Both commit every `chunk_size` input records, so a conversion rerun with the same input and
arguments into its unfinished out_dir resumes (`conversion._convert`'s resume).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import tarfile
from typing import Sequence

from data_pipelines.conversion import (
    CHUNK_SIZE,
    ConversionError,
    ConversionReport,
    ImagePolicy,
    _answers_need_questions,
    _check_schema,
    _check_tags,
    _check_text,
    _convert,
    _llava_turns,
    _read_image,
    _record_id,
    _Reject,
)
from data_pipelines.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, decode_image
from data_pipelines.records import IMAGE_TAG, ROLES, Example

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_STYLES = ("conversations", "messages", "texts")
_STYLE_KEYS = {"conversations": {"from", "value"}, "messages": {"role", "content"}, "texts": {"user", "assistant"}}
_IMAGE_COLUMNS = ("image", "images")
_BATCH = 256  # rows read from Arrow at a time


def _optional(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"reading this format needs the `{module}` package: "
                          f"pip install 'genieblue_jax[formats]'") from None


def _files_digest(paths: Sequence[str]) -> str:
    """What a resume must match of the input: every file's name, size and mtime (a directory's
    files, walked in sorted order)."""
    listing = []
    for path in paths:
        files = [path] if not os.path.isdir(path) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
        for f in files:
            st = os.stat(f)
            listing.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _check_counts(num_shards: int, chunk_size: int) -> None:
    for name, value in (("num_shards", num_shards), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Conversations and images -> Example (shared by both formats)

def _rows(value, where: str):
    """A list of turn/part objects; `datasets.Sequence` of a struct stores them column-wise
    ({"from": [...], "value": [...]}): turned back into rows."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            return [dict(zip(value, row)) for row in zip(*value.values())]
    if not isinstance(value, list) or not value:
        raise _Reject("malformed_record", f"{where} must be a non-empty list, got {value!r:.60}")
    return value


def _conversations_turns(convs) -> list[dict]:
    return _llava_turns(_rows(convs, "'conversations'"))  # the LLaVA converter's own turn checks


def _join_parts(parts, where: str, counter: list[int]) -> str:
    text = ""
    prev_image = False
    for j, part in enumerate(_rows(parts, where)):
        if not isinstance(part, dict):
            raise _Reject("malformed_record", f"{where}[{j}] is not an object")
        kind = part.get("type")
        if kind == "image":
            index = part.get("index")
            if index is not None and index != counter[0]:
                raise _Reject("malformed_record", f"{where}[{j}] is image part {counter[0]} of the record but "
                              f"has index {index!r:.20}; images are taken in order, never reordered")
            counter[0] += 1
            if text and not prev_image and not text[-1].isspace():
                text += "\n"
            text += IMAGE_TAG
            prev_image = True
        elif kind == "text":
            piece = part.get("text")
            if not isinstance(piece, str):
                raise _Reject("malformed_record", f"{where}[{j}].text must be a string, got {piece!r:.60}")
            if prev_image and piece and not piece[0].isspace():
                text += "\n"
            text += piece
            prev_image = False
        else:
            raise _Reject("malformed_record", f"{where}[{j}] has type {kind!r:.40}; expected 'text' or 'image'")
    return text


def _message_turns(msgs) -> list[dict]:
    turns, counter = [], [0]
    for i, msg in enumerate(_rows(msgs, "'messages'")):
        if not isinstance(msg, dict):
            raise _Reject("malformed_record", f"messages[{i}] is not an object")
        if msg.get("role") not in ROLES:
            raise _Reject("malformed_record", f"messages[{i}] has unknown role {msg.get('role')!r:.40}")
        content = msg.get("content")
        if isinstance(content, (list, dict)):
            content = _join_parts(content, f"messages[{i}].content", counter)
        turns.append({"role": msg["role"], "content": _check_text(content, f"messages[{i}].content")})
    return turns


def _texts_turns(texts) -> list[dict]:
    turns = []
    for i, pair in enumerate(_rows(texts, "'texts'")):
        if not isinstance(pair, dict):
            raise _Reject("malformed_record", f"texts[{i}] is not an object")
        turns += [{"role": "user", "content": _check_text(pair.get("user"), f"texts[{i}].user")},
                  {"role": "assistant", "content": _check_text(pair.get("assistant"), f"texts[{i}].assistant")}]
    return turns


def _example(rid: str, source: str, turns: list[dict], images: list, resolve) -> tuple[Example, list[str]]:
    """The LLaVA converter's checks in its order (text before any image is read); `resolve(k,
    image)` -> the k-th image's bytes or raises _Reject."""
    turns, adjusted = _answers_need_questions(turns)
    if images and not any(IMAGE_TAG in t["content"] for t in turns):
        # LLaVA convention: images without tags go before the first question.
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise _Reject("malformed_record", "record has images but no user turn to put them in")
        first_user["content"] = (IMAGE_TAG + "\n") * len(images) + first_user["content"]
    _check_tags(turns, len(images))
    _check_schema(Example(rid, source, turns, [b""] * len(images)))
    return Example(rid, source, turns, [resolve(k, im) for k, im in enumerate(images)]), adjusted


def _checked_bytes(data, where: str, max_pixels: int) -> bytes:
    """`data` unchanged if the pipeline's decoder accepts it (what converts here trains)."""
    if not isinstance(data, bytes):
        raise _Reject("malformed_record", f"{where}: image bytes expected, got {type(data).__name__}")
    try:
        decode_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        raise _Reject("image_too_large", f"{where}: {e}") from None
    except ImageDecodeError as e:
        raise _Reject("undecodable_image", f"{where}: {e}") from None
    return data


def _turns(obj: dict, where: str) -> list[dict]:
    styles = [s for s in _STYLES if s in obj]
    if len(styles) != 1:
        raise _Reject("malformed_record", f"{where} needs exactly one of {list(_STYLES)}, has keys {sorted(obj)[:12]}")
    parse = {"conversations": _conversations_turns, "messages": _message_turns, "texts": _texts_turns}[styles[0]]
    return parse(obj[styles[0]])


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets

@dataclasses.dataclass(frozen=True)
class HFLayout:
    """What `detect_hf_layout` found: the conversation `style` ("conversations" / "messages" / "texts"),
    the `image_column` ("image" / "images" / None) and whether it holds a list per record."""
    style: str
    image_column: str | None
    image_list: bool
    id_column: bool


def _is_image_feature(feature) -> bool:
    import datasets
    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string", "binary", "large_binary")  # a path, encoded bytes
    return isinstance(feature, dict) and set(feature) == {"bytes", "path"}  # Image storage without its metadata


def _element(feature):
    """The element feature of a list feature (List, LargeList, Sequence, [f]), else None."""
    if isinstance(feature, list) and len(feature) == 1:
        return feature[0]
    if type(feature).__name__ in ("List", "LargeList", "Sequence"):
        return feature.feature
    return None


def detect_hf_layout(features, where: str) -> HFLayout:
    """The layout of a dataset with these `datasets.Features` (module docstring); raises
    ConversionError naming `where` and the columns for any other layout."""
    columns = list(features)
    found = f"{where}: columns {columns}"
    styles = [c for c in _STYLES if c in features]
    if len(styles) != 1:
        raise ConversionError(
            f"{found}: unknown layout; expected one conversation column, 'conversations' (LLaVA: "
            "[{from, value}]), 'messages' ([{role, content}]) or 'texts' (the Cauldron: [{user, assistant}]), "
            "and optionally an 'image' or 'images' column")
    style = styles[0]
    conv = features[style]
    element = _element(conv)
    keys = _STYLE_KEYS[style]
    row_keys = set(element) if isinstance(element, dict) else set(conv) if isinstance(conv, dict) else set()
    if not keys <= row_keys:
        raise ConversionError(f"{found}: column {style!r} is {conv!r:.200}, not a list of {sorted(keys)} objects")
    images = [c for c in _IMAGE_COLUMNS if c in features]
    if len(images) > 1:
        raise ConversionError(f"{found}: both 'image' and 'images' columns; which holds the images is ambiguous")
    image_column, image_list = (images[0] if images else None), False
    if image_column is not None:
        feature = features[image_column]
        image_list = _element(feature) is not None
        if not _is_image_feature(_element(feature) if image_list else feature):
            raise ConversionError(f"{found}: column {image_column!r} is {feature!r:.200}: neither images "
                                  "(datasets.Image, or path strings) nor a list of them")
    return HFLayout(style, image_column, image_list, "id" in features)


@dataclasses.dataclass(frozen=True)
class _HFRecord:
    """convert_one for one row (a picklable object, not a closure: the driver may hand rows to
    worker processes)."""
    layout: HFLayout
    source: str
    image_root: str | None
    allow_outside_root: bool
    max_pixels: int

    def image(self, k: int, value) -> bytes:
        where = f"{self.layout.image_column}[{k}]" if self.layout.image_list else self.layout.image_column
        if isinstance(value, (str, bytes)):  # a path column, a binary column
            value = {"bytes": value, "path": None} if isinstance(value, bytes) else {"bytes": None, "path": value}
        if not isinstance(value, dict):
            raise _Reject("malformed_record", f"{where} is {value!r:.60}, not an image")
        if value.get("bytes") is not None:  # the path of an image with bytes is only its original name
            return _checked_bytes(value["bytes"], f"{where} ({value.get('path')})", self.max_pixels)
        if not value.get("path"):
            raise _Reject("malformed_record", f"{where} has neither bytes nor a path")
        if self.image_root is None:
            raise _Reject("missing_image", f"{where} is the file {value['path']!r} and no image_root was given "
                          "to read it from")
        return _read_image(ImagePolicy(self.image_root, self.allow_outside_root, self.max_pixels), value["path"])

    def __call__(self, row: dict, index: int) -> tuple[Example, list[str]]:
        layout = self.layout
        rid = _record_id({"id": row["id"]} if layout.id_column and row["id"] is not None else {},
                         f"{self.source}-{index}")
        turns = _turns({layout.style: row[layout.style]}, f"row {index}")
        images = row[layout.image_column] if layout.image_column else None
        images = [] if images is None else list(images) if layout.image_list else [images]
        if any(im is None for im in images):
            raise _Reject("malformed_record", f"{layout.image_column} {images!r:.60} holds a null image")
        return _example(rid, self.source, turns, images, self.image)


@contextlib.contextmanager
def _offline():
    """datasets' offline mode while loading: local files only, not even its download-count ping."""
    from datasets import config
    saved = config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS
    config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS = True, False
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def _pick_split(splits: dict, split: str | None, where: str):
    if split is None:
        if len(splits) != 1:
            raise ConversionError(f"{where} holds the splits {sorted(splits)}: choose one (split=, --split)")
        return next(iter(splits.values()))
    if split not in splits:
        raise ConversionError(f"{where} has no split {split!r}; it holds {sorted(splits)}")
    return splits[split]


def open_hf_dataset(dataset_dir: str, split: str | None = None):
    """The local Hugging Face dataset at `dataset_dir` (module docstring) as a `datasets.Dataset`
    (save_to_disk: memory-mapped Arrow) or `datasets.IterableDataset` (parquet, streamed), and
    its `HFLayout`. Raises FileNotFoundError for a missing path, ConversionError for a directory
    that is no dataset, an unknown split or an unknown layout."""
    datasets = _optional("datasets")
    if not os.path.exists(dataset_dir):
        raise FileNotFoundError(f"{dataset_dir}: no such Hugging Face dataset directory or parquet file")
    if os.path.isfile(os.path.join(dataset_dir, "state.json")) or \
            os.path.isfile(os.path.join(dataset_dir, "dataset_dict.json")):
        with _offline():
            ds = datasets.load_from_disk(dataset_dir)
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick_split(ds, split, dataset_dir)
        features = ds.features
    else:
        if os.path.isfile(dataset_dir):
            files, kwargs = [dataset_dir], {"data_files": {"train": [dataset_dir]}}
        else:
            files = sorted(glob.glob(os.path.join(glob.escape(dataset_dir), "**", "*.parquet"), recursive=True))
            kwargs = {"data_dir": dataset_dir}
        if not files or not files[0].endswith(".parquet"):
            raise ConversionError(f"{dataset_dir}: not a Hugging Face dataset (no state.json / dataset_dict.json "
                                  "of save_to_disk, no .parquet files)")
        with _offline():
            ds = _pick_split(datasets.load_dataset("parquet", streaming=True, **kwargs), split, dataset_dir)
        features = ds.features
        if features is None:  # parquet without datasets' metadata: the Arrow schema's own types
            import pyarrow.parquet as pq
            features = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
    return ds, detect_hf_layout(features, dataset_dir)


def _hf_rows(ds, layout: HFLayout):
    """(row index, raw row) over the dataset, a batch of Arrow rows at a time, images undecoded."""
    columns = [layout.style] + [c for c in (layout.image_column, "id" if layout.id_column else None) if c]
    index = 0
    for table in ds.select_columns(columns).with_format("arrow").iter(batch_size=_BATCH):
        for row in table.to_pylist():
            yield index, row
            index += 1


def convert_hf(dataset_dir: str, out_dir: str, *, split: str | None = None, image_root: str | None = None,
               num_shards: int = 1, max_reject_fraction: float = 0.1, source: str = "hf", num_workers: int = 8,
               allow_outside_image_root: bool = False, max_image_pixels: int = DEFAULT_MAX_PIXELS,
               chunk_size: int = CHUNK_SIZE) -> ConversionReport:
    """A local Hugging Face dataset (module docstring: save_to_disk directory, parquet directory
    or file; `split` for one holding several) -> an ArrayRecord dataset of Examples in `out_dir`,
    with `rejects.jsonl` ({"index": row, "id", "reason", "detail"}) and the returned report.

    Images with bytes are kept byte for byte; path-only images are read under `image_root`
    (inside it unless `allow_outside_image_root`), all checked to decode with at most
    `max_image_pixels` pixels, on `num_workers` threads. Committed every `chunk_size` rows:
    rerunning into an out_dir holding an unfinished conversion of the same dataset (its files'
    names, sizes and mtimes) and arguments resumes it. Raises FileNotFoundError (no such path),
    ConversionError (not a dataset, unknown split or layout, no rows, more than
    `max_reject_fraction` of the rows rejected: then no dataset is written, or an unfinished
    conversion of another input in `out_dir`), ValueError (a count < 1), ImportError without
    the `datasets` package. Example:

        report = convert_hf("/data/llava_onevision_saved", "/data/ov", split="train")
        print(report.summary())
    """
    _check_counts(num_shards, chunk_size)
    ds, layout = open_hf_dataset(dataset_dir, split)
    args = {"format": "hf", "input": os.path.abspath(dataset_dir), "input_files": _files_digest([dataset_dir]),
            "split": split, "image_root": image_root and os.path.abspath(image_root),
            "allow_outside_image_root": allow_outside_image_root, "max_image_pixels": max_image_pixels,
            "source": source, "num_shards": num_shards, "chunk_size": chunk_size}
    convert_one = _HFRecord(layout, source, image_root, allow_outside_image_root, max_image_pixels)
    return _convert(_hf_rows(ds, layout), "index", convert_one, dataset_dir, out_dir, num_shards=num_shards,
                    max_reject_fraction=max_reject_fraction, num_workers=num_workers, chunk_size=chunk_size,
                    resume_args=args)


# ---------------------------------------------------------------------------------------------
# WebDataset

_NUMBERED = re.compile(r"^(\d+)\.([^.]+)$")


def _wds_images(members: dict, where: str) -> list[tuple[str, bytes]]:
    """A sample's image members in tag order: one unnumbered EXT, or 0.EXT, 1.EXT, ..."""
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
            raise _Reject("malformed_record", f"{where}: image member {name!r} is neither EXT nor N.EXT "
                          "(one image: KEY.jpg; several: KEY.0.jpg, KEY.1.png, ...)")
    if len(plain) + bool(numbered) > 1:
        raise _Reject("malformed_record", f"{where}: images {sorted(n for n, _ in plain)} "
                      f"{sorted(n for n, _ in numbered.values())}: one unnumbered image or numbered ones, "
                      "the order is ambiguous")
    if plain:
        return plain
    gaps = [k for k in range(max(numbered, default=-1) + 1) if k not in numbered]
    if gaps:
        raise _Reject("missing_image", f"{where}: image(s) {gaps} missing (have {sorted(numbered)}; numbered "
                      "images run 0, 1, ...)")
    return [numbered[k] for k in sorted(numbered)]


@dataclasses.dataclass(frozen=True)
class _WdsRecord:
    """convert_one for one sample (picklable, as _HFRecord)."""
    source: str
    max_pixels: int

    def __call__(self, sample: dict, where: str) -> tuple[Example, list[str]]:
        obj = sample["json"]
        if not isinstance(obj, dict):
            raise _Reject("malformed_record", f"{where}.json is a JSON {type(obj).__name__}, not an object")
        rid = _record_id(obj, sample["key"])
        images = _wds_images(sample["members"], where)
        return _example(rid, self.source, _turns(obj, f"{where}.json"), images,
                        lambda k, im: _checked_bytes(im[1], f"{where}.{im[0]}", self.max_pixels))


def _wds_samples(urls):
    """("SHARD/KEY", sample) per sample; the json parsed here so that a rejected sample's log
    line carries its id."""
    wds = _optional("webdataset")
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
        key, url = sample["__key__"], sample["__url__"]
        where = f"{url}/{key}"
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        if "json" not in members:
            yield where, _Reject("malformed_record", f"{where}: no {key}.json member (members: {sorted(members)})")
            continue
        try:
            obj = json.loads(members.pop("json").decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield where, _Reject("malformed_json", f"{where}.json: {e}")
            continue
        rid = obj.get("id") if isinstance(obj, dict) else None
        yield where, {"id": rid, "key": key, "json": obj, "members": members}


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
    _check_counts(num_shards, chunk_size)
    wds = _optional("webdataset")
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
    args = {"format": "webdataset", "input": [os.path.abspath(u) for u in shards], "input_files": _files_digest(shards),
            "max_image_pixels": max_image_pixels, "source": source, "num_shards": num_shards, "chunk_size": chunk_size}
    return _convert(_wds_samples(shards), "sample", _WdsRecord(source, max_image_pixels), label, out_dir,
                    num_shards=num_shards, max_reject_fraction=max_reject_fraction, num_workers=num_workers,
                    chunk_size=chunk_size, resume_args=args)
