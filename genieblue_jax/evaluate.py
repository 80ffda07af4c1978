"""Evaluation: greedy answers to held-out questions, exact-match and multiple-choice
accuracy, the text-task score, and retention as the paper computes it.

    >>> import genieblue_jax
    >>> from genieblue_jax import evaluate
    >>> model = genieblue_jax.load("workdirs/stage2_skip")                      # doctest: +SKIP
    >>> examples, rejects = evaluate.load_examples(["workdirs/demo/data/eval/vqa"])  # doctest: +SKIP
    >>> result = evaluate.evaluate(model, examples, mode="multimodal")          # doctest: +SKIP
    >>> result["scores"]["multimodal"], result["scores"]["text"]                # doctest: +SKIP

Data: LLaVA-format JSON (the schema `data_pipelines.convert` reads, images relative to an
image root) or converted datasets (ArrayRecord directories with a manifest.json, e.g. the
demo's `eval/<source>` folders). Each example's question is every turn before its last
assistant turn; the reference is that turn.

Modes (which weights answer which request):

    text        the base LLM alone; requests with images cannot be answered and are
                counted as skipped
    multimodal  the deployed GenieBlue model, non-shared base: requests with images run the
                multimodal path, text-only requests the untouched base LLM
    shared      every request on the multimodal weights (the paper's shared-base ablation,
                Table 6)

Scores (percent): `text` = accuracy on text-only examples, `multimodal` = accuracy on
examples with images, each by exact match after `normalize`, except multiple-choice
questions (options listed as "A. ...", "(B) ...") which score the chosen letter
(`choice_letter`); both are also reported per source. Retention (paper Tables 5-6) is
100 * score / reference score (`retention`).
"""
from __future__ import annotations

import collections
import json
import os
import re
import time
from typing import Iterable, Sequence

from data_pipelines.conversion import read_llava
from data_pipelines.records import ArrayRecordExampleSource, CorruptRecord
from genieblue_jax import paths

MODES = ("text", "multimodal", "shared")
_OPTION = re.compile(r"^\s*\(?([A-H])[.)]\s+(.+?)\s*$")


def normalize(text: str) -> str:
    """Answer normal form for exact match: lower case, whitespace collapsed, surrounding
    spaces and one trailing period removed.

        >>> normalize("  Two red  Circles. "), normalize("7"), normalize("A.")
        ('two red circles', '7', 'a')
    """
    text = " ".join(str(text).lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def options(question: str) -> dict[str, str]:
    """The lettered options of a multiple-choice question ({} if it has none).

        >>> options("What colour is the car?\\nA. red\\nB. blue\\n(C) green")
        {'A': 'red', 'B': 'blue', 'C': 'green'}
    """
    found = {}
    for line in question.splitlines():
        m = _OPTION.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    return found if len(found) >= 2 else {}


def choice_letter(answer: str, opts: dict[str, str]) -> str | None:
    """The option an answer picks: its leading letter ("B", "B.", "(B) blue") or its text.

        >>> opts = {"A": "red", "B": "blue"}
        >>> choice_letter("B", opts), choice_letter("(a) red", opts), choice_letter("Blue.", opts)
        ('B', 'A', 'B')
        >>> choice_letter("purple", opts) is None
        True
    """
    text = answer.strip()
    m = re.match(r"^\(?([A-Ha-h])(?:[.):]|\s|$)", text)
    if m and m.group(1).upper() in opts:
        return m.group(1).upper()
    for letter, option in opts.items():
        if normalize(text) == normalize(option):
            return letter
    return None


def is_correct(question: str, reference: str, prediction: str) -> tuple[bool, str]:
    """(correct, "multiple_choice" | "exact_match") for one answer."""
    opts = options(question)
    if opts:
        want = choice_letter(reference, opts)
        if want is not None:
            return choice_letter(prediction, opts) == want, "multiple_choice"
    return normalize(prediction) == normalize(reference), "exact_match"


def retention(score: float, reference: float) -> float | None:
    """Percent of the reference score kept (the paper's retention), e.g. 49.5 / 50.0 -> 99.0;
    None (undefined, printed "-") when the reference scored 0.

        >>> retention(49.5, 50.0), retention(10.0, 0.0)
        (99.0, None)
    """
    return None if reference == 0 else 100.0 * score / reference


# --- data ---------------------------------------------------------------------------------

def load_examples(paths: Sequence[str], *, image_root: str | None = None, limit: int | None = None):
    """Examples from LLaVA JSON files (`image_root`: where their image paths start; default
    the JSON's folder) and converted dataset directories, in order. Returns (examples,
    rejects): records a LLaVA JSON could not use ({"path", "index", "id", "reason",
    "detail"}), reported, never dropped silently. `limit` keeps the first n of each path."""
    examples, rejects = [], []
    for path in paths:
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "manifest.json")):
                raise FileNotFoundError(f"{path}: a directory without manifest.json is not a converted dataset "
                                        "(data_pipelines.convert output)")
            source = ArrayRecordExampleSource(path)
            n = len(source) if limit is None else min(limit, len(source))
            for i in range(n):
                ex = source[i]
                if isinstance(ex, CorruptRecord):  # a damaged shard: reported, the rest is scored
                    rejects.append({"path": path, "index": i, "id": ex.id, "reason": "corrupt_record",
                                    "detail": f"{ex.where}: {ex.reason}"})
                else:
                    examples.append(ex)
        elif path.endswith(".json"):
            got, bad = read_llava(path, image_root or os.path.dirname(os.path.abspath(path)),
                                  source=os.path.splitext(os.path.basename(path))[0])
            examples += got[:limit]
            rejects += [{"path": path, **r} for r in bad]
        elif not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such evaluation data (a LLaVA .json or a dataset directory)")
        else:
            raise ValueError(f"{path}: not a LLaVA .json file nor a converted dataset directory")
    ids = collections.Counter(ex.id for ex in examples)
    dupes = sorted(i for i, c in ids.items() if c > 1)
    if dupes:
        raise ValueError(f"evaluation data has duplicate example ids {dupes[:5]} (from {list(paths)})")
    return examples, rejects


