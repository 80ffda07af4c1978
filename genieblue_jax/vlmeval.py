"""Multiple-choice benchmarks in VLMEvalKit's TSV layout, scored as VLMEvalKit scores them
with its `exact_matching` judge (no LLM), and its result files written so that VLMEvalKit's
own scripts read them.

    >>> import genieblue_jax
    >>> from genieblue_jax import vlmeval
    >>> model = genieblue_jax.load("workdirs/stage2_skip")                      # doctest: +SKIP
    >>> bench = vlmeval.load_benchmark("MMBench_DEV_EN.tsv")                    # doctest: +SKIP
    >>> result = vlmeval.evaluate(model, bench, mode="multimodal")              # doctest: +SKIP
    >>> vlmeval.write_files(result, bench, "runs/eval", model_name="stage2_skip")  # doctest: +SKIP
    >>> print(vlmeval.table(result))                                            # doctest: +SKIP

Followed (our own code, rule for rule) from open-compass/VLMEvalKit at commit e8e78f05
(2026-08-18): `ImageBaseDataset.__init__` (vlmeval/dataset/image_base.py: image references,
list-valued images), `ImageMCQDataset.build_prompt` and `.evaluate_heuristic`
(vlmeval/dataset/image_mcq.py), `can_infer_option` / `can_infer_text` / `can_infer`
(vlmeval/utils/matching_util.py), `build_choices` / `extract_answer_from_item` /
`eval_vanilla` / `prefetch_circular_group` / `mcq_vanilla_eval` / `mcq_circular_eval` /
`report_acc` / `MMB_abbrs` (vlmeval/dataset/utils/multiple_choice.py), `decode_base64_to_image`
(vlmeval/smp/vlm.py), `load` / `dump` / `get_pred_file_path` / `get_intermediate_file_path`
(vlmeval/smp/file.py) and the predictions table of `infer_data_job` (vlmeval/inference.py).

TSV layout (tab separated, a header row). Every cell is read as the text written there
(`pandas.read_csv(sep="\\t", dtype=str, keep_default_na=False)`), unlike VLMEvalKit's `load`
at the version we follow, whose pandas defaults turn an option "None", "NA" or "null" into a
missing value (the row's correct answer then is "not an option") and an integer column with
a gap into floats ("3" printed as "3.0"); VLMEvalKit has since stopped doing that. An empty
cell is absent; an `index` written as an integer is an int.

    index    question                    hint      A      B      C       D       answer  category   l2-category  image
    7        What colour is the square?  Scene 7.  red    green  blue    yellow  C       colour_of  attribute    iVBO..
    1000007  What colour is the square?  Scene 7.  green  blue   yellow  red     B       colour_of  attribute    7

(row 1000007 is circular copy 1 of question 7: its options shifted by one, its image row 7's).
`index` (unique; integers for circular files), `question`, `answer` (the correct option's
letter) are required; `hint` is optional (empty = none); the options are the columns named by
one capital letter (A, B, C, D, E, ...), a missing or empty one being absent; `category`,
`l2-category` and `split` are optional; `image` is a base64-encoded image file, a Python
list of several ("['iVBOR...', '/9j/...']"), or, as VLMEvalKit allows for a repeated image,
the `index` of another row whose `image` is the data (any value of at most 64 characters is
such a reference). Without an `image` column, an `image_path` column names image files
(absolute, or relative to `image_root`, by default the TSV's folder); with neither, every
question is text-only. Every other column is carried through to the predictions file.

Rows VLMEvalKit could not use are rejected, counted and logged with their index, never
dropped silently: no question, an answer that is not one of the row's options, an image
that does not decode (bad base64, not an image, a reference to a missing row or to another
reference), a duplicate index, and (as VLMEvalKit's `skip_noimg` drops them) an empty image
in a file that has an image column.

Prompt (`build_prompt`, ImageMCQDataset.build_prompt), for the row above:

    Hint: Scene 7.
    Question: What colour is the square?
    Options:
    A. red
    B. green
    C. blue
    D. yellow
    Please select the correct answer from the options above. \\n

(the last line ends with a space and a newline); the images go before the text, where
`GenieBlue.generate` puts them (one `<image>\\n` per image, then the prompt, one user turn of
the training chat template). Images are decoded by `data_pipelines.images.decode_image`, as in
training (alpha composited over white, where VLMEvalKit's `.convert("RGB")` drops it).

Scoring (exact matching, VLMEvalKit's `judge=exact_matching`, no LLM):

- The prediction is the model's answer as generated (`str`, not stripped). Its option is
  `can_infer(prediction, options)`: first `can_infer_option`: API-failure text -> none,
  refusals ("Cannot determine the answer", ...) -> "Z"; the answer with `.()[],:;!*#{}`
  replaced by spaces is split on whitespace; if exactly one option letter is a word, it is
  the option when it is among the last 4 words; if no letter is and "Z" is, "Z"; else the
  pattern `(?i)(?:correct\\s+)?answer\\s+is\\s+\\**([ABCD])\\**` ("The correct answer is
  **B**", case-insensitive, so "the answer is a dog" picks A, as in VLMEvalKit); else none.
  Then `can_infer_text`: unless the answer is longer than twice the options' total length,
  the option whose text (lower-cased) is a substring of the answer (lower-cased), when
  exactly one is. "B", "(B)", "B. text", "B) text", "The answer is B" and "blue" (option
  B's text) all pick B; "A or B" and text matching no option pick none: a failed extraction,
  VLMEvalKit's "Z" (counted in `counts["failed_extraction"]`).
- Vanilla: a row is a hit when its option equals `answer` (`eval_vanilla`).
- Circular (files with an index >= 1e6, MMBench's CircularEval, `mcq_circular_eval`): row
  i's group is `index % 1e6`; a group exists for every main row (index < 1e6) and holds
  every row of that group (the main row and its copies with circularly shifted options);
  it counts as correct only when every one of its rows is a hit. Copies whose main row is
  absent are not scored (counted as `orphan_copies`). Circular files are also scored
  vanilla over all rows (VLMEvalKit's `vanilla_all`) and over the main rows only
  (`vanilla_0`), the `PRINT_VANILLA=1` table.
- Tables (`report_acc`): one row per `split` ("none" without a split column): `Overall`,
  then each `l2-category` and each `category` in sorted order (MMBench's long names
  abbreviated, `MMB_ABBRS`), each the mean hit of its rows in that split. The `_acc.csv`
  file holds fractions (VLMEvalKit's layout); the result's `tables` and `scores`, percent.

Files (`write_files`), VLMEvalKit's names for model M and benchmark D (the TSV's stem):
`M_D.xlsx` (written as VLMEvalKit's `dump` writes it, with xlsxwriter: control characters
escaped Excel's way, "\x01" -> "_x0001_", no string turned into a formula or a link; `.tsv`
when xlsxwriter is not installed; VLMEvalKit's `load` reads either, and `PRED_FORMAT=tsv`
makes VLMEvalKit itself write `.tsv`): the input columns but `image`, in their order, plus
`prediction`, one row per answered question; `M_D_exact_matching_result`
(same format: those rows sorted by index, plus `g_index` for circular files, `hit` and `log`,
the main rows only for circular files); `M_D_acc.csv` (the circular table for circular files,
else the vanilla one); `M_D_acc_all.csv` for circular files (vanilla_0, vanilla_all, circular,
as `PRINT_VANILLA=1` writes it). Tables are written with every field quoted, as `dump` does.

Modes (`genieblue_jax.evaluate.MODES`): `multimodal` routes each request by its content
(image questions on the multimodal path, text-only ones on the untouched base LLM), `shared`
runs everything on the multimodal weights, `text` runs the base LLM alone and skips the image
questions (counted as skipped, not scored, not in the predictions file).

pandas is imported where a TSV is read or a table written.
"""
from __future__ import annotations

