"""The embedded demo: what `python -m experiments.run --config=stage2_skip` does at demo scale.

    [1/6] demo data      rendered scenes (`demo.scene`: one large shape per image by default),
                         captions, VQA and text tasks, a SentencePiece tokenizer
    [2/6] base LLM       pretrained by the framework on the demo's text (experiments/configs/pretrain.py)
    [3/6] vision tower   demo-siglip pretrained on scenes of its own (experiments/demo_vision.py)
    [4/6] stage 1        the projector, on captions (ViT and LLM frozen)
    [5/6] the recipe     e.g. stage 2 GenieBlue-Skip, on captions / VQA (no text tasks)
    [6/6] evaluation     held-out questions: the base LLM, the deployed model (non-shared
                         base) and the shared-base ablation

Steps 1-4 are shared by every demo recipe and cached under `demo.cache_dir` (default: a
`demo` folder beside the workdir, so workdirs/demo for the default workdirs/RECIPE and
/data/runs/demo for --workdir=/data/runs/s2; never the current directory when the workdir is
elsewhere), keyed by what makes them (models, steps, seeds), so a second run, or
another recipe, reuses them; the recipe's own workdir resumes as any training run does,
and the evaluation is cached per checkpoint step.

Why the stage-2 data has no text tasks: the base LLM learned them in pretraining and the
multimodal data never shows them, the situation of an MLLM whose training data does not
cover everything its LLM could do. A model that changes the LLM itself (full fine-tuning,
or the shared-base deployment) can then lose them, while GenieBlue's non-shared base runs
the untouched LLM for text and keeps them exactly (paper Tables 3 and 6).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import typing

from experiments.configs import common

if typing.TYPE_CHECKING:  # importing the library imports JAX, which tests/conftest.py must pin first
    from genieblue_jax.run_config import RunConfig

# Sources and weights of the demo's training stages (experiments.demo_data.SOURCES).
# Pretraining reads the "pretrain" split, written without images: the text tasks plus the
# image conversations answered blind, so the base LLM knows the language of the questions
# and answers (as a real pretrained LLM would) but none of the images' content.
PRETRAIN_MIXTURE = {"text": 6, "caption": 2, "vqa": 2}
# The train / eval splits (the text tasks of eval measure retention). No OCR: reading 3-4
# random capitals is beyond a 1.6M-parameter model in minutes, and its loss (~4.7 / token,
# unlearnable) would dominate the multimodal gradient.
TRAIN_MIXTURE = {"caption": 2, "vqa": 5, "text": 2}
STAGE1_MIXTURE = {"caption": 1}
MULTIMODAL_MIXTURE = {"caption": 2, "vqa": 5}
STEPS = 6


# The README's demo figures are one training run's float32 rounding: 150 steps turn a
# last-bit difference into other scores. XLA:CPU generates code for the host CPU, and two
# of its choices change bits (measured by tests/test_cpu_numerics.py and README, "The
# embedded demo"): where FMA instructions exist (AVX2, AVX-512), LLVM fuses a multiply and
# an add wherever the shape of the vectorised code allows, so the same step gives other
# bits when only that shape changes; and the matmul library (YNNPACK) picks kernels per
# CPU. Capped at AVX (256-bit vectors, no FMA: every multiply and add rounds on its own),
# the same step gives the same bits whatever shape the code takes, and reductions split
# the same way on every x86-64 CPU with AVX2 or AVX-512; platform-dependent math off asks
# YNNPACK for arithmetic that is consistent across CPUs. It costs the demo no measurable
# time (its matmuls run in YNNPACK, which the cap does not touch).
DEMO_XLA_CPU_FLAGS = {"xla_cpu_max_isa": "AVX", "xla_cpu_enable_platform_dependent_math": "false"}
# numerics_fingerprint() on the machine that made the README's demo tables (with the lock's
# packages and the flags above). A machine printing another one rounds some float32
# operation differently and trains to other decimals.
README_NUMERICS_FINGERPRINT = "5a1905e4"


def pin_cpu_numerics() -> None:
    """Adds DEMO_XLA_CPU_FLAGS to XLA_FLAGS; a flag the user already set wins,
    and the ISA cap applies to x86-64 only. Call before JAX's first computation: XLA reads
    its flags when the CPU backend starts."""
    import platform
    current = os.environ.get("XLA_FLAGS", "")
    for name, value in DEMO_XLA_CPU_FLAGS.items():
        if f"--{name}=" in current or (name == "xla_cpu_max_isa" and platform.machine() not in ("x86_64", "AMD64")):
            continue
        current = f"{current} --{name}={value}".strip()
    os.environ["XLA_FLAGS"] = current


def numerics_fingerprint() -> str:
    """8 hex digits of the bits of one demo training computation: the loss and every weight
    gradient of the demo LLM (demo-small-qwen2: embeddings, RoPE, attention, SwiGLU, RMSNorm,
    cross-entropy) at a fixed initialisation, on fixed tokens, compiled as the jobs compile
    it. Equal on two machines (same packages, same XLA_FLAGS) means the demo's float32
    arithmetic is the same there; the README's figures were made where it is
    README_NUMERICS_FINGERPRINT.

        >>> len(numerics_fingerprint())
        8
    """
    import hashlib

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from genieblue_jax import models
    cfg = models.get_preset("demo-small-qwen2")
    module = models.build(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 128)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), (8, 128))
    segment_ids = jnp.ones((8, 128), jnp.int32)

    def loss(params):
        logits = module.apply({"params": params}, tokens, positions, segment_ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(models.init_params(cfg, jax.random.key(0)))
    digest = hashlib.sha256(np.asarray(value).tobytes())
    for _, leaf in sorted(models.flatten(grads).items()):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()[:8]


def numerics_line() -> str:
    """The main job's line on this machine's float32 arithmetic against the README's."""
    mine = numerics_fingerprint()
    if mine == README_NUMERICS_FINGERPRINT:
        return f"numerics fingerprint {mine}: the README's machine's (its tables are what this run prints)"
    return (f"numerics fingerprint {mine}, the README's machine's is {README_NUMERICS_FINGERPRINT}: this CPU or "
            f"package set rounds some float32 operation differently, so expect other decimals than the README's")


