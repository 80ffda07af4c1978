"""genieblue_jax.vlmeval and `tools.evaluate --format=vlmeval`: VLMEvalKit's MCQ TSV layout,
its exact-matching letter extraction, vanilla and circular scoring, its result files.

A 40-row MMBench-style TSV is built from the demo's rendered scenes (4 categories, each 2
questions with 3 circular copies + 2 single questions) and answered by a scripted model
whose answers are fixed per row, so every accuracy below is exact and computed by hand
(the plan in `PLAN`). The command line runs once end to end on a random-init tiny MLLM
(its answers are noise; the path is what is tested: TSV -> base64 images -> generation ->
files).
"""
import base64
import io
import json
import re
from functools import partial

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from genieblue_jax import vlmeval

TASKS = ("count_colour", "colour_of", "shape_of", "exists_colour")
L2 = {"count_colour": "perception", "exists_colour": "perception", "colour_of": "attribute", "shape_of": "attribute"}
LETTERS = "ABCD"
# Per category: question 0 and 1 (main rows + 3 circular copies each, copies 0..3), questions
# 2 and 3 (single rows). Each entry: (answer style, right?); a wrong answer names the next letter.
PLAN = {
    "count_colour": [[("letter", 1), ("paren", 1), ("dot", 1), ("sentence", 1)],
                     [("bracket", 1), ("text", 1), ("letter", 0), ("paren", 1)],
                     [("sentence", 1)], [("letter", 0)]],
    "colour_of": [[("text", 1)] * 4,
                  [("letter", 1), ("dot", 1), ("sentence", 1), ("either", 1)],
                  [("unsure", 1)], [("bracket", 1)]],
    "shape_of": [[("letter", 0), ("text", 0), ("paren", 0), ("dot", 0)],
                 [("letter", 1)] * 4,
                 [("text", 1)], [("sentence", 1)]],
    "exists_colour": [[("paren", 1)] * 4, [("text", 1)] * 4, [("dot", 0)], [("text", 0)]],
}
STYLES = {"letter": "{L}", "paren": "({L})", "dot": "{L}. {T}", "bracket": "{L}) {T}", "sentence": "The answer is {L}",
          "text": "{T}", "either": "A or B", "unsure": "I cannot say."}


def _options(task, answer, position):
    from experiments.demo_data import COLOURS, NUMBER_WORDS, SHAPES
    pool = {"count_colour": list(NUMBER_WORDS), "colour_of": list(COLOURS), "shape_of": [*SHAPES, "star"],
            "exists_colour": ["yes", "no", "maybe", "sometimes"]}[task]
    others = [o for o in pool if o != answer][:3]
    return others[:position] + [answer] + others[position:]


def _mmbench_tsv(path):
    """The 40-row TSV (MMBench's column order) and {index: the scripted answer}."""
    from experiments.demo_data import answer_of, demo_item
    found = {t: [] for t in TASKS}
    i = 0
    while any(len(v) < 4 for v in found.values()):
        ex, meta = demo_item("mcq", i, 0, mixture={"vqa": 1})
        if meta["task"] in found and len(found[meta["task"]]) < 4:
            found[meta["task"]].append(ex)
        i += 1
    rows, answers = [], {}
    for t, task in enumerate(TASKS):
        for b, ex in enumerate(found[task]):
            main = 10 * t + b
            base = _options(task, answer_of(ex), main % 4)
            for k, (style, right) in enumerate(PLAN[task][b]):
                opts = base[k:] + base[:k]  # circular copy k: the options shifted by k
                correct = LETTERS[opts.index(answer_of(ex))]
                index = k * vlmeval.CIRCULAR_OFFSET + main
                chosen = correct if right else LETTERS[(LETTERS.index(correct) + 1) % 4]
                answers[index] = STYLES[style].format(L=chosen, T=opts[LETTERS.index(chosen)])
                rows.append({"index": index, "question": ex.turns[0]["content"].removeprefix("<image>\n"),
                             "hint": None if b == 3 else f"Scene {main}.", **dict(zip(LETTERS, opts)),
                             "answer": correct, "category": task,
                             "image": base64.b64encode(ex.images[0]).decode() if k == 0 else str(main),
                             "source": "demo", "l2-category": L2[task]})
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return str(path), answers


class ScriptedModel:
    """Answers from {prompt text: answer}; records each call's mode and images."""
    is_mllm, path = True, "scripted"

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, images=None, mode=None, max_new_tokens=32):
        self.calls.append((mode, [p[-1]["content"] for p in prompts], images))
        return [self.answers[p[-1]["content"]] for p in prompts]


