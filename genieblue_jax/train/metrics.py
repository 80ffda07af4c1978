"""Training metrics: JSONL + TensorBoard event files in the workdir, a console progress bar.

FLOPs per trained-sequence token (`flops_per_token`), the usual 2N forward / 4N backward
accounting, split by what trains:

    trainable weights      6 N   (forward 2N, activation gradient 2N, weight gradient 2N)
    frozen weights         4 N   (forward 2N, activation gradient 2N; no weight gradient)

N counts the LLM weights a token passes through in the multimodal path: for GenieBlue
the non-replaced base blocks (frozen) plus the branch (trainable); embeddings and the
tied head count once. The vision tower is per image patch, not per token, and is left
out, as is attention's own (sequence-length dependent) cost: the MFU printed is an
estimate for comparing runs and variants, not a profile.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from genieblue_jax import models, structure


def flops_per_token(mcfg: structure.MLLMConfig, stage: str) -> float:
    abstract = structure.abstract_mllm(mcfg)
    llm = models.flatten(abstract["llm"])
    branch = models.flatten(abstract["branch"])
    replaced = set(branch) & set(llm)             # replicated blocks swap these base leaves out
    base_used = models.count_params([v for n, v in llm.items() if n not in replaced])
    branch_n = models.count_params(list(branch.values()))
    if stage in ("full", "pretrain"):
        return 6.0 * base_used
    if stage == "stage1":
        return 4.0 * (base_used + branch_n)
    return 4.0 * base_used + 6.0 * branch_n


class MetricsWriter:
    """Writes on the primary process only (`jax.process_index() == 0`); others just compute."""

    def __init__(self, workdir: str, sources, *, flops_per_token: float, peak_flops: float):
        import jax
        self.primary = jax.process_index() == 0
        self.sources = tuple(sources)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.skipped = 0
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.primary else None
        self._tb = None
        if self.primary:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = None

    def start(self, step: int, total: int, desc: str = "train") -> None:
        if not self.primary:
            return
        from tqdm import tqdm
        self._bar = tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True)
        self._t_start, self._step_start = time.perf_counter(), step

    def row(self, step: int, m: dict, *, lr: float, step_time: float, data_stats: dict) -> dict:
        """The metrics row of one step (on every process); advances the progress bar. Nothing is
        written: `write(row)` does, for the steps the trainer logs (`train.log_every`)."""
        tokens = int(m["trained_tokens"])
        seq_tokens = data_stats["tokens"] / max(data_stats["batches"], 1)
        row = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": lr,
               "step_time_s": step_time, "tokens_per_s": seq_tokens / step_time, "trained_tokens": tokens,
               "mfu": seq_tokens * self.flops_per_token / step_time / self.peak_flops,
               "skipped_steps": self.skipped, "rejected_samples": sum(data_stats["rejected"].values())}
        nll, cnt = np.asarray(m["source_nll"]), np.asarray(m["source_tokens"])
        for i, name in enumerate(self.sources):
            if cnt[i] > 0:
                row[f"loss/{name}"] = float(nll[i] / cnt[i])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        return row

    def write(self, row: dict) -> None:
        """Appends `row` to metrics.jsonl and TensorBoard (primary process only)."""
        if not self.primary:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