def check_mode(model, mode: str) -> None:
    """Raises ValueError for a mode not in MODES, or an image mode on a model without images."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if mode != "text" and not model.is_mllm:
        raise ValueError(f"mode={mode!r} needs a multimodal model; {model.path or 'this model'} is an LLM only "
                         "(use mode='text')")


def _question_and_reference(ex):
    for i in range(len(ex.turns) - 1, -1, -1):
        if ex.turns[i]["role"] == "assistant":
            return ex.turns[:i], ex.turns[i]["content"]
    raise ValueError(f"example {ex.id!r} has no assistant turn to compare against")


# --- evaluation ---------------------------------------------------------------------------

def evaluate(model, examples: Iterable, *, mode: str = "multimodal", batch_size: int = 32,
             max_new_tokens: int = 32, progress=None) -> dict:
    """Greedy answers of `model` (a `GenieBlue`) to `examples` in `mode` (module docstring).

    Returns {"mode", "counts": {"examples", "answered", "skipped"}, "scores": {"text",
    "multimodal", "overall", "exact_match", "multiple_choice"}, "by_source": {source:
    {"n", "accuracy"}}, "predictions": [{"id", "source", "question", "reference",
    "prediction", "correct", "metric", "images"}], "seconds"}. Scores are percentages
    (None where no example counts)."""
    check_mode(model, mode)
    t0 = time.perf_counter()
    todo, skipped = [], []
    for ex in examples:
        turns, reference = _question_and_reference(ex)
        if ex.images and mode == "text":
            skipped.append(ex.id)
            continue
        todo.append((ex, turns, reference))
    # Similar prompt lengths share a batch (one prompt bucket, less padding).
    todo.sort(key=lambda item: (len(item[0].images), sum(len(t["content"]) for t in item[1])))
    predictions = []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        answers = model.generate([turns for _, turns, _ in chunk],
                                 images=[list(ex.images) or None for ex, _, _ in chunk],
                                 mode=None if mode == "multimodal" else mode, max_new_tokens=max_new_tokens)
        for (ex, turns, reference), answer in zip(chunk, answers):
            question = "\n".join(t["content"] for t in turns if t["role"] == "user")
            correct, metric = is_correct(question, reference, answer)
            predictions.append({"id": ex.id, "source": ex.source, "question": question, "reference": reference,
                                "prediction": answer, "correct": bool(correct), "metric": metric,
                                "images": len(ex.images)})
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
    predictions.sort(key=lambda p: p["id"])
    return {"mode": mode, "counts": {"examples": len(todo) + len(skipped), "answered": len(predictions),
                                     "skipped": len(skipped)},
            "skipped_ids": skipped, **summarize(predictions), "predictions": predictions,
            "seconds": round(time.perf_counter() - t0, 2)}


def _accuracy(preds) -> float | None:
    preds = list(preds)
    return 100.0 * sum(p["correct"] for p in preds) / len(preds) if preds else None


def summarize(predictions: Sequence[dict]) -> dict:
    """Scores and per-source accuracies of a list of predictions (see `evaluate`)."""
    by_source = collections.defaultdict(list)
    for p in predictions:
        by_source[p["source"]].append(p)
    return {"scores": {"text": _accuracy(p for p in predictions if not p["images"]),
                       "multimodal": _accuracy(p for p in predictions if p["images"]),
                       "overall": _accuracy(predictions),
                       "exact_match": _accuracy(p for p in predictions if p["metric"] == "exact_match"),
                       "multiple_choice": _accuracy(p for p in predictions if p["metric"] == "multiple_choice")},
            "by_source": {s: {"n": len(ps), "accuracy": _accuracy(ps)} for s, ps in sorted(by_source.items())}}


def add_retention(result: dict, reference: dict) -> dict:
    """Adds "retention" (percent per score, `retention`) of `result` against another run's
    result (e.g. full fine-tuning for Table 5, the base LLM's text mode for Table 6)."""
    out = {}
    for key, value in result["scores"].items():
        ref = reference["scores"].get(key)
        if value is not None and ref is not None:
            out[key] = retention(value, ref)
    result["retention"] = out
    return result


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, dict]) -> str:
    """A markdown table of several results ({label: result}): scores, counts, retention."""
    lines = ["| run | mode | text score | multimodal score | overall | exact match | multiple choice | answered | "
             "text retention | multimodal retention |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        s, ret = r["scores"], r.get("retention", {})
        lines.append(f"| {label} | {r['mode']} | {_fmt(s['text'])} | {_fmt(s['multimodal'])} | {_fmt(s['overall'])} | "
                     f"{_fmt(s['exact_match'])} | {_fmt(s['multiple_choice'])} | {r['counts']['answered']} | "
                     f"{_fmt(ret.get('text'))} | {_fmt(ret.get('multimodal'))} |")
    return "\n".join(lines)


def source_table(result: dict) -> str:
    """Markdown table of an evaluation's accuracy per source (examples, accuracy %)."""
    lines = ["| source | examples | accuracy |", "|---|---|---|"]
    lines += [f"| {s} | {v['n']} | {_fmt(v['accuracy'])} |" for s, v in result["by_source"].items()]
    return "\n".join(lines)


def write(result: dict, path: str) -> str:
    """Writes `result` as JSON to `path` (local or gs://, genieblue_jax.paths); returns `path`."""
    p = paths.path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1))
    return path
