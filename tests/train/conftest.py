"""Tiny, fast versions of the real recipes (tiny presets, short rows, a few steps)."""
import atexit
import json
import os
import shutil
import tempfile

from experiments.configs import stage2_skip, typed
from experiments.demo_data import with_demo_sources

_DATA_ROOT = []


def with_demo_data(c):
    """`c` reading the demo datasets of `c.data.demo_examples` examples, as `experiments.run`
    gives a demo-scale run without data.sources; written once per test process, not per run."""
    if not _DATA_ROOT:
        _DATA_ROOT.append(tempfile.mkdtemp(prefix="genieblue_tests_demo_data_"))
        atexit.register(shutil.rmtree, _DATA_ROOT[0], True)
    return with_demo_sources(c, os.path.join(_DATA_ROOT[0], f"examples_{c.data.demo_examples}"))


def tiny_config(**overrides):
    """The typed stage2_skip demo recipe (`RunConfig`) at test size, `overrides` ({"train.steps": 3,
    ...}) applied to the recipe before it is typed, reading the demo data."""
    c = stage2_skip.get_config("demo")
    c.model.llm, c.model.vit = "tiny-qwen2", "tiny-siglip"
    c.data.seq_len, c.data.max_tiles_per_row, c.data.demo_examples = 96, 4, 200
    c.train.steps, c.train.global_batch_size, c.checkpoint.every_steps = 3, 8, 1000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.train.log_every = 1  # a metrics.jsonl row per step: the tests compare runs step by step
    c.init.from_scratch = "llm,vision,projector"  # tiny random models (a test's init.* checkpoint still wins)
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return with_demo_data(typed(c))


def rows(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return [row["loss"] for row in rows(workdir)]
