"""Tiny, fast versions of the real recipes (tiny presets, short rows, a few steps)."""
import json

from experiments.configs import stage2_skip


def tiny_config(**overrides):
    c = stage2_skip.get_config("demo")
    c.model.llm, c.model.vit = "tiny-qwen2", "tiny-siglip"
    c.data.seq_len, c.data.max_patches_per_row, c.data.demo_examples = 96, 4, 200
    c.train.steps, c.train.global_batch_size, c.checkpoint.every_steps = 3, 8, 1000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.train.log_every = 1  # a metrics.jsonl row per step: the tests compare runs step by step
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


def rows(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return [row["loss"] for row in rows(workdir)]
