"""Hugging Face datasets -> the same checked `Example`s and ArrayRecord dataset as the LLaVA
converter (`convert_hf`), through the same checks (`checks`: reasons, identity, answers needing
questions, the LLaVA convention for untagged images) and driver (`driver`: rejects.jsonl, the
report, `max_reject_fraction`, chunks and resume). Images are stored as the original encoded
file bytes (never re-encoded) after they decode with the pipeline's own decoder.

    python -m data_pipelines.convert --format=hf --hf_dataset /data/the_cauldron_ai2d --split=train --out /data/ai2d

The input: a directory written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: pick
`split`), a directory of parquet files (splits inferred by `datasets`' file-name conventions,
e.g. `train-00000-of-00004.parquet`, `data/test-*.parquet`) or one parquet file; read locally
(nothing downloaded), a batch at a time (nothing materialised in Python lists) and never
decoded (the columns' Arrow storage is read: an image is its {"bytes", "path"} struct). The
layout is read from the features:

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
is a path too. Typed parts become text in order (`checks.message_turns`): a text part is its
text, an image part is an "<image>" tag, taking the next image of the `images` column (an
image part's "index", when present, must be that position: images are never reordered), and a
tag is separated from a text part next to it by "\\n" unless that text already has whitespace
there:

    [{"type": "image"}, {"type": "text", "text": "What is on the bus?"}] -> "<image>\\nWhat is on the bus?"
    [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]  -> "Compare\\n<image><image>"

Other columns are not read (nor images inside content parts: images come from the image
column). Any other layout (no or several conversation columns, both image columns, an image
column that holds no images) is a ConversionError naming the dataset and its columns.
Positions in the rejects log: {"index": row in the split}.

    report = convert_hf("/data/ov_si", "/data/ov_si_ar", split="train")        # save_to_disk output
    report = convert_hf("/data/vsft/data", "/data/vsft_ar", image_root="/data/images")  # parquet
    print(report.summary())
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
from typing import Any

from data_pipelines.conversion.checks import (
    CONVERSATION_STYLES,
    ImagePolicy,
    Reject,
    answers_need_questions,
    conversation_turns,
    image_bytes,
    read_image,
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

_STYLE_KEYS = {"conversations": {"from", "value"}, "messages": {"role", "content"}, "texts": {"user", "assistant"}}
_IMAGE_COLUMNS = ("image", "images")
_BATCH = 256  # rows read from Arrow at a time


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
    styles = [c for c in CONVERSATION_STYLES if c in features]
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
    datasets = import_optional("datasets")
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


@dataclasses.dataclass(frozen=True)
class HFReader:
    """The driver's `Reader` of one opened dataset (`open_hf_dataset`); in one process (the
    dataset object is not meant to be pickled), rows converted on the driver's threads."""
    dataset: Any
    layout: HFLayout
    source: str
    image_root: str | None
    allow_outside_root: bool
    max_pixels: int
    label = "index"

    def records(self):
        """(row index, raw row) over the dataset, a batch of Arrow rows at a time, images undecoded."""
        layout = self.layout
        columns = [layout.style] + [c for c in (layout.image_column, "id" if layout.id_column else None) if c]
        index = 0
        for table in self.dataset.select_columns(columns).with_format("arrow").iter(batch_size=_BATCH):
            for row in table.to_pylist():
                yield index, row
                index += 1

    def threaded(self, row) -> bool:
        """Always: a row's images are checked (decoded) or read."""
        return True

    def image(self, k: int, value) -> bytes:
        """The bytes of the row's `k`-th image `value` (a {"bytes", "path"} struct, a path or
        bytes): its bytes when it has them, else the file under `image_root`; raises Reject."""
        where = f"{self.layout.image_column}[{k}]" if self.layout.image_list else self.layout.image_column
        if isinstance(value, (str, bytes)):  # a path column, a binary column
            value = {"bytes": value, "path": None} if isinstance(value, bytes) else {"bytes": None, "path": value}
        if not isinstance(value, dict):
            raise Reject("malformed_record", f"{where} is {value!r:.60}, not an image")
        if value.get("bytes") is not None:  # the path of an image with bytes is only its original name
            return image_bytes(value["bytes"], f"{where} ({value.get('path')})", self.max_pixels)
        if not value.get("path"):
            raise Reject("malformed_record", f"{where} has neither bytes nor a path")
        if self.image_root is None:
            raise Reject("missing_image", f"{where} is the file {value['path']!r} and no image_root was given "
                         "to read it from")
        return read_image(ImagePolicy(self.image_root, self.allow_outside_root, self.max_pixels), value["path"])

    def convert(self, row: dict, index: int) -> tuple[Example, list[str]]:
        """(Example, adjustments) of one row; raises Reject."""
        layout = self.layout
        rid = record_id({"id": row["id"]} if layout.id_column and row["id"] is not None else {},
                        f"{self.source}-{index}")
        turns = conversation_turns({layout.style: row[layout.style]}, f"row {index}")
        images = row[layout.image_column] if layout.image_column else None
        images = [] if images is None else list(images) if layout.image_list else [images]
        if any(im is None for im in images):
            raise Reject("malformed_record", f"{layout.image_column} {images!r:.60} holds a null image")
        turns, adjusted = answers_need_questions(turns)
        return with_images(rid, self.source, turns, images, self.image), adjusted


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
    check_counts(num_shards=num_shards, chunk_size=chunk_size)
    ds, layout = open_hf_dataset(dataset_dir, split)
    args = {"format": "hf", "input": os.path.abspath(dataset_dir), "input_files": files_digest([dataset_dir]),
            "split": split, "image_root": image_root and os.path.abspath(image_root),
            "allow_outside_image_root": allow_outside_image_root, "max_image_pixels": max_image_pixels,
            "source": source, "num_shards": num_shards, "chunk_size": chunk_size}
    reader = HFReader(ds, layout, source, image_root, allow_outside_image_root, max_image_pixels)
    return run(reader, out_dir, input_label=dataset_dir, num_shards=num_shards, chunk_size=chunk_size,
               max_reject_fraction=max_reject_fraction, num_threads=num_workers, resume_args=args)
