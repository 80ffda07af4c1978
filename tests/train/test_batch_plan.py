"""The batch a step trains on, planned against the mesh (trainer.batch_plan), and laid out so
that every micro-step runs on all devices without moving rows between them."""
import types

import jax
import pytest

from experiments.configs import load
from genieblue_jax.cli import aot_memory
from genieblue_jax.train import trainer
from tests.train.conftest import tiny_config


def _mesh(**shape):
    return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, **shape})


@pytest.mark.parametrize("chips,data,fsdp", [(8, 1, 8), (16, 1, 16), (32, 1, 32), (64, 1, 64), (128, 1, 128),
                                             (256, 2, 128)])
def test_the_paper_recipe_fits_every_pod_size(chips, data, fsdp):
    # Stated per device, the paper's stage 2 makes a batch for any mesh: 1 row per chip per
    # micro-step, the paper's 10 accumulation steps, 4096-token rows.
    plan = trainer.batch_plan(load("stage2_skip", "paper"), _mesh(data=data, fsdp=fsdp))
    assert plan == {"rows_per_device": 1, "batch_shards": chips, "micro_batches": 10, "global_rows": 10 * chips,
                    "tokens_per_step": 10 * chips * 4096}
    assert trainer.batch_plan(load("stage1", "paper"), _mesh(data=data, fsdp=fsdp))["global_rows"] == 4 * chips


def test_a_global_batch_is_checked_against_the_mesh():
    c = tiny_config(**{"train.global_batch_size": 24, "train.micro_batches": 3})
    assert trainer.batch_plan(c, _mesh(data=8)) == {"rows_per_device": 1, "batch_shards": 8, "micro_batches": 3,
                                                    "global_rows": 24, "tokens_per_step": 24 * 96}
    with pytest.raises(trainer.ConfigError, match=r"global_batch_size=24 with train.micro_batches=3 gives "
                                                  r"micro-batches of 8 rows, not a whole number of rows for each "
                                                  r"of the mesh's data x fsdp = 16 batch shards"):
        trainer.batch_plan(c, _mesh(data=2, fsdp=8))
    c = tiny_config(**{"train.rows_per_device": 2, "train.global_batch_size": 8})
    with pytest.raises(trainer.ConfigError, match=r"global_batch_size=8 disagrees with train.rows_per_device=2 x "
                                                  r"8 batch shards .* = 16"):
        trainer.batch_plan(c, _mesh(fsdp=8))


@pytest.mark.slow
def test_micro_batches_are_spread_over_all_devices():
    # The trainer's step (tools.aot_memory compiles exactly what train() runs), 4 micro-steps on
    # 4 data-parallel devices (parameters replicated: any all-to-all or collective-permute would
    # move batch rows): each device's rows hold a share of every micro-batch, so none is there.
    # (The contiguous split, micro-batch j = rows [4j, 4j + 4), compiles to all-to-alls.)
    c = tiny_config(**{"train.global_batch_size": 16, "train.micro_batches": 4, "mesh.data": 4})
    r = aot_memory.plan(c, jax.devices()[:4])
    assert r["batch"]["rows_per_device"] == 1 and r["batch"]["global_rows"] == 16
    hlo = r["compiled"].as_text()
    assert "all-reduce" in hlo  # the data-parallel gradient sum is there: the check reads the real step
    for op in ("all-to-all", "collective-permute"):
        assert op not in hlo, op