def banner(step: int, total: int, title: str, detail: str = "") -> None:
    """Prints the header of demo step `step` of `total` ("[step/total] title  -  detail") between
    two rules of `=`, flushed so that it shows before the step's own output."""
    line = f"[{step}/{total}] {title}"
    print(f"\n{'=' * 78}\n{line}{'  -  ' + detail if detail else ''}\n{'=' * 78}", flush=True)


@dataclasses.dataclass
class Assets:
    """What steps 1-4 of the demo made, as paths: the demo datasets' folder (DIR/train, DIR/eval,
    DIR/pretrain), the SentencePiece tokenizer, the pretrained base LLM and vision tower
    checkpoints and the stage-1 workdir; a step not run (e.g. stage 1 for a stage-1 recipe) leaves
    its path None."""
    data_dir: str
    tokenizer: str
    base_llm: str | None = None        # genieblue_jax checkpoint of the pretrained base LLM
    vision: str | None = None          # genieblue_jax checkpoint of the pretrained vision tower
    stage1_workdir: str | None = None


class Preempted(Exception):
    """A demo training step (base LLM, stage 1 or the recipe) stopped early by SIGTERM: its
    checkpoint is saved and the same command resumes it. Nothing after it runs, so no cache
    entry and no evaluation is ever made from a half-trained model."""


def train_to_end(cfg: RunConfig, workdir: str) -> dict:
    """Trains `cfg` in `workdir` (resuming what is there) to `cfg.train.steps`; returns
    trainer.train's result. Raises Preempted when SIGTERM stopped it first (its checkpoint saved)."""
    from genieblue_jax.train import trainer
    result = trainer.train(cfg, workdir)
    if result["step"] < cfg.train.steps:
        raise Preempted(f"{cfg.train.stage} stopped by SIGTERM at step {result['step']} of {cfg.train.steps} "
                        f"({workdir}); run the same command to resume")
    return result


def with_cache_dir(c: RunConfig, workdir: str) -> RunConfig:
    """A copy of `c` whose demo.cache_dir is set: the configured one, or `demo` beside `workdir`.

        >>> from experiments.configs import load
        >>> with_cache_dir(load("stage2_skip"), "/data/runs/s2").demo.cache_dir
        '/data/runs/demo'
    """
    c = c.copy()
    if not c.demo.cache_dir:
        c.demo.cache_dir = os.path.join(os.path.dirname(os.path.abspath(workdir)), "demo")
    return c


# --- 1. data ------------------------------------------------------------------------------