import ast
import base64
import binascii
import collections
import csv
import dataclasses
import io
import logging
import os
import re
import string
import time
from typing import Any, Callable, Mapping, Sequence

from data_pipelines import images as image_lib
from genieblue_jax import paths
from genieblue_jax.evaluate import check_mode

log = logging.getLogger(__name__)

CIRCULAR_OFFSET = 1_000_000
"""Circular copies of main question i have index i + k * 1e6 (VLMEvalKit: `int(x % 1e6)`)."""
REFERENCE_MAX_LEN = 64
"""An `image` value of at most 64 characters is another row's index (ImageBaseDataset)."""
MMB_ABBRS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
FAILED = "Z"
"""The option of an answer no rule could read (VLMEvalKit's exact-matching fallback)."""
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILURE = "Failed to obtain answer via API"
_PUNCTUATION = ".()[],:;!*#{}"
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_NO_MATCH_LOG = "Failed in Prefetch, no GPT-based answer matching under `exact_matching` policy."


# --- extraction (vlmeval/utils/matching_util.py) -------------------------------------------

def can_infer_option(answer: str, choices: Mapping[str, Any]) -> str | None:
    """The option letter an answer names (VLMEvalKit's `can_infer_option`), "Z" for a
    refusal, None when it names none or several (module docstring, "Scoring").

        >>> opts = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
        >>> [can_infer_option(a, opts) for a in ["B", "(B)", "B. blue", "The answer is B", "A or B"]]
        ['B', 'B', 'B', 'B', None]
    """
    if _API_FAILURE in answer:
        return None
    if any(refusal in answer for refusal in _REFUSALS):
        return FAILED
    words = answer
    for c in _PUNCTUATION:
        words = words.replace(c, " ")
    splits = words.split()
    named = [c for c in choices if c in splits]
    if len(named) == 1:
        for ch in choices:  # VLMEvalKit's loop: the named letter, if among the last 4 words
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    elif not named and "Z" in splits:
        return FAILED
    match = _VERBOSE_ANSWER.search(answer or "")
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, Any]) -> str | None:
    """The option whose text the answer contains (VLMEvalKit's `can_infer_text`): compared
    lower-cased; None when no option's or several options' texts are in it, or when the
    answer is longer than twice the options' total length.

        >>> opts = {"A": "red", "B": "blue"}
        >>> can_infer_text("It is Blue.", opts), can_infer_text("red or blue", opts)
        ('B', None)
    """
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def can_infer(answer: Any, choices: Mapping[str, Any]) -> str | None:
    """`can_infer_option`, else `can_infer_text` (VLMEvalKit's `can_infer`); `answer` is str()-ed."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def extract_option(prediction: Any, choices: Mapping[str, Any]) -> str:
    """The option a prediction picks under exact matching (`extract_answer_from_item` with no
    judge model): `can_infer`'s letter, or "Z" (`FAILED`) when it reads none.

        >>> opts = {"A": "two", "B": "three", "C": "four", "D": "one"}
        >>> [extract_option(p, opts) for p in ["(C)", "C) four", "three", "A or B", "no idea"]]
        ['C', 'C', 'B', 'Z', 'Z']
    """
    return can_infer(prediction, choices) or FAILED


# --- data (vlmeval/dataset/image_base.py, image_mcq.py) ------------------------------------

@dataclasses.dataclass
class Question:
    """One usable row: its index, prompt parts, options {letter: text} in letter order, the
    correct letter, the images (encoded files, in order) and every column but `image` as read
    (`row`, for the predictions file)."""
    index: Any
    question: Any
    hint: Any
    options: dict[str, Any]
    answer: str
    images: list[bytes]
    row: dict[str, Any]

    @property
    def group(self):
        """The circular group (`index % 1e6`); the index itself when not an integer."""
        return self.index % CIRCULAR_OFFSET if isinstance(self.index, int) else self.index


@dataclasses.dataclass
class Benchmark:
    """A read TSV: its name (the file's stem), the columns of the predictions file (the
    input columns but `image`, in order), the usable questions in file order, the rejected
    rows ({"index", "row", "reason", "detail"}), the number of rows read, and whether it is
    circular (an integer index >= 1e6)."""
    name: str
    path: str
    columns: list[str]
    questions: list[Question]
    rejected: list[dict]
    rows: int
    circular: bool


def _index(cell: str) -> int | str:
    """A row's `index` cell: an int where it is written as one (circular copies are numbered), else its text."""
    cell = cell.strip()
    return int(cell) if re.fullmatch(r"[+-]?\d+", cell) else cell