@pytest.fixture(scope="module")
def mmbench(tmp_path_factory):
    path, by_index = _mmbench_tsv(tmp_path_factory.mktemp("vlmeval") / "DemoBench.tsv")
    bench = vlmeval.load_benchmark(path)
    prompts = {q.index: vlmeval.build_prompt(q) for q in bench.questions}
    assert len(set(prompts.values())) == 40  # the scripted answers are keyed by prompt
    return {"path": path, "bench": bench, "answers": {prompts[i]: a for i, a in by_index.items()},
            "by_index": by_index}


def test_letter_extraction_follows_vlmevalkit():
    """Values derived by hand from VLMEvalKit's `can_infer_option` / `can_infer_text`
    (vlmeval/utils/matching_util.py) and `extract_answer_from_item` without a judge."""
    opts = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    picks = {
        "B": "B", "(B)": "B", "B. blue": "B", "B) blue": "B", "The answer is B": "B", "[B]": "B",
        "The correct answer is **C**.": "C",   # one letter word, among the last 4 words
        "blue": "B", "It is Blue.": "B",        # can_infer_text: option B's text, case-insensitive
        "A red circle": "A",                    # the lone letter word "A" (VLMEvalKit's quantifier caveat)
        "A or B": "Z",                          # two letter words: ambiguous
        "red or blue": "Z",                     # two options' texts
        "purple": "Z", "": "Z",                 # nothing
        "Cannot determine the answer": "Z",     # a refusal
        "B is right since the object shown in the picture here is a very small one": "Z",  # B too early
        "the answer is d": "D",                 # the verbose-answer pattern is case-insensitive
        "E": "Z",                               # not an option of this question
    }
    got = {answer: vlmeval.extract_option(answer, opts) for answer in picks}
    assert got == picks
    assert vlmeval.can_infer_option("Failed to obtain answer via API", opts) is None
    assert vlmeval.can_infer_option("Z", opts) == "Z" and vlmeval.can_infer_option("A or B", opts) is None
    # can_infer_text gives up on an answer longer than twice the options' total length (2 * 18)
    assert vlmeval.can_infer_text("blue " + "x" * 31, opts) == "B"
    assert vlmeval.can_infer_text("blue " + "x" * 32, opts) is None


def test_mmbench_style_tsv_scores_exactly(mmbench, tmp_path):
    bench = mmbench["bench"]
    assert bench.rows == 40 and len(bench.questions) == 40 and bench.rejected == [] and bench.circular
    q = next(q for q in bench.questions if q.index == 1_000_001)  # copy 1 of question 1: row 1's image
    main = next(q for q in bench.questions if q.index == 1)
    assert q.images == main.images and len(q.images) == 1 and q.images[0].startswith(b"\x89PNG")
    assert vlmeval.build_prompt(q) == (f"Hint: Scene 1.\nQuestion: {q.question}\nOptions:\n"
                                       + "".join(f"{k}. {q.options[k]}\n" for k in LETTERS)
                                       + "Please select the correct answer from the options above. \n")
    single = next(q for q in bench.questions if q.index == 3)  # no hint
    assert vlmeval.build_prompt(single).startswith(f"Question: {single.question}\nOptions:\nA. ")

    model = ScriptedModel(mmbench["answers"])
    result = vlmeval.evaluate(model, bench, mode="multimodal", batch_size=16)
    assert {mode for mode, _, _ in model.calls} == {None}  # deployed routing: per request
    assert all(ims is not None and len(ims) == 1 for _, _, images in model.calls for ims in images)
    assert result["counts"] == {"rows": 40, "questions": 40, "answered": 40, "skipped": 0, "rejected": 0,
                                "scored": 40, "failed_extraction": 2, "groups": 16, "orphan_copies": 0}
    # Hand-computed from PLAN: vanilla over the 40 rows, circular over the 16 groups (all
    # copies right), vanilla_0 over the 16 main rows.
    assert result["scores"] == {"vanilla": 75.0, "circular": 56.25, "vanilla_0": 68.75}
    assert result["by_category"]["vanilla"] == {
        "colour_of": {"n": 10, "accuracy": 80.0}, "count_colour": {"n": 10, "accuracy": 80.0},
        "exists_colour": {"n": 10, "accuracy": 80.0}, "shape_of": {"n": 10, "accuracy": 60.0}}
    assert {k: v["accuracy"] for k, v in result["by_category"]["circular"].items()} == {
        "colour_of": 50.0, "count_colour": 50.0, "exists_colour": 50.0, "shape_of": 75.0}
    assert {k: v["accuracy"] for k, v in result["by_category"]["vanilla_0"].items()} == {
        "colour_of": 75.0, "count_colour": 75.0, "exists_colour": 50.0, "shape_of": 75.0}
    assert result["tables"]["vanilla"] == [{"split": "none", "Overall": 75.0, "attribute": 70.0, "perception": 80.0,
                                            "colour_of": 80.0, "count_colour": 80.0, "exists_colour": 80.0,
                                            "shape_of": 60.0}]
    assert result["tables"]["circular"] == [{"split": "none", "Overall": 56.25, "attribute": 62.5, "perception": 50.0,
                                             "colour_of": 50.0, "count_colour": 50.0, "exists_colour": 50.0,
                                             "shape_of": 75.0}]
    vanilla_0 = result["tables"]["vanilla_0"][0]
    assert vanilla_0["Overall"] == 68.75 and vanilla_0["attribute"] == 75.0 and vanilla_0["perception"] == 62.5
    failed = sorted(p["prediction"] for p in result["predictions"] if p["failed_extraction"])
    assert failed == ["A or B", "I cannot say."]
    print("\n" + vlmeval.table(result))

    files = vlmeval.write_files(result, bench, str(tmp_path), model_name="scripted", fmt="tsv")
    assert files["predictions"] == str(tmp_path / "scripted_DemoBench.tsv")
    preds = pd.read_csv(files["predictions"], sep="\t")  # VLMEvalKit's load() of a .tsv
    assert list(preds.columns) == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source",
                                   "l2-category", "prediction"]
    source = pd.read_csv(mmbench["path"], sep="\t")
    assert preds["index"].tolist() == source["index"].tolist()  # file order, every answered row
    assert dict(zip(preds["index"], preds["prediction"])) == mmbench["by_index"]
    assert preds["hint"].isna().sum() == 4 and preds["l2-category"].tolist() == source["l2-category"].tolist()
    acc = pd.read_csv(files["acc"])
    assert list(acc.columns) == ["split", "Overall", "attribute", "perception", "colour_of", "count_colour",
                                 "exists_colour", "shape_of"]
    assert acc.iloc[0]["Overall"] == 0.5625 and acc.iloc[0]["shape_of"] == 0.75
    acc_all = pd.read_csv(files["acc_all"])
    assert acc_all["split"].tolist() == ["vanilla_0_none", "vanilla_all_none", "circular_none"]
    assert acc_all["Overall"].tolist() == [0.6875, 0.75, 0.5625]
    record = pd.read_csv(files["result"], sep="\t")
    assert len(record) == 16 and record["hit"].sum() == 9 and list(record.columns[-3:]) == ["g_index", "hit", "log"]


