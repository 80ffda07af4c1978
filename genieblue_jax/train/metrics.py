"""Training metrics: JSONL + TensorBoard event files in the workdir; on the console a progress
bar where stderr is a terminal, else one plain line per logged step on every host (pod
workers, CI, `nohup`: logs where a rewritten bar line would repeat at every step).

FLOPs of one training step (`step_flops`), counted as the step computes them, by the usual
2 FLOPs per multiply-add and one pass each for the forward, the activation gradients and
the weight gradients:

    trainable weights      6 N per token (forward, activation gradient, weight gradient)
    frozen weights         4 N per token (forward, activation gradient: a trainable part
                           lies below every LLM layer); a frozen vision tower 2 N (forward)
    LLM attention scores   4 H d per query-key pair per layer (QK^T and AV) over the key
                           prefixes computed (`attention_chunk` skips the causal future and,
                           on sliding-window layers, the keys before each block's window),
                           x 3, or x 4 when chunked (each block is recomputed, jax.checkpoint)
    vision tower           per real tile: its patch embedding and the layers up to
                           `select_layer` (N per patch) plus their attention, then the
                           projector per LLM token of the tile

N counts weight matrices only (biases and norms are not matmuls); the embedding lookup is
no matmul (a tied embedding counts once, as the LM head). Padding rows, padding tokens and
padding tile slots cost compute but are not useful work, so MFU counts the step's real
tiles (`tiles`); the test compares the count with XLA's own `cost_analysis()` of the step.
"""
from __future__ import annotations

import json
import logging
import sys
import time

import jax
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


def _matmul_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if len(x.shape) >= 2)


def step_flops(mcfg: structure.MLLMConfig, stage: str, *, rows: int, seq_len: int,
               attention_chunk: int = 0) -> tuple[float, float]:
    """(FLOPs of one training step of `stage` on `rows` packed rows of `seq_len` tokens, all
    micro-batches together, without its images; FLOPs per real image tile in it), by the
    module docstring's count: a step holding k real tiles costs base + k * per_tile."""
    abstract = structure.abstract_mllm(mcfg)
    train = structure.trainable_names(abstract, stage)
    flat = models.flatten(abstract)

    def weights(component: str, keep=lambda name: True) -> tuple[int, int]:  # (trainable, frozen) matmul params
        names = [n for n in flat if n.startswith(component + "/") and keep(n[len(component) + 1:])]
        return (_matmul_params([flat[n] for n in names if n in train]),
                _matmul_params([flat[n] for n in names if n not in train]))

    llm = mcfg.llm
    replaced = set(models.flatten(abstract["branch"])) & set(models.flatten(abstract["llm"]))
    lookup_only = set() if llm.tie_embeddings else {"embed_tokens/embedding"}
    llm_t, llm_f = weights("llm", lambda n: n not in replaced and n not in lookup_only)
    br_t, br_f = weights("branch")
    base = rows * seq_len * (6.0 * (llm_t + br_t) + 4.0 * (llm_f + br_f))
    chunk = attention_chunk if 0 < attention_chunk < seq_len else seq_len

    def pairs(window):  # query-key pairs computed: chunked blocks skip the future and keys before the window
        starts = range(0, seq_len, chunk)
        first_key = (lambda lo: 0) if window is None or chunk == seq_len else (lambda lo: max(0, lo - window + 1))
        return sum((min(lo + chunk, seq_len) - lo) * (min(lo + chunk, seq_len) - first_key(lo)) for lo in starts)

    layer_pairs = sum(pairs(llm.window(i)) for i in range(llm.num_layers))
    base += (4 if chunk < seq_len else 3) * 4.0 * llm.num_heads * llm.head_dim * layer_pairs * rows
    v = mcfg.vision
    run = v.num_layers if v.select_layer == -1 else v.select_layer % (v.num_layers + 1)
    per_patch = 3 * v.patch_size ** 2 * v.hidden_size + run * (4 * v.hidden_size ** 2
                                                               + 2 * v.hidden_size * v.intermediate_size)
    vision = 2.0 * v.num_patches * per_patch + run * 4.0 * v.num_patches ** 2 * v.hidden_size
    vision_trained = any(n.startswith("vision/") for n in train)
    proj_t, proj_f = weights("projector")  # frozen: activation gradients only if the tower trains
    projector = 2.0 * mcfg.tokens_per_tile * (3 * proj_t + (2 if vision_trained else 1) * proj_f)
    return base, (3 if vision_trained else 1) * vision + projector


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

    def __init__(self, workdir: str, sources, *, step_flops: tuple[float, float], peak_flops: float,
                 start_step: int = 0):
        """`start_step`: the step training (re)starts from. Rows of later steps, logged by a run
        killed before it checkpointed them, are dropped from metrics.jsonl (and a line cut by the
        kill), and TensorBoard hides their events (tensorboardX `purge_step`): the steps the
        resumed run repeats appear once."""
        import jax
        self.primary = jax.process_index() == 0
        self.sources = tuple(sources)
        self.step_flops = step_flops  # (FLOPs of a step without images, FLOPs per real tile)
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
        self._bar, self._plain = None, False

    def start(self, step: int, total: int, desc: str = "train") -> None:
        """Opens the console progress at `step` of `total`: a tqdm bar on the primary process
        where stderr is a terminal; otherwise `write` prints a plain line on every process."""
        self._desc, self._total = desc, total
        self._t_start, self._step_start = time.perf_counter(), step
        self._plain = not sys.stderr.isatty()
        if self.primary and not self._plain:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True)

    def row(self, step: int, m: dict, *, lr: float, step_time: float, data_stats: dict) -> dict:
        """The metrics row of one step (on every process); advances the progress bar. Nothing is
        written: `write(row)` does, for the steps the trainer logs (`train.log_every`).

        `m`: the step's metrics; m["seq_tokens"] is the non-padding tokens of the whole global
        batch (all processes' rows), for tokens/s; m["tiles"] its real image tiles, for the
        step's FLOPs (`step_flops`) and MFU against `peak_flops` (all devices).
        `data_stats`: this host's pipeline statistics (rejections)."""
        tokens, seq_tokens = int(m["trained_tokens"]), int(m["seq_tokens"])
        row = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": lr,
               "step_time_s": step_time, "seq_tokens": seq_tokens, "tokens_per_s": seq_tokens / step_time,
               "trained_tokens": tokens,
               "mfu": (self.step_flops[0] + self.step_flops[1] * int(m["tiles"])) / step_time / self.peak_flops,
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
        """Appends `row` to metrics.jsonl and TensorBoard (primary process only); without a
        terminal, prints `plain_line(row)` (every process)."""
        if self._plain:
            print(self.plain_line(row), flush=True)
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

    def plain_line(self, row: dict) -> str:
        """One console line for a logged row, tagged with this host's process index, e.g.

            [process 1/2] stage2 genieblue-skip step 40/150 loss 1.2346 tokens/s 2546 ETA 01:23
        """
        from tqdm import tqdm
        done = row["step"] - self._step_start
        left = (time.perf_counter() - self._t_start) / done * (self._total - row["step"]) if done > 0 else 0.0
        return (f"[process {jax.process_index()}/{jax.process_count()}] {self._desc} step {row['step']}/{self._total}"
                f" loss {row['loss']:.4f} tokens/s {row['tokens_per_s']:.0f} ETA {tqdm.format_interval(left)}")

    def close(self) -> None:
        """Closes the progress bar, metrics.jsonl and TensorBoard (everything written is flushed)."""
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