def _missing(value) -> bool:
    """None, an empty cell ("") or a float NaN (a value from another table)."""
    return value is None or (isinstance(value, str) and value == "") or (isinstance(value, float) and value != value)


def _image_values(value: str) -> list[str]:
    """VLMEvalKit's `toliststr`: "['a', 'b']" -> ['a', 'b'], else [value]."""
    if len(value) > 1 and value[0] == "[" and value[-1] == "]":
        parsed = ast.literal_eval(value)
        if not isinstance(parsed, (list, tuple)):
            raise ValueError("not a list")
        return [str(x) for x in parsed]
    return [value]


def _decode(b64: str) -> bytes:
    try:
        data = base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64: {e}") from None
    image_lib.decode_image(data)  # raises ImageDecodeError (a ValueError) with PIL's reason
    return data


def load_benchmark(path: str, *, image_root: str | None = None, limit: int | None = None) -> Benchmark:
    """Reads a VLMEvalKit MCQ TSV (module docstring, "TSV layout"); `limit` keeps its first n
    rows. Bad rows are rejected (counted, logged with their index: `Benchmark.rejected`).

    Raises FileNotFoundError for a missing file and ValueError naming the file for a file
    without the required columns (index, question, answer, and option columns A, B)."""
    import pandas as pd
    p = paths.path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such benchmark TSV")
    with p.open("rb") as f:
        try:
            data = pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a readable TSV: {e}") from None
    missing = [c for c in ("index", "question", "answer", "A", "B") if c not in data.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} of VLMEvalKit's MCQ layout "
                         f"(has {list(data.columns)})")
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    columns = [c for c in data.columns if c != "image"]
    letters = [c for c in data.columns if isinstance(c, str) and len(c) == 1 and c in string.ascii_uppercase]
    letters.sort()
    records = data.to_dict("records")
    # Image references resolve against every row of the file (VLMEvalKit: index -> image map).
    has_image = "image" in data.columns
    image_of = {}
    if has_image:
        for r in records:
            image_of.setdefault(str(r["index"]), "" if _missing(r["image"]) else str(r["image"]))
    records = records[:limit] if limit is not None else records
    root = image_root or os.path.dirname(os.path.abspath(os.fspath(path)))
    questions, rejected, seen = [], [], set()
    decoded: dict[str, list[bytes]] = {}  # a repeated image is decoded once

    def reject(r, reason, detail):
        index = _index(r["index"])
        rejected.append({"index": index, "row": len(questions) + len(rejected), "reason": reason,
                         "detail": detail})
        log.warning("%s: index %s rejected: %s: %s", path, index, reason, detail)

    for r in records:
        index = _index(r["index"])
        if _missing(index):
            reject(r, "no_index", "empty index")
            continue
        if str(index) in seen:
            reject(r, "duplicate_index", f"index {index} appears earlier in the file")
            continue
        seen.add(str(index))
        if _missing(r["question"]) or not str(r["question"]).strip():
            reject(r, "no_question", "empty question")
            continue
        options = {c: r[c] for c in letters if not _missing(r[c])}
        answer = None if _missing(r["answer"]) else str(r["answer"])
        if answer not in options:
            reject(r, "answer_not_an_option", f"answer {answer!r} is not one of the options {sorted(options)}")
            continue
        images: list[bytes] = []
        if has_image:
            value = "" if _missing(r["image"]) else str(r["image"])
            if not value:
                reject(r, "no_image", "empty image (VLMEvalKit's skip_noimg drops such rows)")
                continue
            if len(value) <= REFERENCE_MAX_LEN:
                target = image_of.get(value)
                if target is None or len(target) <= REFERENCE_MAX_LEN:
                    what = "no such row" if target is None else "a row whose image is itself a reference"
                    reject(r, "bad_image_reference", f"image refers to index {value}: {what}")
                    continue
                value = target
            if value not in decoded:
                try:
                    decoded[value] = [_decode(v) for v in _image_values(value)]
                except (ValueError, SyntaxError) as e:
                    decoded[value] = e
            if isinstance(decoded[value], Exception):
                reject(r, "undecodable_image", str(decoded[value]))
                continue
            images = decoded[value]
        elif "image_path" in data.columns and not _missing(r["image_path"]):
            try:
                for name_ in _image_values(str(r["image_path"])):
                    file = name_ if os.path.isabs(name_) else os.path.join(root, name_)
                    blob = paths.path(file).read_bytes()
                    image_lib.decode_image(blob)
                    images.append(blob)
            except (OSError, ValueError, SyntaxError) as e:
                reject(r, "undecodable_image", f"image_path {r['image_path']}: {e}")
                continue
        hint = None if "hint" not in data.columns or _missing(r["hint"]) else r["hint"]
        row = {c: None if _missing(r[c]) else r[c] for c in columns}  # empty cells: None
        row["index"] = index
        questions.append(Question(index, r["question"], hint, options, answer, images, row))
    circular = any(isinstance(q.index, int) and q.index >= CIRCULAR_OFFSET for q in questions)
    return Benchmark(name, os.fspath(path), columns, questions, rejected, len(records), circular)


