"""Multi-host training as a pod runs it, on localhost: `python -m experiments.run` started as
two processes (`--coordinator_address/--num_processes/--process_id`, gloo collectives), each
with two CPU devices, each reading its own data stream (`host_sharding="examples"`), the
parameters FSDP-sharded across both processes. Compared with one process on four devices
reading the same two streams (`data.streams=2`: the global batch does not depend on the
number of hosts), and with itself after a SIGTERM that reaches one host only.
"""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from genieblue_jax.train import trainer
from tests.conftest import xla_flags
from tests.train.conftest import losses, tiny_config

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
# The run as command-line overrides, and the same as a config for the one-process reference.
OVERRIDES = {"model.llm": "tiny-qwen2", "model.vit": "tiny-siglip", "data.seq_len": 96, "data.max_tiles_per_row": 4,
             "data.demo_examples": 200, "data.streams": 2, "train.steps": STEPS, "train.global_batch_size": 8,
             "train.log_every": 1, "checkpoint.every_steps": 1000, "mesh.data": 1, "mesh.fsdp": -1,
             "mesh.tensor": 1, "demo.enabled": False, "init.from_scratch": "llm,vision,projector"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, port):
    env = {**os.environ, "XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu"}
    args = [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in OVERRIDES.items()]
    return [subprocess.Popen([sys.executable, "-m", "experiments.run", "--config=stage2_skip", f"--workdir={workdir}",
                              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                              *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def _finish(procs):
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + "\n-----\n" + outs[1][-3000:]
    return outs


def _steps_logged(workdir):
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line)["step"] for line in f]
    except (OSError, ValueError):
        return []


def test_two_hosts_with_fsdp_across_them_equal_one_host_and_survive_a_sigterm_to_one(tmp_path):
    # One process, four devices, both streams: the reference.
    c = tiny_config(**{**OVERRIDES, "mesh.fsdp": 4})
    single = losses(trainer.train(c, str(tmp_path / "single"))["workdir"])
    assert len(single) == STEPS

    # Two processes x two devices: FSDP spans both processes; each reads its own stream.
    uninterrupted = str(tmp_path / "two")
    outs = _finish(_start(uninterrupted, _free_port()))
    two = losses(uninterrupted)
    np.testing.assert_allclose(two, single, rtol=1e-5)
    rows = [json.loads(line) for line in open(os.path.join(uninterrupted, "metrics.jsonl"))]
    ref_rows = [json.loads(line) for line in open(os.path.join(tmp_path / "single", "metrics.jsonl"))]
    # Throughput counts the tokens of the whole global batch (both hosts' rows), not one host's.
    assert [(r["seq_tokens"], r["trained_tokens"]) for r in rows] == \
        [(r["seq_tokens"], r["trained_tokens"]) for r in ref_rows]
    # Output to a pipe (no terminal): no progress bar, one plain line per logged row on each host,
    # tagged with its process index; its step and loss are the metrics.jsonl row's.
    for i, out in enumerate(outs):
        assert "\r" not in out
        logged = re.findall(rf"^\[process {i}/2\] \S+ \S+ step (\d+)/{STEPS} loss (\S+) tokens/s \d+ ETA \S+$", out,
                            re.MULTILINE)
        assert logged == [(str(r["step"]), f"{r['loss']:.4f}") for r in rows], out[-3000:]

    # SIGTERM to process 1 only, at a random step: both save the same step and exit cleanly.
    run = str(tmp_path / "preempted")
    at = random.Random().randint(2, STEPS - 3)
    procs = _start(run, _free_port())
    deadline = time.time() + 600
    while len(_steps_logged(run)) < at and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    stopped = [re.findall(r"stopped by SIGTERM after step (\d+); checkpoint saved", out) for out in outs]
    assert len(stopped[0]) == len(stopped[1]) == 1 and stopped[0] == stopped[1], outs  # the same step on both
    saved = int(stopped[0][0])
    assert at <= saved < STEPS, (at, saved)
    ckpt = os.path.join(run, "checkpoints", str(saved))
    assert sorted(f for f in os.listdir(os.path.join(ckpt, "data")) if f.endswith(".json")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]  # one data state per process (Grain's handler)
    states = [json.load(open(os.path.join(ckpt, "data", f"process_{i}-of-2.json"))) for i in range(2)]
    assert [sorted(s["streams"]) for s in states] == [["0"], ["1"]]  # each host saved its own stream
    assert states[0]["streams"]["0"] != states[1]["streams"]["1"]

    # The same command again resumes; the losses equal the uninterrupted run's, bitwise.
    outs = _finish(_start(run, _free_port()))
    assert all(f"resuming from step {saved}" in out for out in outs), outs
    assert losses(run) == two
    assert _steps_logged(run) == list(range(1, STEPS + 1))
