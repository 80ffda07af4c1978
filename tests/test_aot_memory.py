"""tools.aot_memory plans the trainer's step with the TPU compiler (libtpu, the `tpu` extra)
for a TPU topology on this CPU-only machine: the plan prints and the verdict is its last line."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.llm=tiny-qwen2", "--config.model.vit=tiny-siglip", "--config.data.seq_len=128",
        "--config.data.max_tiles_per_row=4", "--config.train.global_batch_size=8", "--config.train.micro_batches=2",
        "--config.mesh.data=1", "--config.mesh.fsdp=-1"]


def _plan(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # Only the compiler is used (no chip), so libtpu's one-process lockfile must not make a
    # concurrent libtpu user (another test worker, a developer's own aot_memory run) fail this.
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    proc = subprocess.run([sys.executable, "-m", "tools.aot_memory", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"tools.aot_memory printed nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.returncode, lines


def test_a_small_stage2_step_compiles_for_a_v5e_2x2_slice():
    rc, lines = _plan("--config=stage2_skip", "--topology=v5e:2x2", *TINY)
    assert rc == 0, lines
    assert lines[0].startswith("stage2_skip (demo) on v5e:2x2: 4 x TPU v5 lite, mesh {'data': 1, 'fsdp': 4, "
                               "'tensor': 1}"), lines
    # 8 rows = 1 row per chip x 4 chips x 2 micro-steps; HBM from the device kind (v5e: 16 GiB).
    assert lines[1] == "  batch       1 rows/device x 4 batch shards x 2 micro-steps = 8 rows x 128 tokens " \
                       "(0.00M tokens) per step", lines
    # The LLM's attention (models.attention, "auto") lowered to the Pallas splash kernel for the
    # TPU, per device under the 4-chip mesh; on this CPU the same step runs XLA ops.
    assert lines[2] == "  attention   splash (Pallas TPU kernel)", lines
    total = float(lines[-2].split()[1])
    assert lines[-2].endswith("GB  of 17.18 GB") and 0 <= total < 1, lines  # a tiny model: well under 1 GB
    assert lines[-1].startswith("stage2_skip:demo on v5e:2x2: fits ("), lines


def test_the_paper_model_on_one_chip_does_not_fit():
    rc, lines = _plan("--config=stage2_skip:paper", "--topology=v5e:2x2", "--num_devices=1")
    assert rc == 1, lines
    # Qwen2.5-3B bf16 (frozen) + 1.2B trainable float32 weights with Adam's two moments: ~20 GB on one chip.
    assert lines[-1].startswith("stage2_skip:paper on 1 chip(s) of v5e:2x2: does not fit by "), lines