def demo_data(c: RunConfig) -> Assets:
    """The demo datasets (train / eval / a text-only pretraining split) and tokenizer."""
    from experiments.demo_data import SCENES, write_demo_datasets
    d = c.demo
    if not d.cache_dir:
        raise ValueError("config demo.cache_dir is empty: set it, or pass the config through "
                         "experiments.demo.with_cache_dir(config, workdir) (a `demo` folder beside the workdir)")
    if d.scene not in SCENES:
        raise ValueError(f"config demo.scene={d.scene!r}: choose from {SCENES}")
    key = f"data_{d.scene}_{d.train_examples}_{d.eval_examples}_{d.pretrain_examples}_seed{c.train.seed}_v5"
    out = os.path.join(d.cache_dir, key)
    done = os.path.join(out, "DONE")
    if os.path.isfile(done):
        print(f"cached: {out}", flush=True)
    else:
        t0 = time.perf_counter()
        write_demo_datasets(out, splits={"train": d.train_examples, "eval": d.eval_examples,
                                         "pretrain": d.pretrain_examples},
                            mixtures={"pretrain": PRETRAIN_MIXTURE, "train": TRAIN_MIXTURE, "eval": TRAIN_MIXTURE},
                            text_only_splits=("pretrain",), seed=c.train.seed, scene=d.scene)
        with open(done, "w") as f:
            f.write("ok\n")
        print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return Assets(out, os.path.join(out, "tokenizer.model"))


def sources(data_dir: str, split: str, mixture: dict[str, int]) -> str:
    """`data.sources` of a demo split: "caption=DIR:3,vqa=DIR:3,..."."""
    return ",".join(f"{s}={os.path.join(data_dir, split, s)}:{w}" for s, w in mixture.items())


# --- 2.-5. training -------------------------------------------------------------------------

def trained_to(workdir: str, steps: int) -> bool:
    """Whether `workdir` holds a run whose latest checkpoint is step `steps` (a cached step)."""
    from genieblue_jax import workdir as workdir_lib
    if not workdir_lib.is_workdir(workdir):
        return False
    mngr = workdir_lib.checkpoint_manager(workdir, keep=1)
    try:
        return mngr.latest_step() == steps
    finally:
        mngr.close()


def pretrain_base(c: RunConfig, assets: Assets) -> str:
    """Pretrains the base LLM on the text tasks (stage "pretrain"); returns its checkpoint."""
    from experiments.configs import load
    from genieblue_jax import checkpoint, models
    from genieblue_jax import workdir as workdir_lib
    d = c.demo
    p = load("pretrain")
    p.model.llm, p.model.vit, p.train.seed = c.model.llm, c.model.vit, c.train.seed
    p.train.steps = d.pretrain_steps
    p.data.sources, p.data.tokenizer = sources(assets.data_dir, "pretrain", PRETRAIN_MIXTURE), assets.tokenizer
    key = f"base_{c.model.llm}_{d.pretrain_steps}steps_{os.path.basename(assets.data_dir)}"
    workdir, ckpt = os.path.join(d.cache_dir, key), os.path.join(d.cache_dir, key, "llm")
    if checkpoint.is_checkpoint(ckpt):
        print(f"cached: {ckpt}", flush=True)
        return ckpt
    train_to_end(p, workdir)
    t = workdir_lib.load_trained(workdir)
    checkpoint.save(ckpt, {"llm": t.mcfg.llm.replace(remat=False, attention_chunk=0, scan_layers=False)},
                    {"llm": t.params["llm"]}, tokenizer=assets.tokenizer,
                    source={"pretrained": workdir, "steps": t.step}, overwrite=True)
    print(f"base LLM: {models.count_params(t.params['llm']) / 1e6:.2f}M parameters -> {ckpt}", flush=True)
    return ckpt


def stage1(c: RunConfig, assets: Assets) -> str:
    """Stage 1 on captions around the cached base; returns its workdir."""
    from experiments.configs import load
    d = c.demo
    s = load("stage1")
    s.model.llm, s.model.vit, s.train.seed = c.model.llm, c.model.vit, c.train.seed
    s.train.steps = d.stage1_steps
    s.init.llm_checkpoint, s.init.vit_checkpoint = assets.base_llm, assets.vision
    s.data.sources, s.data.tokenizer = sources(assets.data_dir, "train", STAGE1_MIXTURE), assets.tokenizer
    vision = os.path.basename(os.path.normpath(assets.vision)) if assets.vision else c.model.vit
    key = f"stage1_{d.stage1_steps}steps_on_{os.path.basename(os.path.dirname(assets.base_llm))}_{vision}"
    workdir = os.path.join(d.cache_dir, key)
    if trained_to(workdir, s.train.steps):
        print(f"cached: {workdir}", flush=True)
    else:
        train_to_end(s, workdir)
    return workdir


