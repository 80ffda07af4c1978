"""The paper's #Param column (Tables 4-5), exactly, from abstract shapes."""
import os
import subprocess
import sys

import pytest

from genieblue_jax.structure.report import paper_table, storage_summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAPER = {"Full fine-tune": "3527.81M", "LoRA": "456.84M",
         **{f"CogVLM-{p}": "1146.75M" for p in ("Post", "Pre", "Skip")},
         **{f"GenieBlue-{p}": "1146.79M" for p in ("Post", "Pre", "Skip")}}


@pytest.mark.slow
def test_paper_param_column_exactly():
    rows = {r.name: r for r in paper_table("qwen2.5-3b", "siglip-so400m-384")}
    assert {n: f"{r.paper_param / 1e6:.2f}M" for n, r in rows.items()} == PAPER
    # The exact integers behind them.
    assert rows["Full fine-tune"].paper_param == 3_527_809_088
    assert rows["LoRA"].paper_param == 456_837_184
    assert rows["CogVLM-Skip"].paper_param == 1_146_751_552
    assert rows["GenieBlue-Skip"].paper_param == 1_146_788_416
    # Stage 1 trains the projector only; the pooling head (15,238,352) is never trained.
    assert {r.stage1_trainable for r in rows.values()} == {13_644_800}
    assert all(r.paper_param - r.stage2_trainable == 15_238_352 for r in rows.values())
    assert rows["GenieBlue-Skip"].deploy_text == 3_085_938_688


def test_storage_at_paper_precisions():
    s = storage_summary()
    assert s["llm_only"] == 3_085_938_688 // 2
    assert s["genieblue"] - s["base_mllm"] == 693_692_928 // 2 + 11_225_088  # copies W4, LoRA W8


@pytest.mark.slow
def test_cli_prints_the_table():
    run = subprocess.run([sys.executable, "-m", "tools.param_report", "--llm=qwen2.5-3b",
                          "--vit=siglip-so400m-384"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name, figure in PAPER.items():
        line = next(x for x in run.stdout.splitlines() if x.startswith(f"| {name} "))
        assert figure in line, line
