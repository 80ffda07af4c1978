"""Fault drill: short tiny-scale training runs (`python -m experiments.run`, the command users
run) with faults injected at random moments; prints what each fault did and whether the run
survived it. Exit status 0 iff every trial survived.

    python -m tools.fault_drill                                  # every fault, 3 trials each
    python -m tools.fault_drill --faults=sigkill,corrupt --trials=10 --seed=1

Every trial is the same 8-step run (tiny-qwen2 + tiny-siglip, a checkpoint every step, the
demo data) in a fresh workdir; "the reference" is that run without a fault. Survived means:

  sigterm       SIGTERM after a random step: "stopped by SIGTERM" and a checkpoint; the same
                command again ends with the reference's losses, bitwise, each step logged once
  sigkill       SIGKILL at a random moment (checkpoint writes included): the same command again
                ends with the reference's losses, bitwise, each step logged once
  corrupt       a finished 4-step run; one file of a random checkpoint step gets a flipped byte,
                is truncated or is deleted; continued to 8 steps: a damaged step is reported by
                file and the run ends with the reference's losses, bitwise
  nan           a diverging run (optim.lr = 1e30: huge but finite weights after step 1, NaN
                losses after): the run stops naming the non-finite streak and the last good
                checkpoint, which is intact (no checkpoint is written during the streak)
  full_disk     the workdir on a tmpfs too small for the run (needs root to mount; skipped
                otherwise): the run fails naming the full disk, its newest checkpoint is
                intact; once the disk is larger the same command ends with the reference's losses
  two_trainers  two trainers started together on one workdir: one is refused naming the lock,
                the other ends with the reference's losses
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from genieblue_jax.cli import PACKAGES_ROOT

FAULTS = ("sigterm", "sigkill", "corrupt", "nan", "full_disk", "two_trainers")
STEPS = 8
OVERRIDES = {"model.llm": "tiny-qwen2", "model.vit": "tiny-siglip", "data.seq_len": 96, "data.max_tiles_per_row": 4,
             "data.demo_examples": 200, "train.steps": STEPS, "train.global_batch_size": 8, "train.log_every": 1,
             "checkpoint.every_steps": 1, "checkpoint.keep": 3, "demo.enabled": "false",
             "init.from_scratch": "llm,vision,projector"}

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program (importing the module defines no flags)."""
    flags.DEFINE_list("faults", list(FAULTS), f"Faults to inject, of {FAULTS}.")
    flags.DEFINE_integer("trials", 3, "Trials per fault.")
    flags.DEFINE_integer("seed", 0, "Seed of the random moments, files and damage.")
    flags.DEFINE_string("out", None, "Also write the results as JSON here.")


class Drill:
    """Runs the trials in `root`; every run shares one XLA compilation cache (fast restarts)."""

    def __init__(self, root: str, rng: random.Random):
        self.root, self.rng, self.n = root, rng, 0
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                    "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "xla_cache"),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONUNBUFFERED": "1"}
        self.reference = None

    def workdir(self, name: str) -> str:
        """A fresh workdir path under the drill's root, numbered, named after `name`."""
        self.n += 1
        return os.path.join(self.root, f"{self.n:03d}_{name}")

    def start(self, workdir: str, **overrides) -> subprocess.Popen:
        """Starts the drill's training run on `workdir` (recipe overrides on top of OVERRIDES)."""
        args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]
        return subprocess.Popen([sys.executable, "-m", "experiments.run", "--config=stage2_skip",
                                 f"--workdir={workdir}", *args], cwd=PACKAGES_ROOT, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run(self, workdir: str, **overrides) -> tuple[int, str]:
        """Runs `start` to the end; (exit status, output)."""
        p = self.start(workdir, **overrides)
        out = p.communicate(timeout=900)[0]
        return p.returncode, out

    def run_until(self, workdir: str, sig: int, after_rows: int, delay_s: float) -> tuple[int, str]:
        """Starts the run; sends `sig` `delay_s` after `after_rows` rows are in metrics.jsonl."""
        p = self.start(workdir)
        deadline = time.time() + 900
        while len(_rows(workdir)) < after_rows and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay_s)
        if p.poll() is None:
            p.send_signal(sig)
        out = p.communicate(timeout=900)[0]
        return p.returncode, out

    def reference_losses(self) -> list[float]:
        """The losses of one uninterrupted run (run once, then cached)."""
        if self.reference is None:
            w = self.workdir("reference")
            rc, out = self.run(w)
            if rc != 0:
                raise RuntimeError(f"the reference run failed:\n{out[-3000:]}")
            self.reference = [r["loss"] for r in _rows(w)]
        return self.reference

    def same_as_reference(self, workdir: str) -> str | None:
        """None if `workdir` logged each step once with the reference's losses; else what differs."""
        rows = _rows(workdir)
        if [r["step"] for r in rows] != list(range(1, STEPS + 1)):
            return f"steps logged {[r['step'] for r in rows]}"
        if [r["loss"] for r in rows] != self.reference_losses():
            return "losses differ from the uninterrupted run"
        return None