def with_assets(c: RunConfig, assets: Assets) -> RunConfig:
    """The recipe pointed at the demo's base, stage-1 projector and multimodal data."""
    c = c.copy()
    c.init.llm_checkpoint, c.init.vit_checkpoint = assets.base_llm, assets.vision
    if c.train.stage != "stage1":
        c.init.stage1_workdir = assets.stage1_workdir
    c.data.sources = sources(assets.data_dir, "train", STAGE1_MIXTURE if c.train.stage == "stage1"
                             else MULTIMODAL_MIXTURE)
    c.data.tokenizer = assets.tokenizer
    return c


def pretrain_vision(c: RunConfig) -> str:
    """The demo's pretrained vision tower (experiments/demo_vision.py); returns its checkpoint."""
    from experiments import demo_vision
    from genieblue_jax import checkpoint
    ckpt = os.path.join(c.demo.cache_dir,
                        f"vision_{c.model.vit}_{c.demo.scene}_{c.demo.vision_steps}steps_seed{c.train.seed}")
    if checkpoint.is_checkpoint(ckpt):
        print(f"cached: {ckpt}", flush=True)
        return ckpt
    out = demo_vision.pretrain(ckpt, preset=c.model.vit, steps=c.demo.vision_steps, seed=c.train.seed,
                               scene=c.demo.scene)
    print(f"vision tower: {100 * out['object_patch_accuracy']:.1f}% of held-out object patches tagged with their "
          f"shape and colour ({100 * out['patch_accuracy']:.1f}% of all patches) -> {ckpt}", flush=True)
    return ckpt


def prepare(c: RunConfig) -> Assets:
    """Steps 1-4 (each cached); what the recipe needs is filled in."""
    banner(1, STEPS, "demo data", f"rendered shapes ({c.demo.scene} scenes), captions, VQA, text tasks + tokenizer")
    assets = demo_data(c)
    banner(2, STEPS, "base LLM", f"{c.model.llm} pretrained on text: the text tasks + the questions answered blind "
                                 f"({c.demo.pretrain_steps} steps)")
    assets.base_llm = pretrain_base(c, assets)
    if c.train.stage != "pretrain":
        banner(3, STEPS, "vision tower", f"{c.model.vit} pretrained to tag each patch's shape and colour "
                                         f"({c.demo.vision_steps} steps)")
        assets.vision = pretrain_vision(c)
    if c.train.stage not in ("stage1", "pretrain"):
        banner(4, STEPS, "stage 1", f"projector on captions ({c.demo.stage1_steps} steps; ViT and LLM frozen)")
        assets.stage1_workdir = stage1(c, assets)
    return assets


# --- 6. evaluation --------------------------------------------------------------------------

