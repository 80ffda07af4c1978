"""The engine benchmark trains the same trainable set as its PyTorch reference."""
import math

import pytest

from genieblue_jax.cli import benchmark_train
from tests.test_benchmark_torch_reference import EXPECTED

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it


@pytest.mark.parametrize("variant", sorted(benchmark_train.VARIANTS))
def test_engine_benchmark_trains_the_reference_parameter_split(variant):
    """Each variant's trainable / total counts (from shapes) equal the PyTorch reference's."""
    assert benchmark_train.parameter_split(variant, overrides=["mesh.data=1"]) == EXPECTED[variant]


def test_engine_benchmark_step_runs_and_counts_what_it_trained():
    """One variant through the whole benchmark (compiles the demo-qwen2 step): the parameters it
    initialised and trained are the reference's split (the other variants share the code)."""
    r = benchmark_train.benchmark_one("stage2_skip", batch_size=1, seq_len=96, tiles_per_row=1, steps=1, warmup=0,
                                      overrides=["mesh.data=1"])
    assert (r["trainable"], r["total"]) == EXPECTED["stage2_skip"]
    assert math.isfinite(r["first_loss"]) and r["step_s"] > 0
    # The MFU's FLOP count (train.metrics.step_flops) against XLA's own count of the compiled step.
    assert abs(r["xla_flops"] / r["flops"] - 1) < 0.10, (r["xla_flops"], r["flops"])


def test_benchmark_batch_has_the_reference_layout():
    b = benchmark_train.make_batch(2, 96, 2, image_size=56, tokens_per_tile=16)
    image = b["tokens"] == benchmark_train.IMAGE_TOKEN_ID
    assert image.sum(axis=1).tolist() == [32, 32] and image[:, 16:48].all()
    assert (b["loss_mask"] == ~image).all() and b["images"].shape == (2, 2, 56, 56, 3)
    with pytest.raises(ValueError, match="do not fit in seq_len=40"):
        benchmark_train.make_batch(1, 40, 2, image_size=56, tokens_per_tile=16)