def _rows(workdir: str) -> list[dict]:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except (OSError, ValueError):
        return []


def _last_line(out: str, *needles: str) -> str:
    lines = [line for line in out.splitlines() if any(n in line for n in needles)]
    return lines[-1].strip()[:200] if lines else ""


def _intact(workdir: str) -> str | None:
    """None if the newest checkpoint step's files match its checksums; else why not."""
    from genieblue_jax.checksums import manifest_damage
    ckpts = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if os.path.isdir(ckpts) else []
    if not steps:
        return "no committed checkpoint"
    problems = manifest_damage(os.path.join(ckpts, str(steps[-1])))
    return None if problems == [] else f"step {steps[-1]}: {problems}"


# --- the faults: each returns (survived, what happened) ------------------------------------------

def sigterm(d: Drill) -> tuple[bool, str]:
    """SIGTERM at a random moment, then the run again: it must stop cleanly and resume bitwise."""
    w, at = d.workdir("sigterm"), d.rng.randint(1, STEPS - 1)
    rc, out = d.run_until(w, signal.SIGTERM, at, d.rng.uniform(0, 0.3))
    said = _last_line(out, "stopped by SIGTERM")
    rc2, out2 = d.run(w)
    diff = d.same_as_reference(w)
    ok = rc == 0 and rc2 == 0 and diff is None and (said or "done: step" in out)
    return bool(ok), f"after row {at}: {said or 'finished first'}; again: {diff or 'bitwise the reference'}"


def sigkill(d: Drill) -> tuple[bool, str]:
    """SIGKILL at a random moment, then the run again: it must resume bitwise."""
    w, at = d.workdir("sigkill"), d.rng.randint(1, STEPS - 1)
    rc, out = d.run_until(w, signal.SIGKILL, at, d.rng.uniform(0, 0.5))
    rc2, out2 = d.run(w)
    diff = d.same_as_reference(w)
    resumed = _last_line(out2, "resuming from step") or "started from scratch"
    return rc2 == 0 and diff is None, f"killed after row {at} (rc {rc}); again: {resumed}; " \
                                      f"{diff or 'bitwise the reference'}"


def corrupt(d: Drill) -> tuple[bool, str]:
    """A random checkpoint file flipped, truncated or deleted: the resume must refuse it by name
    or not need it, and end bitwise the reference."""
    w = d.workdir("corrupt")
    rc, out = d.run(w, **{"train.steps": 4})
    if rc != 0:
        return False, f"the 4-step run failed: {out[-300:]}"
    ckpts = os.path.join(w, "checkpoints")
    step = d.rng.choice(sorted(s for s in os.listdir(ckpts) if s.isdigit()))
    files = sorted(os.path.relpath(os.path.join(a, f), os.path.join(ckpts, step))
                   for a, _, fs in os.walk(os.path.join(ckpts, step)) for f in fs)
    rel = d.rng.choice(files)
    path, how = os.path.join(ckpts, step, rel), d.rng.choice(("flip", "truncate", "delete"))
    size = os.path.getsize(path)
    if how == "flip" and size:
        with open(path, "r+b") as f:
            at = d.rng.randrange(size)
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ (1 << d.rng.randrange(8))]))
    elif how == "truncate" or (how == "flip" and not size):
        how = "truncate"
        os.truncate(path, d.rng.randrange(size) if size else 0)
    else:
        os.remove(path)
    rc2, out2 = d.run(w)
    diff = d.same_as_reference(w)
    said = _last_line(out2, "is damaged", "Error", "error")
    return rc2 == 0 and diff is None, f"{how} {step}/{rel}: {said or 'not needed by the resume'}; " \
                                      f"{diff or 'bitwise the reference' if rc2 == 0 else f'rc {rc2}'}"