def evaluate_run(c: RunConfig, workdir: str, assets: Assets) -> dict:
    """Base LLM (text mode), the deployed model (non-shared) and the shared-base ablation on
    the held-out eval split; cached in WORKDIR/eval/step_N.json."""
    import genieblue_jax
    from genieblue_jax import evaluate
    model = genieblue_jax.load(workdir)
    cache = os.path.join(workdir, "eval", f"step_{model.source['step']}_n{c.demo.eval_examples}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            print(f"cached: {cache}", flush=True)
            return json.load(f)
    examples, _ = evaluate.load_examples([os.path.join(assets.data_dir, "eval", s) for s in TRAIN_MIXTURE])
    base = genieblue_jax.load(assets.base_llm)
    runs = {"base LLM": evaluate.evaluate(base, examples, mode="text"),
            "deployed (non-shared base)": evaluate.evaluate(model, examples, mode="multimodal"),
            "shared base": evaluate.evaluate(model, examples, mode="shared")}
    for label in ("deployed (non-shared base)", "shared base"):
        evaluate.add_retention(runs[label], runs["base LLM"])
    out = {"structure": model.mcfg.structure.name, "step": model.source["step"], "runs": runs,
           "chance": chance(examples)}
    evaluate.write(out, cache)
    return out


def chance(examples) -> dict:
    """Uniform-guess accuracy (percent) of the VQA questions among `examples`."""
    from experiments.demo_data import chance_accuracy
    values = [chance_accuracy(ex.turns[0]["content"]) for ex in examples if ex.source == "vqa"]
    values = [v for v in values if v is not None]
    return {"vqa": 100.0 * sum(values) / len(values) if values else None}


def source_columns(runs) -> list[str]:
    """The multimodal sources any of `runs` (genieblue_jax.evaluate results) scored, in table
    order: a demo without OCR gets no empty OCR column."""
    runs = list(runs)
    return [s for s in ("vqa", "caption", "ocr") if any(s in r["by_source"] for r in runs)]


def column_title(source: str) -> str:
    """The results table's header of a data source: "caption" as is, the others upper-cased.

        >>> column_title("vqa"), column_title("caption")
        ('VQA', 'caption')
    """
    return source if source == "caption" else source.upper()


def results_table(out: dict) -> str:
    """The demo's results: multimodal accuracy, text-task score and text retention per run."""
    def fmt(v, suffix=""):
        return "-" if v is None else f"{v:.2f}{suffix}"

    runs = out["runs"]
    columns = source_columns(runs.values())
    lines = [f"| model ({out['structure']}, step {out['step']}) | {' | '.join(map(column_title, columns))}"
             f" | multimodal (all) | text tasks | text retention |", "|---" * (len(columns) + 4) + "|"]
    for label, r in runs.items():
        acc = {s: v["accuracy"] for s, v in r["by_source"].items()}
        ret = r.get("retention", {}).get("text")
        if label == "base LLM" and r["scores"]["text"]:  # itself; undefined ("-") when it scored 0
            ret = 100.0
        lines.append(f"| {label} | {' | '.join(fmt(acc.get(s)) for s in columns)} | "
                     f"{fmt(r['scores']['multimodal'])} | {fmt(r['scores']['text'])} | {fmt(ret, '%')} |")
    lines.append(f"\nAccuracy in percent, exact match on {runs['deployed (non-shared base)']['counts']['answered']} "
                 f"held-out questions; VQA by chance (uniform guess among each question's answers): "
                 f"{fmt(out['chance']['vqa'])}. The base LLM answers no image question.")
    return "\n".join(lines)


def example_image(data_dir: str, path: str) -> tuple[str, str]:
    """Writes the first held-out VQA image to `path` (PNG); returns (path, its question), for
    the `tools.chat` command the demo suggests."""
    from data_pipelines.records import IMAGE_TAG, ArrayRecordExampleSource
    ex = ArrayRecordExampleSource(os.path.join(data_dir, "eval", "vqa"))[0]
    with open(path, "wb") as f:
        f.write(ex.images[0])
    return path, ex.turns[0]["content"].replace(IMAGE_TAG, "").strip()


# --- the whole demo ---------------------------------------------------------------------------

def run(config: RunConfig, workdir: str, recipe: str) -> dict:
    """Steps 1-6 for `config` (a demo-scale recipe); prints the results and what to try next."""
    config.validate()  # a bad value is an error now, not after the demo's pretraining
    config = with_cache_dir(config, workdir)
    t0 = time.perf_counter()
    numerics = numerics_line()
    print(numerics, flush=True)
    assets = prepare(config)
    c = with_assets(config, assets)
    banner(5, STEPS, f"recipe {recipe}", f"{c.model.variant} / {c.train.stage}, {c.train.steps} steps -> {workdir}")
    if trained_to(workdir, c.train.steps):
        print(f"cached: {workdir} (step {c.train.steps})", flush=True)
    else:
        train_to_end(c, workdir)
    out = {"workdir": workdir}
    if c.demo.evaluate and c.train.stage != "pretrain":
        banner(6, STEPS, "evaluation", f"{c.demo.eval_examples} held-out questions: base LLM, deployed, shared base")
        out = {**evaluate_run(c, workdir, assets), "workdir": workdir}
        print("\n" + results_table(out) + "\n" + numerics)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\ndone in {minutes:.1f} min. Checkpoints: {os.path.join(workdir, 'checkpoints')}; metrics: "
          f"{os.path.join(workdir, 'metrics.jsonl')} (TensorBoard: {os.path.join(workdir, 'tensorboard')}); "
          f"cache: {c.demo.cache_dir}")
    image, question = example_image(assets.data_dir, os.path.join(workdir, "example.png"))
    print("next:\n"
          f"  python -m tools.chat --checkpoint {workdir} --prompt \"What is 3 + 4?\"\n"
          f"  python -m tools.chat --checkpoint {workdir} --image {image} --prompt \"{question}\"\n"
          f"  python -m tools.evaluate --checkpoint {workdir} --data {os.path.join(assets.data_dir, 'eval', 'vqa')} "
          f"--mode multimodal\n"
          f"  python -m tools.to_torch --checkpoint {workdir} --out {workdir}_torch\n"
          f"  python -m tools.export_qnn --checkpoint {workdir} --out {workdir}_qnn", flush=True)
    return out


__all__ = ["run", "pin_cpu_numerics", "numerics_fingerprint", "numerics_line", "prepare", "with_assets",
           "evaluate_run", "results_table", "source_columns", "column_title", "example_image",
           "banner", "Assets", "common"]
