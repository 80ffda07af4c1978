"""genieblue_jax.evaluate: data loading (LLaVA JSON with rejects, converted datasets), scoring
(exact match, multiple choice, per source), mode routing and retention.

The scoring is checked against a scripted model whose answers are known, so every count
and percentage below is exact; real trained models are evaluated in tests/test_demo.py and
tests/test_user_path.py.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines.records import Example, ShardedWriter
from genieblue_jax import evaluate


def _png(path, colour):
    Image.fromarray(np.full((20, 30, 3), colour, np.uint8)).save(path)
    return os.path.basename(path)


def _llava_json(tmp_path):
    records = [
        {"id": "q1", "image": _png(tmp_path / "red.png", (255, 0, 0)),
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                           {"from": "gpt", "value": "Red."}]},
        {"id": "q2", "image": _png(tmp_path / "blue.png", (0, 0, 255)),
         "conversations": [{"from": "human", "value": "<image>\nWhich colour?\nA. red\nB. blue"},
                           {"from": "gpt", "value": "B"}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "What is 3 + 4?"}, {"from": "gpt", "value": "7"}]},
        {"id": "t2", "conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]},
        {"id": "bad", "image": "missing.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
    ]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(records))
    return str(path)


class ScriptedModel:
    """Answers from a table keyed by the last user turn; records which mode each call used."""
    is_mllm, path = True, "scripted"

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, images=None, mode=None, max_new_tokens=32):
        self.calls.append((mode, len(prompts), [im is not None for im in images]))
        return [self.answers[p[-1]["content"]] for p in prompts]


ANSWERS = {"<image>\nWhat colour is it?": " red ", "<image>\nWhich colour?\nA. red\nB. blue": "(b) blue",
           "What is 3 + 4?": "7", "What is 2 + 2?": "5"}


def test_llava_json_loads_and_bad_records_are_reported(tmp_path):
    examples, rejects = evaluate.load_examples([_llava_json(tmp_path)])
    assert [ex.id for ex in examples] == ["q1", "q2", "t1", "t2"]
    assert [len(ex.images) for ex in examples] == [1, 1, 0, 0]
    assert len(rejects) == 1 and rejects[0]["id"] == "bad" and rejects[0]["index"] == 4
    assert "missing.png" in rejects[0]["detail"]
    assert [ex.id for ex in evaluate.load_examples([_llava_json(tmp_path)], limit=2)[0]] == ["q1", "q2"]


def test_scores_modes_and_retention_are_exact(tmp_path):
    examples, _ = evaluate.load_examples([_llava_json(tmp_path)])
    model = ScriptedModel(ANSWERS)
    deployed = evaluate.evaluate(model, examples, mode="multimodal")
    assert deployed["counts"] == {"examples": 4, "answered": 4, "skipped": 0}
    # " red " == "Red." after normalize; "(b) blue" picks option B; 7 right, 5 wrong.
    assert deployed["scores"]["multimodal"] == 100.0 and deployed["scores"]["text"] == 50.0
    assert deployed["scores"]["multiple_choice"] == 100.0 and deployed["scores"]["exact_match"] == 200 / 3
    assert {p["id"]: p["metric"] for p in deployed["predictions"]}["q2"] == "multiple_choice"
    assert deployed["by_source"] == {"questions": {"n": 4, "accuracy": 75.0}}
    assert {mode for mode, _, _ in model.calls} == {None}  # deployed routing: per request

    base = evaluate.evaluate(ScriptedModel({**ANSWERS, "What is 2 + 2?": "4"}), examples, mode="text")
    assert base["counts"] == {"examples": 4, "answered": 2, "skipped": 2} and base["skipped_ids"] == ["q1", "q2"]
    assert base["scores"]["text"] == 100.0 and base["scores"]["multimodal"] is None
    evaluate.add_retention(deployed, base)
    assert deployed["retention"] == {"text": 50.0, "overall": 75.0, "exact_match": 200 / 3}

    shared = ScriptedModel(ANSWERS)
    evaluate.evaluate(shared, examples, mode="shared")
    assert {mode for mode, _, _ in shared.calls} == {"shared"}
    table = evaluate.table({"deployed": deployed, "base": base})
    assert "| deployed | multimodal | 50.00 | 100.00 | 75.00 |" in table and "| base | text | 100.00 | - |" in table


def test_converted_dataset_directories_load(tmp_path):
    writer = ShardedWriter(str(tmp_path / "ds"), num_shards=1)
    for i in range(3):
        writer.write(Example(f"e{i}", "text", [{"role": "user", "content": f"{i} + 1?"},
                                               {"role": "assistant", "content": str(i + 1)}], []))
    writer.close()
    examples, rejects = evaluate.load_examples([str(tmp_path / "ds")])
    assert [ex.id for ex in examples] == ["e0", "e1", "e2"] and rejects == []


def test_bad_input_names_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        evaluate.load_examples([str(tmp_path / "nowhere.json")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        evaluate.load_examples([str(tmp_path / "empty")])
    path = _llava_json(tmp_path)
    with pytest.raises(ValueError, match="duplicate example ids \\['q1'"):
        evaluate.load_examples([path, path])
    with pytest.raises(ValueError, match="mode='both'"):
        evaluate.evaluate(ScriptedModel(ANSWERS), [], mode="both")
    llm_only = ScriptedModel(ANSWERS)
    llm_only.is_mllm = False
    with pytest.raises(ValueError, match="LLM only"):
        evaluate.evaluate(llm_only, [], mode="shared")
    assert evaluate.retention(10.0, 0.0) is None and evaluate.retention(49.5, 50.0) == 99.0
