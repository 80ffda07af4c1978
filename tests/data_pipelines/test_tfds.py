"""TFDS builder -> ArrayRecord files -> TfdsExampleSource, all without TensorFlow."""
import pickle
import sys

import grain
import pytest
import tensorflow_datasets as tfds

from data_pipelines.records import Example
from data_pipelines.tfds_source import ExampleDataset, TfdsExampleSource


def examples(split: str, n: int) -> list[Example]:
    out = []
    for i in range(n):
        k = i % 3  # text-only, one image, two images
        out.append(Example(
            f"{split}-{i}", ("text", "caption", "vqa")[k],
            [{"role": "system", "content": "sé brief"}] * (i % 2) + [
                {"role": "user", "content": "<image>\n" * k + f"q{i} ✓"},
                {"role": "assistant", "content": f"a{i}\x00end"}],
            [bytes(range(256)) * (j + 1) + bytes([i]) for j in range(k)]))
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    splits = {"train": examples("train", 7), "validation": examples("validation", 3)}
    tfds.display_progress_bar(False)
    builder = ExampleDataset(data_dir=data_dir, examples=splits)
    builder.download_and_prepare()
    return data_dir, builder, splits


def test_builder_to_source_round_trip_is_exact(prepared):
    data_dir, builder, splits = prepared
    assert builder.info.file_format.value == "array_record"
    assert "tensorflow" not in sys.modules  # TFDS wrote and reads this with numpy only
    for split, exs in splits.items():
        by_name = TfdsExampleSource("example_dataset", split, data_dir=data_dir)
        by_dir = TfdsExampleSource(builder.data_dir, split)
        assert len(by_name) == len(by_dir) == len(exs)
        assert [by_name[i] for i in range(len(exs))] == exs
        assert [by_dir[i] for i in range(len(exs))] == exs
    source = TfdsExampleSource(builder.data_dir, "train")
    train = splits["train"]
    assert list(grain.MapDataset.source(source)) == train
    assert source.__getitems__([6, 0, 2]) == [train[6], train[0], train[2]]
    assert source[-1] == train[-1]
    assert pickle.loads(pickle.dumps(source))[4] == train[4]
    sliced = TfdsExampleSource(builder.data_dir, "train[2:5]")
    assert [sliced[i] for i in range(len(sliced))] == train[2:5]
    with pytest.raises(IndexError, match=r"index 7 out of range for example_dataset 'train' \(7 records\)"):
        source[7]


def test_builder_rejects_duplicate_ids(tmp_path):
    exs = examples("train", 3)
    builder = ExampleDataset(data_dir=str(tmp_path), examples={"train": exs + [exs[1]]})
    with pytest.raises(ValueError, match="split 'train': duplicate example id 'train-1' \\(record 3\\)"):
        builder.download_and_prepare()


def test_unprepared_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="'example_dataset' is not prepared"):
        TfdsExampleSource("example_dataset", "train", data_dir=str(tmp_path))