def nan(d: Drill) -> tuple[bool, str]:
    """A diverging run (learning rate 1e30): it must stop naming the non-finite steps, its newest
    checkpoint intact."""
    w = d.workdir("nan")
    rc, out = d.run(w, **{"optim.lr": 1e30, "train.max_bad_steps": 3})
    said = _last_line(out, "non-finite steps in a row")
    bad = _intact(w)
    return rc != 0 and bool(said) and bad is None, f"{said or out[-200:]}; newest checkpoint {bad or 'intact'}"


def full_disk(d: Drill) -> tuple[bool, str]:
    """A 7 MB tmpfs workdir (root only): the run must fail on the full disk with its newest
    checkpoint intact, and resume bitwise once the disk grows."""
    if os.geteuid() != 0:
        return True, "skipped: mounting a small tmpfs needs root"
    w = d.workdir("full_disk")
    os.makedirs(w)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", w], check=True)
    try:
        rc, out = d.run(w)
        said = _last_line(out, "No space left", "ENOSPC", "Errno 28")
        bad = _intact(w)
        subprocess.run(["mount", "-o", "remount,size=64m", w], check=True)
        rc2, out2 = d.run(w)
        diff = d.same_as_reference(w)
    finally:
        subprocess.run(["umount", "-l", w], check=False)
    ok = rc != 0 and bool(said) and bad is None and rc2 == 0 and diff is None
    return ok, f"{said or f'rc {rc}: ' + out[-200:]}; newest checkpoint {bad or 'intact'}; after the disk grew: " \
               f"{diff or 'bitwise the reference' if rc2 == 0 else f'rc {rc2}: ' + out2[-300:]}"


def two_trainers(d: Drill) -> tuple[bool, str]:
    """Two trainers on one workdir: exactly one must refuse by naming the lock, the other end
    bitwise the reference."""
    w = d.workdir("two_trainers")
    procs = [d.start(w), d.start(w)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    rcs = [p.returncode for p in procs]
    refused = [o for o, rc in zip(outs, rcs) if rc != 0]
    said = _last_line(refused[0], "lock", "another trainer") if refused else ""
    diff = d.same_as_reference(w)
    ok = sorted(rcs)[0] == 0 and len(refused) == 1 and bool(said) and diff is None
    return ok, f"exit codes {rcs}; {said or 'no refusal'}; {diff or 'bitwise the reference'}"


def main(argv):
    """Runs --trials of each of --faults, prints one line per trial and the totals (--out: JSON);
    exit status 1 when any trial failed."""
    del argv
    unknown = set(FLAGS.faults) - set(FAULTS)
    if unknown:
        raise app.UsageError(f"--faults: unknown {sorted(unknown)}; choose from {FAULTS}")
    root = tempfile.mkdtemp(prefix="genieblue_fault_drill_")
    drill = Drill(root, random.Random(FLAGS.seed))
    drill.reference_losses()
    results = []
    for fault in FLAGS.faults:
        for trial in range(FLAGS.trials):
            t0 = time.time()
            survived, what = globals()[fault](drill)
            results.append({"fault": fault, "trial": trial, "survived": survived, "what": what,
                            "seconds": round(time.time() - t0, 1)})
            print(f"{fault:13s} #{trial}  {'survived' if survived else 'FAILED  '}  {what}", flush=True)
    print("\nfault          trials  survived")
    for fault in FLAGS.faults:
        mine = [r for r in results if r["fault"] == fault]
        print(f"{fault:13s}  {len(mine):6d}  {sum(r['survived'] for r in mine):8d}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=1)
    shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["survived"] for r in results) else 1


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