def test_modes_route_and_text_mode_skips_image_questions(mmbench):
    bench = mmbench["bench"]
    text = ScriptedModel(mmbench["answers"])
    result = vlmeval.evaluate(text, bench, mode="text")
    assert text.calls == [] and result["counts"]["skipped"] == 40 and result["counts"]["answered"] == 0
    assert result["scores"] == {"vanilla": None, "circular": None, "vanilla_0": None}
    shared = ScriptedModel(mmbench["answers"])
    assert vlmeval.evaluate(shared, bench, mode="shared")["scores"]["vanilla"] == 75.0
    assert {mode for mode, _, _ in shared.calls} == {"shared"}
    with pytest.raises(ValueError, match="mode='both'"):
        vlmeval.evaluate(shared, bench, mode="both")


def _png_b64(colour):
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), colour, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_bad_rows_are_rejected_by_index(tmp_path):
    good = _png_b64((255, 0, 0))
    row = {"question": "Which colour?", "hint": None, "A": "red", "B": "blue", "C": None, "answer": "A",
           "category": "colour", "image": good}
    rows = [{**row, "index": 1},
            {**row, "index": 2, "question": None},                      # no question
            {**row, "index": 3, "answer": "C"},                         # C is empty: not an option
            {**row, "index": 4, "image": "bm90IGFuIGltYWdl" * 5},      # base64 of text, not an image
            {**row, "index": 5, "image": "99"},                         # refers to a missing row
            {**row, "index": 1, "answer": "B"},                         # duplicate index
            {**row, "index": 6, "image": None},                         # no image
            {**row, "index": 7, "image": "1"}]                          # refers to row 1: fine
    path = tmp_path / "Bad.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    bench = vlmeval.load_benchmark(str(path))
    assert [q.index for q in bench.questions] == [1, 7] and not bench.circular
    assert [(r["index"], r["reason"]) for r in bench.rejected] == [
        (2, "no_question"), (3, "answer_not_an_option"), (4, "undecodable_image"), (5, "bad_image_reference"),
        (1, "duplicate_index"), (6, "no_image")]
    assert bench.questions[0].options == {"A": "red", "B": "blue"}  # C (empty) is absent
    result = vlmeval.evaluate(ScriptedModel({vlmeval.build_prompt(bench.questions[0]): "(A) red"}), bench)
    assert result["counts"]["rejected"] == 6 and result["scores"]["vanilla"] == 100.0
    assert result["scores"]["circular"] is None and [r["index"] for r in result["rejected"]] == [2, 3, 4, 5, 1, 6]
    (tmp_path / "NoAnswer.tsv").write_text("index\tquestion\tA\tB\n1\tq\ta\tb\n")
    with pytest.raises(ValueError, match="NoAnswer.tsv: missing column\\(s\\) \\['answer'\\]"):
        vlmeval.load_benchmark(str(tmp_path / "NoAnswer.tsv"))
    with pytest.raises(FileNotFoundError, match="nowhere.tsv"):
        vlmeval.load_benchmark(str(tmp_path / "nowhere.tsv"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny GenieBlue MLLM with a tokenizer (`genieblue_jax.random_model`: no training, no compile)."""
    from genieblue_jax.random_model import random_model
    return random_model(str(tmp_path_factory.mktemp("vlmeval_model")))


@pytest.mark.slow
def test_cli_runs_a_tsv_end_to_end(tiny_checkpoint, mmbench, tmp_path):
    from genieblue_jax.cli import evaluate as cli
    small = tmp_path / "DemoSmall.tsv"  # 6 rows: 2 main questions and copies by reference, 2 singles
    data = pd.read_csv(mmbench["path"], sep="\t")
    data[data["index"].isin([0, 1_000_000, 2_000_000, 1, 2, 12])].to_csv(small, sep="\t", index=False)
    out = str(tmp_path / "eval" / "vlmeval.json")
    result = cli.run(tiny_checkpoint, [str(small)], mode="multimodal", out=out, batch_size=8, max_new_tokens=3,
                     format="vlmeval")
    r = result["benchmarks"]["DemoSmall"]
    assert r["counts"]["answered"] == 6 and r["counts"]["groups"] == 4 and r["circular"]
    for kind in ("vanilla", "circular", "vanilla_0"):
        assert 0.0 <= r["scores"][kind] <= 100.0
    read = pd.read_excel if r["files"]["predictions"].endswith(".xlsx") else partial(pd.read_csv, sep="\t")
    preds = read(r["files"]["predictions"], keep_default_na=False)
    assert preds["index"].tolist() == [0, 1_000_000, 2_000_000, 1, 2, 12]  # the TSV's order
    assert list(preds.columns)[-1] == "prediction" and "image" not in preds.columns
    # An .xlsx cell holds a control character Excel's way (OOXML's ST_Xstring escape: "\x01" -> "_x0001_"),
    # as VLMEvalKit's own xlsxwriter files do; a random model's answers have some.
    excel = (lambda t: re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", lambda m: f"_x{ord(m.group()):04X}_", t)) \
        if r["files"]["predictions"].endswith(".xlsx") else (lambda t: t)
    assert preds["prediction"].tolist() == [excel(p["prediction"]) for p in r["predictions"]]
    ext = vlmeval.prediction_format()  # "tsv" without xlsxwriter
    assert r["files"]["predictions"] == str(tmp_path / "eval" / f"model-multimodal_DemoSmall.{ext}")
    assert json.load(open(out))["benchmarks"]["DemoSmall"]["scores"] == r["scores"]


def test_cells_are_read_as_the_text_written(tmp_path):
    """Options "None", "NA", "null" are options (pandas' defaults read them as missing values, and
    the row whose answer they are was rejected), and an integer column with a gap prints "3",
    not "3.0". Written by hand, not through pandas, so the file holds exactly these cells."""
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer",
             "1\tWhich is empty?\tNone\tNA\tnull\t3\tA",
             "2\tHow many?\t2\t3\t4\t\tB",
             "3\tWhich word?\tN/A\tnan\t#N/A\t-1\tC"]
    (tmp_path / "Words.tsv").write_text("\n".join(lines) + "\n")
    bench = vlmeval.load_benchmark(str(tmp_path / "Words.tsv"))
    assert bench.rejected == [] and [q.index for q in bench.questions] == [1, 2, 3]
    assert [q.options for q in bench.questions] == [
        {"A": "None", "B": "NA", "C": "null", "D": "3"},
        {"A": "2", "B": "3", "C": "4"},                      # D empty: absent
        {"A": "N/A", "B": "nan", "C": "#N/A", "D": "-1"}]
    assert [q.answer for q in bench.questions] == ["A", "B", "C"]
    assert "A. None\nB. NA\nC. null\nD. 3\n" in vlmeval.build_prompt(bench.questions[0])
    assert "A. 2\nB. 3\nC. 4\nPlease" in vlmeval.build_prompt(bench.questions[1])
    answers = {vlmeval.build_prompt(q): a for q, a in zip(bench.questions, ["None", "B", "C"])}
    result = vlmeval.evaluate(ScriptedModel(answers), bench)
    assert result["scores"]["vanilla"] == 100.0  # "None" is matched as its option's text