def build_prompt(q: Question) -> str:
    """The prompt text of `ImageMCQDataset.build_prompt` (module docstring, "Prompt").

        >>> q = Question(7, "Which?", None, {"A": "red", "B": "blue"}, "B", [], {})
        >>> build_prompt(q)
        'Question: Which?\\nOptions:\\nA. red\\nB. blue\\nPlease select the correct answer from the options above. \\n'
    """
    prompt = f"Hint: {q.hint}\n" if q.hint is not None else ""
    prompt += f"Question: {q.question}\n"
    if q.options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in q.options.items())
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


# --- scoring (vlmeval/dataset/utils/multiple_choice.py) ------------------------------------

def _mean(hits) -> float | None:
    hits = list(hits)
    return sum(hits) / len(hits) if hits else None


def report_acc(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """VLMEvalKit's `report_acc` over rows with "hit" (0/1) and optional "split",
    "l2-category", "category": one dict per split (sorted; "none" without splits) with
    "split", "Overall", then each l2-category and category in sorted order, MMBench's names
    abbreviated; values are fractions (None for an ability with no row in a split)."""
    has = {k: any(k in r for r in rows) for k in ("split", "l2-category", "category")}
    splits = sorted({str(r.get("split")) for r in rows}) if has["split"] else ["none"]
    split_of = (lambda r: str(r.get("split"))) if has["split"] else (lambda r: "none")
    out = []
    for sp in splits:
        in_split = [r for r in rows if split_of(r) == sp]
        res = {"split": sp, "Overall": _mean(r["hit"] for r in in_split)}
        for group in ("l2-category", "category"):
            if not has[group]:
                continue
            for ability in sorted({r[group] for r in rows if not _missing(r.get(group))}, key=str):
                name = MMB_ABBRS.get(ability, ability)
                res[str(name)] = _mean(r["hit"] for r in in_split if r.get(group) == ability)
        out.append(res)
    return out


def _table_rows(bench: Benchmark, preds: Sequence[dict]) -> list[dict]:
    keep = [k for k in ("split", "l2-category", "category") if k in bench.columns]
    return [{**{k: p["row"][k] for k in keep}, "hit": p["hit"]} for p in preds]


def _by(rows: Sequence[dict], key: str) -> dict:
    groups = collections.defaultdict(list)
    for r in rows:
        if key in r and not _missing(r[key]):
            groups[str(r[key])].append(r["hit"])
    return {k: {"n": len(v), "accuracy": 100.0 * sum(v) / len(v)} for k, v in sorted(groups.items())}


def _percent(tables: list[dict]) -> list[dict]:
    return [{k: (v if k == "split" or v is None else 100.0 * v) for k, v in t.items()} for t in tables]


def score(bench: Benchmark, predictions: Mapping[Any, str]) -> dict:
    """Scores `predictions` ({index: the model's answer}) of questions of `bench` under exact
    matching (module docstring, "Scoring"); questions without a prediction are not scored.

    Returns {"circular", "counts": {"scored", "failed_extraction", "groups", "orphan_copies"},
    "scores": {"vanilla", "circular", "vanilla_0"} (overall percent; None where not
    applicable), "tables": {same keys: `report_acc` rows in percent}, "by_category" /
    "by_l2_category": {same keys: {name: {"n", "accuracy"}}}, "predictions": [{"index",
    "category", "answer", "prediction", "extracted", "hit", "log", "row", ...}],
    "groups": [{"index", "rows", "hit", "log"}] (circular only)}."""
    preds = []
    for q in bench.questions:
        if q.index not in predictions:
            continue
        prediction = str(predictions[q.index])
        got = can_infer(prediction, q.options)
        extracted = got or FAILED
        preds.append({"index": q.index, "category": q.row.get("category"), "answer": q.answer,
                      "prediction": prediction, "extracted": extracted, "hit": int(extracted == q.answer),
                      "failed_extraction": extracted not in q.options,
                      "log": f"Match Log: {prediction if got else _NO_MATCH_LOG}. ", "row": q.row,
                      "group": q.group, "images": len(q.images)})
    result = {"circular": bench.circular,
              "counts": {"scored": len(preds), "failed_extraction": sum(p["failed_extraction"] for p in preds)}}
    kinds = {"vanilla": preds}
    groups = []
    if bench.circular:
        if not all(isinstance(p["index"], int) for p in preds):
            raise ValueError(f"{bench.path}: a circular benchmark needs integer indices")
        members = collections.defaultdict(list)
        for p in sorted(preds, key=lambda p: p["index"]):
            members[p["group"]].append(p)
        main = sorted((p for p in preds if p["index"] == p["group"]), key=lambda p: p["index"])
        for m in main:
            hit, log_ = _circular_group(members[m["index"]])
            groups.append({"index": m["index"], "rows": [p["index"] for p in members[m["index"]]], "hit": hit,
                           "log": log_, "row": m["row"], "prediction": m["prediction"]})
        mains = {p["index"] for p in main}
        result["counts"]["groups"] = len(groups)
        result["counts"]["orphan_copies"] = sum(p["group"] not in mains for p in preds)
        kinds = {"vanilla": preds, "circular": groups, "vanilla_0": main}
    result["scores"], result["tables"], result["by_category"], result["by_l2_category"] = {}, {}, {}, {}
    for kind in ("vanilla", "circular", "vanilla_0"):
        rows = _table_rows(bench, kinds[kind]) if kind in kinds else None
        result["scores"][kind] = None if rows is None else _pct(_mean(r["hit"] for r in rows))
        result["tables"][kind] = None if rows is None else _percent(report_acc(rows))
        result["by_category"][kind] = None if rows is None else _by(rows, "category")
        result["by_l2_category"][kind] = None if rows is None else _by(rows, "l2-category")
    result["predictions"] = preds
    if bench.circular:
        result["groups"] = groups
    return result


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _circular_group(rows: Sequence[dict]) -> tuple[int, str]:
    """`prefetch_circular_group` then exact matching: (hit, VLMEvalKit's log line)."""
    for i, p in enumerate(rows):
        if p["extracted"] != FAILED and p["extracted"] != p["answer"]:
            return 0, (f"Failed in Prefetching Rolling {i}: Answer is {p['answer']}, "
                       f"Prediction is {p['prediction']}, Pre-fetched is {p['extracted']}. ")
    if all(p["extracted"] == p["answer"] for p in rows):
        return 1, "Succeed During Pre-fetching"
    return 0, _NO_MATCH_LOG


# --- evaluation -----------------------------------------------------------------------------

def evaluate(model, bench: Benchmark, *, mode: str = "multimodal", batch_size: int = 32, max_new_tokens: int = 32,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Greedy answers of `model` (a `GenieBlue`, or anything with its `generate` / `is_mllm`)
    to the questions of `bench` in `mode` (module docstring, "Modes"), scored by `score`.

    Returns `score`'s dict plus {"format": "vlmeval", "dataset", "data", "mode", "counts":
    {"rows", "questions", "answered", "skipped", "rejected", + score's}, "skipped_ids",
    "rejected", "seconds"}. Raises ValueError for an unknown mode, or an image mode on an LLM."""
    check_mode(model, mode)
    t0 = time.perf_counter()
    todo = [q for q in bench.questions if not (q.images and mode == "text")]
    skipped = [q.index for q in bench.questions if q.images and mode == "text"]
    prompts = {q.index: build_prompt(q) for q in todo}
    # Similar prompt lengths share a batch (one prompt bucket, less padding).
    todo.sort(key=lambda q: (len(q.images), len(prompts[q.index])))
    answers: dict[Any, str] = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        got = model.generate([[{"role": "user", "content": prompts[q.index]}] for q in chunk],
                             images=[list(q.images) or None for q in chunk],
                             mode=None if mode == "multimodal" else mode, max_new_tokens=max_new_tokens)
        answers.update({q.index: str(a) for q, a in zip(chunk, got)})
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
    result = score(bench, answers)
    result["counts"] = {"rows": bench.rows, "questions": len(bench.questions), "answered": len(answers),
                        "skipped": len(skipped), "rejected": len(bench.rejected), **result["counts"]}
    return {"format": "vlmeval", "dataset": bench.name, "data": bench.path, "mode": mode, **result,
            "skipped_ids": skipped, "rejected": bench.rejected, "seconds": round(time.perf_counter() - t0, 2)}


# --- files (vlmeval/smp/file.py) ------------------------------------------------------------

def prediction_format() -> str:
    """"xlsx" when xlsxwriter (VLMEvalKit's writer) is installed, else "tsv" (VLMEvalKit reads both)."""
    try:
        import xlsxwriter  # noqa: F401
    except ImportError:
        return "tsv"
    return "xlsx"


def _dump(frame, path: str) -> None:
    """VLMEvalKit's `dump` for .xlsx / .tsv / .csv (every field quoted), on any `paths` path."""
    p = paths.path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".xlsx"):
        buf = io.BytesIO()
        frame.to_excel(buf, index=False, engine="xlsxwriter",
                       engine_kwargs={"options": {"strings_to_urls": False, "strings_to_formulas": False}})
        p.write_bytes(buf.getvalue())
        return
    text = frame.to_csv(sep="\t" if path.endswith(".tsv") else ",", index=False, quoting=csv.QUOTE_ALL)
    p.write_text(text)


def write_files(result: dict, bench: Benchmark, out_dir: str, *, model_name: str, fmt: str | None = None) -> dict:
    """Writes VLMEvalKit's files of one evaluated benchmark into `out_dir` (module docstring,
    "Files") and returns {"predictions", "result", "acc"[, "acc_all"]} -> path (also stored in
    `result["files"]`). `fmt`: "xlsx" or "tsv" (default `prediction_format()`)."""
    import pandas as pd
    fmt = fmt or prediction_format()
    if fmt not in ("xlsx", "tsv"):
        raise ValueError(f"fmt={fmt!r}; choose 'xlsx' or 'tsv'")
    stem = paths.join(out_dir, f"{model_name}_{bench.name}")
    files = {"predictions": f"{stem}.{fmt}", "result": f"{stem}_exact_matching_result.{fmt}", "acc": f"{stem}_acc.csv"}
    preds = result["predictions"]
    table = pd.DataFrame([{**p["row"], "prediction": p["prediction"]} for p in preds],
                         columns=[*bench.columns, "prediction"])
    _dump(table, files["predictions"])
    # The evaluation record: VLMEvalKit lower-cases every column but the option letters.
    lower = [c if c in string.ascii_uppercase else c.lower() for c in [*bench.columns, "prediction"]]
    if bench.circular:  # the main rows, one per group, with the group's hit
        rows = [[*g["row"].values(), g["prediction"], g["index"], g["hit"], g["log"]] for g in result["groups"]]
        extra = ["g_index", "hit", "log"]
    else:
        rows = [[*p["row"].values(), p["prediction"], p["hit"], p["log"]]
                for p in sorted(preds, key=lambda p: _index_key(p["index"]))]
        extra = ["hit", "log"]
    _dump(pd.DataFrame(rows, columns=[*lower, *extra]), files["result"])
    frac = {k: _fraction(v) for k, v in result["tables"].items() if v is not None}
    _dump(pd.DataFrame(frac["circular" if bench.circular else "vanilla"]), files["acc"])
    if bench.circular:
        files["acc_all"] = f"{stem}_acc_all.csv"
        names = {"vanilla_0": "vanilla_0", "vanilla": "vanilla_all", "circular": "circular"}
        parts = [pd.DataFrame([{**r, "split": f"{name}_{r['split']}"} for r in frac[kind]])
                 for kind, name in names.items()]
        _dump(pd.concat(parts, ignore_index=True), files["acc_all"])
    result["files"] = files
    return files


def _index_key(index):
    return (0, index, "") if isinstance(index, (int, float)) else (1, 0, str(index))


def _fraction(tables: list[dict]) -> list[dict]:
    return [{k: (v if k == "split" or v is None else v / 100.0) for k, v in t.items()} for t in tables]


# --- reports --------------------------------------------------------------------------------

def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(result: dict) -> str:
    """Markdown: one row per (kind, split) of `result["tables"]` (accuracy %, `report_acc`'s
    columns), the counts below."""
    kinds = [k for k in ("vanilla", "vanilla_0", "circular") if result["tables"].get(k)]
    columns = list(dict.fromkeys(c for k in kinds for t in result["tables"][k] for c in t if c != "split"))
    lines = [f"| {result['dataset']} ({result['mode']}) | split | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for k in kinds:
        for t in result["tables"][k]:
            lines.append(f"| {k} | {t['split']} | " + " | ".join(_fmt(t.get(c)) for c in columns) + " |")
    c = result["counts"]
    lines.append("")
    lines.append(f"{c['rows']} rows: {c['questions']} questions, {c['rejected']} rejected; {c['answered']} answered, "
                 f"{c['skipped']} skipped; {c['failed_extraction']} answers named no option (exact matching)"
                 + (f"; {c['groups']} circular groups" if "groups" in c else ""))
    return "\n".join(lines)
