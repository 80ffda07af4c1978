"""The embedded demo (experiments/demo.py), reduced to fit CI: the main job's six steps with
fewer examples and steps, from an empty cache, then again from the cache.

What the main job promises, asserted on held-out questions: the MLLM answers image
questions well above chance, the base LLM learned its text tasks, the deployed model's text
answers are the base LLM's exactly (retention 100.00%), the shared-base ablation's text
score is below the base's.
"""
import json
import os

import pytest

from experiments import demo
from experiments.configs import stage2_skip

# The reduced demo: every step of the main job, with fewer examples and steps (stage 2 keeps its 150).
REDUCED = {"demo.train_examples": 2000, "demo.eval_examples": 120, "demo.pretrain_examples": 8000,
           "demo.pretrain_steps": 200, "demo.vision_steps": 200, "demo.stage1_steps": 10, "train.steps": 150}


def _config(cache_dir):
    c = stage2_skip.get_config("demo")
    for key, value in REDUCED.items():
        section, name = key.split(".")
        c[section][name] = value
    c.demo.cache_dir = str(cache_dir)
    return c


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    c = _config(root / "cache")
    return root, c, demo.run(c, str(root / "stage2_skip"), "stage2_skip")


def test_the_demo_learns_images_and_keeps_the_base_text_exactly(demo_run, capsys):
    root, c, out = demo_run
    runs = out["runs"]
    base, deployed, shared = runs["base LLM"], runs["deployed (non-shared base)"], runs["shared base"]
    print(demo.results_table(out))
    assert deployed["counts"]["answered"] == c.demo.eval_examples == shared["counts"]["answered"]
    vqa = deployed["by_source"]["vqa"]["accuracy"]
    assert vqa > out["chance"]["vqa"] + 20, (vqa, out["chance"])                # grounded in the image
    assert shared["by_source"]["vqa"]["accuracy"] == vqa                       # image requests: same weights
    assert base["counts"]["skipped"] == deployed["counts"]["answered"] - base["counts"]["answered"] > 0
    assert base["scores"]["text"] > 25                                         # the base learned its text tasks
    assert f"{deployed['retention']['text']:.2f}" == "100.00"                  # non-shared: the base, exactly
    text_ids = {p["id"] for p in base["predictions"]}
    assert [p["prediction"] for p in deployed["predictions"] if p["id"] in text_ids] == \
        [p["prediction"] for p in base["predictions"]]
    assert shared["scores"]["text"] < base["scores"]["text"]                   # shared base: text changed
    table = demo.results_table(out)
    assert "| deployed (non-shared base) |" in table and "100.00%" in table


def test_a_second_run_reuses_the_cache(demo_run, capsys):
    root, c, first = demo_run
    again = demo.run(c, str(root / "stage2_skip"), "stage2_skip")
    printed = capsys.readouterr().out
    assert printed.count("cached:") == 6  # data, base LLM, vision tower, stage 1, recipe, evaluation
    assert json.dumps(again["runs"], sort_keys=True) == json.dumps(first["runs"], sort_keys=True)
    for step in range(1, 7):
        assert f"[{step}/6]" in printed
    assert "python -m tools.chat --checkpoint" in printed and "tools.export_qnn" in printed
    assert os.path.isfile(os.path.join(root, "stage2_skip", "metrics.jsonl"))


def test_an_unknown_scene_names_the_config_key(tmp_path):
    c = _config(tmp_path)
    c.demo.scene = "crowd"
    with pytest.raises(ValueError, match=r"config demo.scene='crowd': choose from \('grid', 'single'\)"):
        demo.demo_data(c)
    assert not os.listdir(tmp_path)
