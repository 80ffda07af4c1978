"""Miniature reproduction of the paper's Tables 4-6 on the embedded demo.

    python -m experiments.reproduce                      # workdir: workdirs/reproduce
    python -m experiments.reproduce --steps 300 --recipes full_ft,lora,stage2_skip

Every recipe starts from the same cached assets as the main job (experiments/demo.py: demo
data, the pretrained base LLM and vision tower, the stage-1 projector), trains `--steps`
stage-2 steps with the same data, seed and schedule, and is evaluated on the held-out
split three ways: the base LLM alone (text), the deployed model (non-shared base: text
requests run the untouched LLM) and every request on the multimodal weights (shared).

Written to the workdir:
    results.md       Table 4/5 shape: multimodal score (VQA, caption) and its retention
                     vs full fine-tuning; Table 6 shape: text score with the shared and the
                     non-shared base and their retention vs the base LLM
    results.json     every number, per run
    loss_curves.png  training loss per recipe (from each run's metrics.jsonl)
    retention.png    bars: multimodal retention vs full FT, text retention shared / non-shared

Recipes: full_ft (the whole LLM trained: text requests have no untouched base, so the
deployed and shared rows coincide), lora (LoRA on every block), cogvlm_skip (visual expert
on every 4th block) and GenieBlue pre / post / skip (replicated blocks + LoRA).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if not __package__:  # run as `python experiments/NAME.py`: the repository root, not experiments/, goes first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPES = ("full_ft", "lora", "cogvlm_skip", "stage2_pre", "stage2_post", "stage2_skip")
LABELS = {"full_ft": "Full fine-tune", "lora": "LoRA (all blocks)", "cogvlm_skip": "CogVLM-Skip",
          "stage2_pre": "GenieBlue-Pre", "stage2_post": "GenieBlue-Post", "stage2_skip": "GenieBlue-Skip"}


def _fmt(v, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{suffix}"


def tables(results: dict) -> str:
    """Markdown: Table 4/5 shape (multimodal + retention vs full FT), Table 6 shape (text)."""
    from experiments import demo
    from genieblue_jax.evaluate import retention
    full = results.get("full_ft")
    full_mm = full["runs"]["deployed (non-shared base)"]["scores"]["multimodal"] if full else None
    base_text = next(iter(results.values()))["runs"]["base LLM"]["scores"]["text"]
    columns = demo.source_columns(out["runs"]["deployed (non-shared base)"] for out in results.values())
    lines = ["### Multimodal (cf. paper Tables 4-5)", "",
             f"| recipe | {' | '.join(map(demo.column_title, columns))} | multimodal (all) | "
             "retention vs full FT |", "|---" * (len(columns) + 3) + "|"]
    for name, out in results.items():
        r = out["runs"]["deployed (non-shared base)"]
        acc = {s: v["accuracy"] for s, v in r["by_source"].items()}
        mm = r["scores"]["multimodal"]
        lines.append(f"| {LABELS.get(name, name)} | {' | '.join(_fmt(acc.get(s)) for s in columns)} | {_fmt(mm)} | "
                     f"{_fmt(retention(mm, full_mm) if full_mm else None, '%')} |")
    chance = next(iter(results.values()))["chance"]["vqa"]
    lines += ["", f"VQA by chance (uniform guess among each question's answers): {_fmt(chance)}.", "",
              "### Text (cf. paper Table 6)", "",
              "| recipe | text, shared base | retention | text, non-shared base | retention |", "|---|---|---|---|---|"]
    lines.append(f"| base LLM | {_fmt(base_text)} | 100.00% | {_fmt(base_text)} | 100.00% |")
    for name, out in results.items():
        shared, deployed = out["runs"]["shared base"], out["runs"]["deployed (non-shared base)"]
        ns = "n/a (no separate base)" if name == "full_ft" else _fmt(deployed["scores"]["text"])
        ns_ret = "n/a" if name == "full_ft" else _fmt(deployed["retention"].get("text"), "%")
        lines.append(f"| {LABELS.get(name, name)} | {_fmt(shared['scores']['text'])} | "
                     f"{_fmt(shared['retention'].get('text'), '%')} | {ns} | {ns_ret} |")
    lines += ["", "Accuracy in percent, exact match on the held-out demo questions; retention = 100 * score / "
              "reference score, as in the paper."]
    return "\n".join(lines)


def plots(results: dict, workdirs: dict, out_dir: str) -> list[str]:
    """loss_curves.png and retention.png; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, wd in workdirs.items():
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=LABELS.get(name, name), lw=1.2)
    ax.set_xlabel("stage-2 step"), ax.set_ylabel("training loss"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    ax.set_title("Stage-2 training loss (demo scale)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss_curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    names = list(results)
    full_mm = (results["full_ft"]["runs"]["deployed (non-shared base)"]["scores"]["multimodal"]
               if "full_ft" in results else None)
    mm = [100 * results[n]["runs"]["deployed (non-shared base)"]["scores"]["multimodal"] / full_mm if full_mm else 0
          for n in names]
    shared = [results[n]["runs"]["shared base"]["retention"].get("text", 0) for n in names]
    nonshared = [0 if n == "full_ft" else results[n]["runs"]["deployed (non-shared base)"]["retention"].get("text", 0)
                 for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(names))
    for offset, values, label in ((-0.27, mm, "multimodal vs full FT"), (0.0, shared, "text, shared base"),
                                  (0.27, nonshared, "text, non-shared base")):
        ax.bar([i + offset for i in x], values, width=0.27, label=label)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks(list(x), [LABELS.get(n, n) for n in names], rotation=20, fontsize=8)
    ax.set_ylabel("retention (%)"), ax.legend(fontsize=8), ax.set_title("Retention (demo scale)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "retention.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run(workdir: str = "workdirs/reproduce", recipes=RECIPES, steps: int | None = None) -> dict:
    """Trains and evaluates `recipes` around the shared demo assets; writes the tables and plots."""
    from experiments import demo
    from experiments.configs import load
    demo.pin_cpu_numerics()  # the same code as the main job's (experiments.run at demo scale)
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    results, workdirs = {}, {}
    assets = None
    for i, name in enumerate(recipes):
        c = load(name)
        if steps:
            c.train.steps = steps
        c = demo.with_cache_dir(c, workdir)  # `demo` beside the workdir: workdirs/demo, the main job's cache
        if assets is None:
            assets = demo.prepare(c)
        c = demo.with_assets(c, assets)
        wd = os.path.join(workdir, name)
        demo.banner(i + 1, len(recipes), f"recipe {name}", f"{c.model.variant} / {c.train.stage}, "
                                                          f"{c.train.steps} steps -> {wd}")
        if demo.trained_to(wd, c.train.steps):
            print(f"cached: {wd}", flush=True)
        else:
            demo.train_to_end(c, wd)
        results[name], workdirs[name] = demo.evaluate_run(c, wd, assets), wd
        print(demo.results_table(results[name]), flush=True)
    text = tables(results) + "\n\n" + demo.numerics_line()
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# Miniature reproduction (demo scale, {steps or 'default'} stage-2 steps)\n\n{text}\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({n: {k: v for k, v in r.items() if k != "runs"} | {
            "runs": {label: {k: v for k, v in run.items() if k != "predictions"} for label, run in r["runs"].items()}}
            for n, r in results.items()}, f, indent=1)
    pngs = plots(results, workdirs, workdir)
    print("\n" + text)
    plot_files = ", ".join(os.path.basename(p) for p in pngs)
    print(f"\nwrote {os.path.join(workdir, 'results.md')}, results.json, {plot_files} "
          f"in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return results


def main(argv=None):
    """The command line (`python -m experiments.reproduce [--workdir] [--recipes] [--steps]`; `argv`
    without the program name, None: sys.argv): checks the recipe names (an unknown one is argparse's
    usage error, exit 2) and calls `run`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdirs/reproduce")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {RECIPES}")
    parser.add_argument("--steps", type=int, default=None, help="stage-2 steps per recipe (default: the recipe's)")
    args = parser.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {RECIPES}")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    run(args.workdir, recipes, args.steps)


if __name__ == "__main__":
    main()
