"""TFDS datasets of `Example`s, built and read without TensorFlow (ArrayRecord file format).

TFDS writes and random-reads the ArrayRecord file format (`tfds.data_sources`) with
numpy only, as long as every feature is one that needs no TF: here `Text`, `Sequence`
and `Tensor(shape=(), dtype=np.object_)` (raw bytes). `EXAMPLE_FEATURES` stores the
Example fields as they are: id, source, turns ({"role": [...], "content": [...]}) and
images (the encoded image files, untouched).

    builder = ExampleDataset(examples={"train": train, "validation": val}, data_dir="/data/tfds")
    builder.download_and_prepare()                          # array_record, offline, no TF
    source = TfdsExampleSource("example_dataset", "train", data_dir="/data/tfds")
    source = TfdsExampleSource(builder.data_dir, "validation")   # or the prepared directory
    dataset = grain.MapDataset.source(source)

Any TFDS dataset with the `EXAMPLE_FEATURES` fields can be read with `TfdsExampleSource`;
`ExampleDataset(examples={split: examples})` builds one from Examples given in code.
"""
import os
import pathlib
from collections.abc import Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.records import Example, check_example

EXAMPLE_FEATURES = {
    "id": tfds.features.Text(),
    "source": tfds.features.Text(),
    "turns": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
}


def example_to_features(ex: Example) -> dict:
    """Example -> the dict a TFDS builder yields for `EXAMPLE_FEATURES`."""
    check_example(ex)
    return {"id": ex.id, "source": ex.source,
            "turns": {"role": [t["role"] for t in ex.turns],
                      "content": [t["content"] for t in ex.turns]},
            "images": list(ex.images)}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def features_to_example(features: Mapping) -> Example:
    """A decoded TFDS record (bytes for text, as the data source returns it) -> Example."""
    turns = features["turns"]
    ex = Example(_text(features["id"]), _text(features["source"]),
                 [{"role": _text(r), "content": _text(c)} for r, c in zip(turns["role"], turns["content"])],
                 [bytes(im) for im in features["images"]])
    check_example(ex)
    return ex


class _ThisFile:
    """Class attribute with this module's path (see `ExampleDataset.code_path`)."""

    def __get__(self, obj, cls) -> pathlib.Path:
        return pathlib.Path(__file__)


class ExampleDataset(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of Example datasets (registered name "example_dataset").

    `examples` maps split name -> iterable of Examples (ids unique within a split); records
    keep the given order (shuffling is Grain's job). A duplicate id is a ValueError naming the
    split, the id and the record index. Without `examples` the builder reads a prepared dataset
    only (`download_and_prepare()` is then a ValueError).
    """
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Example schema version 1."}
    # TFDS 4.9.10 finds a builder's file (only to look for a checksums.tsv of download URLs;
    # we download nothing) through `importlib_resources`, a package it does not depend on:
    # without it download_and_prepare() fails with "No module named 'importlib_resources'"
    # (tensorflow/datasets#11212). Our path is known, so say it.
    code_path = _ThisFile()

    def __init__(self, *, examples: Mapping[str, Iterable[Example]] | None = None, **kwargs):
        self._examples = examples
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="GenieBlue chat Examples (data_pipelines.records).",
            features=tfds.features.FeaturesDict(EXAMPLE_FEATURES), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        if self._examples is None:  # None: a builder that only reads (tfds.builder(name))
            raise ValueError("ExampleDataset needs examples={split: [Example, ...]} to prepare a dataset")
        return {split: self._generate_examples(split, exs) for split, exs in self._examples.items()}

    def _generate_examples(self, split, examples):
        seen = set()
        for i, ex in enumerate(examples):
            if ex.id in seen:
                raise ValueError(f"split {split!r}: duplicate example id {ex.id!r} (record {i})")
            seen.add(ex.id)
            yield i, example_to_features(ex)


class TfdsExampleSource:
    """A prepared TFDS dataset split as a Grain `RandomAccessDataSource` of Examples.

    `name_or_dir`: a registered / prepared dataset name (found under `data_dir`), or a
    prepared dataset directory (the one holding dataset_info.json). `split` may slice,
    e.g. "train[:100]". The dataset must have been prepared with file_format="array_record".
    """

    def __init__(self, name_or_dir: str, split: str, data_dir: str | None = None):
        if os.path.isfile(os.path.join(name_or_dir, "dataset_info.json")):
            builder = tfds.builder_from_directory(name_or_dir)
        else:
            builder = tfds.builder(name_or_dir, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(f"TFDS dataset {name_or_dir!r} is not prepared in "
                                    f"{builder.data_dir}; run download_and_prepare() first")
        file_format = builder.info.file_format
        if file_format is None or file_format.value != "array_record":
            raise ValueError(f"TFDS dataset {name_or_dir!r} ({builder.data_dir}) was prepared as "
                             f"{file_format}; random access needs file_format='array_record'")
        missing = sorted(set(EXAMPLE_FEATURES) - set(builder.info.features.keys()))
        if missing:
            raise ValueError(f"TFDS dataset {name_or_dir!r} lacks the Example feature(s) {missing}")
        self.name, self.split, self.data_dir = builder.name, split, builder.data_dir
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def _check(self, index: int) -> int:
        n = len(self._source)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} {self.split!r} ({n} records)")
        return index % n

    def __getitem__(self, index: int) -> Example:
        return features_to_example(self._source[self._check(index)])

    def __getitems__(self, indices) -> list[Example]:
        """Batched read (Grain uses it when present)."""
        if not len(indices):
            return []
        return [features_to_example(f)
                for f in self._source.__getitems__([self._check(i) for i in indices])]

    def __repr__(self) -> str:
        return f"TfdsExampleSource({self.name!r}, {self.split!r}, {len(self)} records, {self.data_dir})"
