"""Evaluate a model on held-out questions: exact-match / multiple-choice accuracy, the
text-task score, retention; or on VLMEvalKit multiple-choice benchmarks (--format=vlmeval).

    python -m tools.evaluate --checkpoint workdirs/stage2_skip --data workdirs/demo/data_.../eval/vqa \\
        --data workdirs/demo/data_.../eval/text --mode multimodal
    python -m tools.evaluate --checkpoint /runs/s2 --data questions.json --image_root images/ --mode shared \\
        --reference runs/full_ft_eval.json --out runs/s2_eval.json

--checkpoint is anything `genieblue_jax.load` reads; --data (repeatable) a LLaVA-format JSON
(images relative to --image_root, default the JSON's folder) or a converted dataset
directory. --mode: `text` (the base LLM alone; image questions are skipped and counted),
`multimodal` (the deployed model: image questions on the multimodal path, text questions
on the untouched base), `shared` (everything on the multimodal weights). Prints a table
and writes the scores and every prediction as JSON (--out, default next to the
checkpoint). Retention, as in the paper, is 100 * score / reference score: against
--reference (another run's JSON, e.g. full fine-tuning for Table 5), and for the text
score always against this model's own base LLM (mode text) when the model has one.

--format=vlmeval: each --data is a multiple-choice benchmark TSV in VLMEvalKit's layout
(MMBench, SEEDBench, ...: index, question, hint, A, B, C, D, answer, category, base64 image),
prompted and scored as VLMEvalKit does with its exact-matching judge (genieblue_jax.vlmeval):
accuracy overall, per l2-category and per category; circular files (MMBench's copies with
index >= 1e6) also scored circularly. Writes VLMEvalKit's files next to the JSON (--out,
default CHECKPOINT/eval/vlmeval_<mode>.json): <model>_<bench>.xlsx (.tsv without xlsxwriter)
with a `prediction` column, <model>_<bench>_exact_matching_result.*, <model>_<bench>_acc.csv
(and _acc_all.csv for circular files), <model> being the checkpoint's name and the mode.

    python -m tools.evaluate --format=vlmeval --checkpoint workdirs/stage2_skip --data MMBench_DEV_EN.tsv
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from genieblue_jax import cli

FLAGS = flags.FLAGS
def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    flags.DEFINE_string("checkpoint", None, "Training workdir, genieblue_jax checkpoint or HF model directory.")
    flags.DEFINE_multi_string("data", None, "LLaVA-format .json or converted dataset directory; with "
                              "--format=vlmeval a VLMEvalKit MCQ .tsv (repeatable).")
    flags.DEFINE_string("image_root", None, "Directory the LLaVA JSON's image paths (or a TSV's image_path "
                                            "column) are relative to.")
    flags.DEFINE_enum("mode", "multimodal", ["text", "multimodal", "shared"], "Which weights answer (see above).")
    flags.DEFINE_string("reference", None, "Another evaluation's JSON to compute retention against.")
    flags.DEFINE_string("out", None, "Where to write the JSON (default: CHECKPOINT/eval/<mode>.json).")
    flags.DEFINE_bool("overwrite", False, "Replace an evaluation already at --out (otherwise it is refused "
                      "before the model loads).")
    flags.DEFINE_integer("limit", None, "Evaluate only the first N examples of each --data.")
    flags.DEFINE_integer("batch_size", 32, "Requests generated together.")
    flags.DEFINE_integer("max_new_tokens", 32, "Longest answer.")
    flags.DEFINE_enum("format", "llava", ["llava", "vlmeval"],
                      "--data format: LLaVA JSON / converted datasets, or VLMEvalKit MCQ TSVs (see above).")
    flags.DEFINE_integer("step", None, "For a workdir: the checkpoint step (default: the latest).")
    flags.mark_flags_as_required(["checkpoint", "data"])


def run(checkpoint: str, data: list[str], *, mode: str, image_root: str | None = None, reference: str | None = None,
        out: str | None = None, limit: int | None = None, batch_size: int = 32, max_new_tokens: int = 32,
        step: int | None = None, format: str = "llava", overwrite: bool = False) -> dict:
    """The tool without absl: evaluates, prints, writes; returns the result. An evaluation already
    at `out` (default CHECKPOINT/eval/<mode>.json, vlmeval_<mode>.json) is a FileExistsError
    before the model loads, unless `overwrite`."""
    import json

    import genieblue_jax
    from genieblue_jax import evaluate, paths
    if format not in ("llava", "vlmeval"):
        raise ValueError(f"format={format!r}; choose 'llava' or 'vlmeval'")
    if format == "vlmeval" and reference:
        raise ValueError("--reference (retention) applies to --format=llava results")
    out = out or paths.join(checkpoint, "eval", f"{'vlmeval_' if format == 'vlmeval' else ''}{mode}.json")
    if not overwrite and paths.path(out).exists():
        raise FileExistsError(f"{out} holds an earlier evaluation; pass --out=NEW.json to keep it, "
                              f"or --overwrite to replace it")
    model = genieblue_jax.load(checkpoint, step=step)
    if format == "vlmeval":
        return _run_vlmeval(model, checkpoint, data, mode=mode, image_root=image_root, out=out, limit=limit,
                            batch_size=batch_size, max_new_tokens=max_new_tokens)
    examples, rejects = evaluate.load_examples(data, image_root=image_root, limit=limit)
    for r in rejects:
        print(f"rejected {r['path']} record {r['index']} (id {r['id']}): {r['reason']}: {r['detail']}", file=sys.stderr)
    if not examples:
        raise ValueError(f"no usable examples in {data} ({len(rejects)} rejected)")
    result = evaluate.evaluate(model, examples, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens)
    result.update(checkpoint=os.fspath(paths.path(checkpoint)), data=[os.path.abspath(d) for d in data],
                  rejected=rejects)
    runs = {f"{os.path.basename(os.path.normpath(checkpoint))} ({mode})": result}
    if mode != "text" and result["scores"]["text"] is not None:
        # The text retention of the paper's Table 6: against this model's own base LLM.
        base = evaluate.evaluate(model, [ex for ex in examples if not ex.images], mode="text",
                                 batch_size=batch_size, max_new_tokens=max_new_tokens)
        result["text_retention_vs_base"] = evaluate.retention(result["scores"]["text"], base["scores"]["text"])
        runs["its base LLM (text)"] = base
    if reference:
        evaluate.add_retention(result, json.loads(paths.path(reference).read_text()))
    print(evaluate.table(runs))
    print()
    print(evaluate.source_table(result))
    if "text_retention_vs_base" in result:
        kept = result["text_retention_vs_base"]
        print("\ntext retention vs its base LLM: " +
              (f"{kept:.2f}%" if kept is not None else "undefined (its base LLM answered no text question right)"))
    if result["counts"]["skipped"]:
        print(f"\n{result['counts']['skipped']} image questions skipped: mode 'text' runs the base LLM alone")
    evaluate.write(result, out)
    print(f"\nwrote {out}")
    return result


def _run_vlmeval(model, checkpoint: str, data: list[str], *, mode: str, image_root: str | None, out: str | None,
                 limit: int | None, batch_size: int, max_new_tokens: int) -> dict:
    """--format=vlmeval: every TSV evaluated, its VLMEvalKit files written beside `out`."""
    from genieblue_jax import evaluate, paths, vlmeval
    names = [os.path.splitext(os.path.basename(d))[0] for d in data]
    if len(set(names)) < len(names):
        raise ValueError(f"benchmarks must have distinct file names (their VLMEvalKit names): {names}")
    model_name = f"{os.path.basename(os.path.normpath(checkpoint))}-{mode}"
    results = {}
    for path in data:
        bench = vlmeval.load_benchmark(path, image_root=image_root, limit=limit)
        for r in bench.rejected:
            print(f"rejected {path} index {r['index']}: {r['reason']}: {r['detail']}", file=sys.stderr)
        if not bench.questions:
            raise ValueError(f"no usable questions in {path} ({len(bench.rejected)} rejected)")
        result = vlmeval.evaluate(model, bench, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens)
        files = vlmeval.write_files(result, bench, os.path.dirname(out), model_name=model_name)
        print(vlmeval.table(result))
        if result["counts"]["skipped"]:
            print(f"{result['counts']['skipped']} image questions skipped: mode 'text' runs the base LLM alone")
        print("wrote " + ", ".join(files.values()) + "\n")
        results[bench.name] = result
    combined = {"format": "vlmeval", "checkpoint": os.fspath(paths.path(checkpoint)), "mode": mode,
                "data": [os.path.abspath(d) for d in data], "benchmarks": results}
    evaluate.write(combined, out)
    print(f"wrote {out}")
    return combined


def main(argv):
    """`run` with the flags; a bad input exits with `tools.evaluate: error: ...`."""
    cli.start(argv)
    try:
        run(FLAGS.checkpoint, FLAGS.data, mode=FLAGS.mode, image_root=FLAGS.image_root, reference=FLAGS.reference,
            out=FLAGS.out, limit=FLAGS.limit, batch_size=FLAGS.batch_size, max_new_tokens=FLAGS.max_new_tokens,
            step=FLAGS.step, format=FLAGS.format, overwrite=FLAGS.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"tools.evaluate: error: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
