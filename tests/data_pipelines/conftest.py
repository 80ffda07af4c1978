"""Demo datasets and tokenizer written once per test session."""
import pytest

from experiments.demo_data import write_demo_datasets


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return write_demo_datasets(str(tmp_path_factory.mktemp("demo")), splits={"train": 300, "eval": 30},
                               seed=0, num_shards=2)
