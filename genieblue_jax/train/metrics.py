"""Training metrics: JSONL + TensorBoard event files in the workdir, a console progress bar.

FLOPs per trained-sequence token (`flops_per_token`), the usual 2N forward / 4N backward
accounting, split by what trains:

    trainable weights      6 N   (forward 2N, activation gradient 2N, weight gradient 2N)
    frozen weights         4 N   (forward 2N, activation gradient 2N; no weight gradient)

N counts the LLM weights a token passes through in the multimodal path: for GenieBlue
the non-replaced base blocks (frozen) plus the branch (trainable); embeddings and the
tied head count once. The vision tower is per image tile, not per token, and is left
out, as is attention's own (sequence-length dependent) cost: the MFU printed is an
estimate for comparing runs and variants, not a profile.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np

from genieblue_jax import models, paths, structure

log = logging.getLogger(__name__)


# Dense bf16 peak FLOP/s per device (one chip; vendor data sheets), matched against the
# start of `jax.Device.device_kind` (e.g. "TPU v5 lite" is v5e, "TPU v5" v5p, "TPU v6 lite"
# v6e). Longest prefix first: "TPU v5 lite" before "TPU v5".
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v6 lite": 918e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v4": 275e12,
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
}
CPU_PEAK_FLOPS = 110e9  # measured: float32 matmul on the project's 2-core development CPU


def by_device_kind(table: dict, device_kind: str):
    """The value of the longest key of `table` that `device_kind` starts with, or None."""
    for prefix in sorted(table, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return table[prefix]
    return None


def peak_flops_per_device(device_kind: str, configured: float = 0.0) -> float:
    """Peak FLOP/s of one device for MFU: `configured` when > 0 (config train.peak_flops_per_device),
    else looked up from the device kind; a CPU gets CPU_PEAK_FLOPS (measured here, not a data sheet).

        >>> peak_flops_per_device("TPU v5 lite"), peak_flops_per_device("NVIDIA H100 80GB HBM3")
        (197000000000000.0, 989000000000000.0)

    Raises ValueError naming the device kind when it is unknown and nothing is configured."""
    if configured > 0:
        return float(configured)
    peak = by_device_kind(PEAK_FLOPS_BY_DEVICE_KIND, device_kind)
    if peak is not None:
        return peak
    if device_kind.lower() == "cpu":
        return CPU_PEAK_FLOPS
    raise ValueError(f"no peak FLOP/s known for device kind {device_kind!r}: set train.peak_flops_per_device")


def flops_per_token(mcfg: structure.MLLMConfig, stage: str) -> float:
    """Training FLOPs per trained-sequence token of the LLM path for `stage`, by the module
    docstring's accounting (6 N for trainable weights, 4 N for frozen ones; no vision tower, no
    attention scores). Used for the printed MFU."""
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


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line that is not a whole row."""
    try:
        return int(json.loads(line)["step"]) if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


class MetricsWriter:
    """Writes on the primary process only (`jax.process_index() == 0`); others just compute.

    A local workdir's metrics.jsonl is appended to; a gs:// one (objects cannot be appended
    to) is rewritten whole at every written row, which at paper scale (a row every 10 steps
    of seconds each) costs little. TensorBoard events go through tensorboardX, which writes
    gs:// itself (google-cloud-storage)."""

    def __init__(self, workdir: str, sources, *, flops_per_token: float, peak_flops: float, start_step: int = 0):
        """`start_step`: the step training (re)starts from. Rows of later steps, logged by a run
        killed before it checkpointed them, are dropped from metrics.jsonl (and a line cut by the
        kill), and TensorBoard hides their events (tensorboardX `purge_step`): the steps the
        resumed run repeats appear once."""
        import jax
        self.primary = jax.process_index() == 0
        self.sources = tuple(sources)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.skipped = 0
        self._jsonl = self._lines = self._tb = None
        self._path = paths.path(workdir) / "metrics.jsonl"
        if self.primary:
            lines = self._path.read_text().splitlines(keepends=True) if self._path.exists() else []
            kept = [line for line in lines if (s := _step_of(line)) is not None and s <= start_step]
            if len(kept) < len(lines):
                log.warning("%s: dropped %d row(s) after step %d, the step this run resumes from (logged "
                            "after the checkpoint it resumes from)", self._path, len(lines) - len(kept), start_step)
                self._path.write_text("".join(kept))
            if paths.is_remote(workdir):
                self._lines = kept
            else:
                self._jsonl = open(self._path, "a")
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(paths.join(workdir, "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None)
        self._bar = None

    def start(self, step: int, total: int, desc: str = "train") -> None:
        """Opens the progress bar at `step` of `total` (primary process only)."""
        if not self.primary:
            return
        from tqdm import tqdm
        self._bar = tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True)
        self._t_start, self._step_start = time.perf_counter(), step

    def row(self, step: int, m: dict, *, lr: float, step_time: float, data_stats: dict) -> dict:
        """The metrics row of one step (on every process); advances the progress bar. Nothing is
        written: `write(row)` does, for the steps the trainer logs (`train.log_every`).

        `m`: the step's metrics; m["seq_tokens"] is the non-padding tokens of the whole global
        batch (all processes' rows), for tokens/s and MFU against `peak_flops` (all devices).
        `data_stats`: this host's pipeline statistics (rejections)."""
        tokens, seq_tokens = int(m["trained_tokens"]), int(m["seq_tokens"])
        row = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": lr,
               "step_time_s": step_time, "seq_tokens": seq_tokens, "tokens_per_s": seq_tokens / step_time,
               "trained_tokens": tokens,
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
        if self._lines is not None:
            self._lines.append(json.dumps(row) + "\n")
            self._path.write_text("".join(self._lines))
        else:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        """Closes the progress bar, metrics.jsonl and TensorBoard (everything written is flushed)."""
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
