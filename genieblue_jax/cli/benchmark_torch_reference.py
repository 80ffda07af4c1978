"""PyTorch reference for the stage-2 training step: what our JAX trainer is compared against.

    python -m tools.benchmark_torch_reference --variant=stage2_skip   # one variant, this process
    python -m tools.benchmark_torch_reference --all                   # one fresh process per variant

Builds the demo-scale MLLM plainly in PyTorch (eager, float32, no torch.compile) with
`transformers` + `peft`, and times a full training step: forward, loss, backward, AdamW
step, zero_grad. The default configs are hard-coded here and mirror the `demo-qwen2` and
`demo-siglip` presets of genieblue_jax/models/configs.py (and the VILA projector between
them); this file deliberately imports no jax, so the reference is not influenced by it
(keep the numbers in sync by hand if the presets change). Other shapes come as Hugging
Face config dicts (`--llm_config` / `--vision_config` JSON; `tools.benchmark_train --llm=...`
passes those of its presets, made by `export.hf_writer`): any `model_type` transformers'
`AutoModelForCausalLM` builds (qwen2, llama), and a `SiglipVisionModel` (its pooling head
off, as the JAX tower does not run it for the projector's features).

Model (random init, seeded):
- LLM `Qwen2ForCausalLM`: vocab 512, hidden 256, MLP 704, 8 layers, 4 heads / 2 KV heads
  of 64, rope theta 1e6, tied embeddings, q/k/v biases (Qwen2), SDPA attention.
- Vision `SiglipVisionModel`: 56 px, patch 8 (7 x 7 = 49 tokens), hidden 128, 4 layers,
  4 heads, MLP 256, no head; its `last_hidden_state` feeds the projector.
- Projector (VILA mlp_downsample): pad 7 x 7 -> 8 x 8, concatenate each 2 x 2 group
  (`DownSampleBlock.flat_square`) -> 16 tokens x 512 -> LayerNorm -> Linear(512, 256)
  -> GELU (erf) -> Linear(256, 256).

Variants (`--variant`):
- `stage2_skip` (GenieBlue-Skip): the LLM is frozen; layers 0 and 4 (every 4th from 0)
  run as trainable copies in the multimodal forward; LoRA (r 8, alpha 16, dropout 0, on
  q/k/v/o/gate/up/down) on the other 6 frozen layers. The multimodal model is a deep copy
  of the base in which only the replicated layers are new tensors: every other base
  tensor is shared (referenced, never copied, as in the JAX structure), so memory holds
  base + 2 block copies + LoRA. The base model object itself is untouched and unused.
- `lora`: LoRA on all 8 layers, LLM frozen.
- `full_ft`: everything trainable.
The vision tower and the projector train in every variant.

Batch: `batch_size` rows of `seq_len` random text ids in [0, 500); each row holds
`tiles_per_row * 16` image tokens (id 511) at a fixed offset, filled with the projected
features of its `tiles_per_row` 56 px images (random in [-1, 1]). The loss is next-token
cross entropy averaged over the targets that are not image tokens. AdamW (lr 1e-4, betas
(0.9, 0.98), eps 1e-6, weight decay 0.05) over the trainable parameters only.

Reports mean / median step time after `--warmup` steps, tokens/s (batch_size * seq_len /
step time), trainable and total parameters (unique tensors), and the peak RSS of the
process (`ru_maxrss`); `--all` runs each variant in its own process so that the RSS
figures are per variant.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from absl import app, flags
from torch import nn

from genieblue_jax.export.torch_modules import VilaProjector, place_image_features
from genieblue_jax.models.configs import ProjectorConfig

FLAGS = flags.FLAGS

VARIANTS = ("stage2_skip", "lora", "full_ft")

# `demo-qwen2` (genieblue_jax/models/configs.py): Qwen2 has q/k/v biases, no o_proj bias.
LLM_CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=4096)
# `demo-siglip`: 56 px / tile 8 -> 7 x 7 grid (odd, like so400m's 27 x 27: the downsampler pads).
VISION_CONFIG = dict(image_size=56, patch_size=8, hidden_size=128, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=256, layer_norm_eps=1e-6,
                     vision_use_head=False)
ATTN_IMPLEMENTATION = "sdpa"

INTERVAL = 4  # GenieBlue-Skip: layers 0, 4, ... are replicated
LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TEXT_VOCAB = 500        # random text ids are drawn from [0, TEXT_VOCAB)
IMAGE_TOKEN_ID = 511
IMAGE_OFFSET = 16       # first image token of every row

ADAMW = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)


def define_flags():
    """Flags are defined only when run as a script, so importing this module (the test
    does) never collides with the flags of another tool in the same process."""
    flags.DEFINE_enum("variant", "stage2_skip", list(VARIANTS), "Which trainable set to benchmark.")
    flags.DEFINE_bool("all", False, "Benchmark every variant, each in a fresh subprocess, and print a table.")
    flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
    flags.DEFINE_integer("seq_len", 512, "Tokens per row.")
    flags.DEFINE_integer("tiles_per_row", 8, "Image tiles per row (56 px, 16 image tokens each by default).")
    flags.DEFINE_integer("real_tiles", -1, "Tiles per row the model sees (eager: no padding slots); -1: "
                         "tiles_per_row.")
    flags.DEFINE_string("llm_config", "", "HF config dict of the LLM as JSON (default: demo-qwen2's).")
    flags.DEFINE_string("vision_config", "", "HF config dict of the SigLIP tower as JSON (default: demo-siglip's).")
    flags.DEFINE_integer("steps", 10, "Timed training steps.")
    flags.DEFINE_integer("warmup", 2, "Untimed training steps first.")
    flags.DEFINE_integer("threads", os.cpu_count(), "torch.set_num_threads.")
    flags.DEFINE_integer("seed", 0, "Seed of the model init and the batch.")


# ----------------------------------------------------------------------------- model


class ReferenceMLLM(nn.Module):
    """Vision -> projector -> image-token slots of the LLM input embeddings -> LLM -> loss."""

    def __init__(self, llm: transformers.Qwen2ForCausalLM, vision: transformers.SiglipVisionModel,
                 projector: VilaProjector):
        super().__init__()
        self.llm, self.vision, self.projector = llm, vision, projector

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64, images (B * P, 3, S, S) in row order -> scalar mean loss."""
        features = self.projector(self.vision(pixel_values=images).last_hidden_state)
        embeds = self.llm.get_input_embeddings()(tokens)
        is_image = tokens == IMAGE_TOKEN_ID
        embeds = place_image_features(embeds, is_image, features)  # row b: the features of its images in order
        logits = self.llm(inputs_embeds=embeds, use_cache=False).logits
        # Target t is predicted from position t - 1; image tokens are never targets.
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                                 reduction="none")
        mask = (~is_image[:, 1:]).flatten().to(losses.dtype)
        return (losses * mask).sum() / mask.sum()


@dataclasses.dataclass
class Reference:
    """A built PyTorch reference: the model the step trains, the frozen base and the layers
    stage2_skip runs as trainable copies."""
    variant: str
    model: ReferenceMLLM                     # what the training step runs
    base: transformers.Qwen2ForCausalLM      # the frozen base (stage2_skip: a separate, unused object)
    replicated_layers: tuple[int, ...]       # stage2_skip: layers run as trainable copies

    def trainable(self) -> dict[str, torch.Tensor]:
        """The parameters the optimizer updates, by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def frozen(self) -> dict[str, torch.Tensor]:
        """Every parameter that must stay bitwise unchanged (including the unused base)."""
        out = {f"base.{n}": p for n, p in self.base.named_parameters() if not p.requires_grad}
        out.update({n: p for n, p in self.model.named_parameters() if not p.requires_grad})
        return out

    def num_trainable(self) -> int:
        """How many scalars the optimizer updates."""
        return sum(p.numel() for p in self.trainable().values())

    def num_total(self) -> int:
        """Unique tensors: shared base tensors and the tied embedding count once."""
        unique = {id(p): p for m in (self.model, self.base) for p in m.parameters()}
        return sum(p.numel() for p in unique.values())


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def _add_lora(llm: transformers.Qwen2ForCausalLM, layers: list[int]) -> None:
    import peft
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                             target_modules=list(LORA_TARGETS), layers_to_transform=layers,
                             layers_pattern="layers")
    peft.inject_adapter_in_model(config, llm)  # in place; freezes every non-LoRA parameter


def tokens_per_tile(vision_config: dict) -> int:
    """LLM tokens per tile: the patch grid after the 2 x 2 downsampler (odd grids padded)."""
    return math.ceil(vision_config["image_size"] // vision_config["patch_size"] / 2) ** 2


def _hf_configs(llm_config: dict, vision_config: dict):
    llm = {k: v for k, v in llm_config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    llm_cfg = transformers.AutoConfig.for_model(llm.pop("model_type", "qwen2"), **llm)
    vision = {k: v for k, v in vision_config.items() if k not in ("architectures", "torch_dtype", "dtype",
                                                                    "model_type")}
    return llm_cfg, transformers.SiglipVisionConfig(**{**vision, "vision_use_head": False},
                                                    attn_implementation=ATTN_IMPLEMENTATION)


def build_model(variant: str, seed: int = 0, llm_config: dict = LLM_CONFIG,
                vision_config: dict = VISION_CONFIG) -> Reference:
    """The `variant` (full_ft, lora, stage2_skip) reference MLLM from Hugging Face config dicts, its
    trainable parameter count checked against the variant's rule. Raises ValueError for an unknown
    variant, AssertionError when the counts or dtypes are not the variant's."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    torch.manual_seed(seed)
    llm_cfg, vision_cfg = _hf_configs(llm_config, vision_config)
    base = transformers.AutoModelForCausalLM.from_config(llm_cfg, attn_implementation=ATTN_IMPLEMENTATION,
                                                         torch_dtype=torch.float32)
    vision = transformers.SiglipVisionModel(vision_cfg)
    projector = VilaProjector(ProjectorConfig(vision_hidden_size=vision_cfg.hidden_size,
                                              llm_hidden_size=llm_cfg.hidden_size))
    n_layers = llm_cfg.num_hidden_layers
    replicated: tuple[int, ...] = ()
    if variant == "stage2_skip":
        replicated = tuple(range(0, n_layers, INTERVAL))
        base.requires_grad_(False)
        # Deep copy that shares every base tensor except those of the replicated layers.
        shared = {id(p): p for n, p in base.named_parameters() if _layer_index(n) not in replicated}
        llm = copy.deepcopy(base, memo=shared)
        _add_lora(llm, [i for i in range(n_layers) if i not in replicated])
        for i in replicated:
            llm.model.layers[i].requires_grad_(True)
    elif variant == "lora":
        base.requires_grad_(False)
        llm = base
        _add_lora(llm, list(range(n_layers)))
    else:
        llm = base
        llm.requires_grad_(True)
    model = ReferenceMLLM(llm, vision, projector).train()
    model.vision.requires_grad_(True)
    model.projector.requires_grad_(True)
    ref = Reference(variant, model, base, replicated)
    _check_counts(ref)
    return ref


def _check_counts(ref: Reference) -> None:
    """Trainable LLM parameters = replicated blocks + LoRA elsewhere (or all / LoRA only)."""
    llm = ref.model.llm
    block = sum(p.numel() for p in ref.base.model.layers[0].parameters())
    lora = {i: 0 for i in range(len(ref.base.model.layers))}
    for n, p in llm.named_parameters():
        if "lora_" in n:
            lora[_layer_index(n)] += p.numel()
    llm_trainable = sum(p.numel() for p in llm.parameters() if p.requires_grad)
    if ref.variant == "full_ft":
        expected = sum(p.numel() for p in llm.parameters())
    else:
        expected = len(ref.replicated_layers) * block + sum(lora.values())
        lora_layers = [i for i, n in lora.items() if n]
        if sorted(lora_layers + list(ref.replicated_layers)) != list(range(len(lora))):
            raise AssertionError(f"LoRA on layers {lora_layers}, replicated {ref.replicated_layers}")
    if llm_trainable != expected:
        raise AssertionError(f"{ref.variant}: {llm_trainable} trainable LLM parameters, expected {expected}")
    for p in ref.model.parameters():
        if p.dtype != torch.float32:
            raise AssertionError(f"parameter of dtype {p.dtype}; the reference is float32")


def make_optimizer(ref: Reference) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with the engine benchmark's settings (ADAMW)."""
    return torch.optim.AdamW(list(ref.trainable().values()), **ADAMW)


def make_batch(batch_size: int, seq_len: int, tiles_per_row: int, seed: int = 0,
               vision_config: dict = VISION_CONFIG):
    """(tokens (batch_size, seq_len) int64, images (batch_size * tiles_per_row, 3, size, size) in
    [-1, 1)): random text ids with `tiles_per_row` tiles' image tokens at IMAGE_OFFSET. Raises
    ValueError when the image tokens do not fit in `seq_len`."""
    n_image = tiles_per_row * tokens_per_tile(vision_config)
    if IMAGE_OFFSET + n_image > seq_len:
        raise ValueError(f"{tiles_per_row} tiles ({n_image} tokens at offset {IMAGE_OFFSET}) do not "
                         f"fit in seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TEXT_VOCAB, (batch_size, seq_len), generator=gen)
    tokens[:, IMAGE_OFFSET:IMAGE_OFFSET + n_image] = IMAGE_TOKEN_ID
    size = vision_config["image_size"]
    images = torch.rand((batch_size * tiles_per_row, 3, size, size), generator=gen) * 2 - 1
    return tokens, images


def train_step(ref: Reference, optimizer: torch.optim.Optimizer, tokens, images) -> float:
    """One optimizer step on (tokens, images); returns the loss."""
    loss = ref.model(tokens, images)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ----------------------------------------------------------------------------- benchmark


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, of this process) so far; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def benchmark_one() -> dict:
    """The flags' variant: warm-up and timed steps; returns the step times, throughput, parameter
    counts, peak RSS, losses and the CPU contention during the timed steps. Raises RuntimeError on a
    non-finite loss."""
    import peft
    torch.set_num_threads(FLAGS.threads)
    llm_config = json.loads(FLAGS.llm_config) if FLAGS.llm_config else LLM_CONFIG
    vision_config = json.loads(FLAGS.vision_config) if FLAGS.vision_config else VISION_CONFIG
    ref = build_model(FLAGS.variant, FLAGS.seed, llm_config, vision_config)
    optimizer = make_optimizer(ref)
    tiles = FLAGS.tiles_per_row if FLAGS.real_tiles < 0 else FLAGS.real_tiles
    tokens, images = make_batch(FLAGS.batch_size, FLAGS.seq_len, tiles, FLAGS.seed, vision_config)
    losses, times = [], []
    for i in range(FLAGS.warmup + FLAGS.steps):
        if i == FLAGS.warmup:
            cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        t0 = time.perf_counter()
        losses.append(train_step(ref, optimizer, tokens, images))
        if i >= FLAGS.warmup:
            times.append(time.perf_counter() - t0)
    cpu1, wall = _cpu_seconds(), time.perf_counter() - wall0
    # CPU cores busy with other processes during the timed steps: the contention the
    # figures carry (0 on a quiet machine; ~1 on 2 cores halves what 2 threads can do).
    other_cores = None if cpu0 is None else max(0.0, ((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / wall)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    mean, median = statistics.mean(times), statistics.median(times)
    return dict(variant=FLAGS.variant, step_s=mean, median_s=median, min_s=min(times),
                tokens_per_s=FLAGS.batch_size * FLAGS.seq_len / mean,
                trainable=ref.num_trainable(), total=ref.num_total(), peak_rss_mb=peak_rss_mb(),
                first_loss=losses[0], last_loss=losses[-1],
                attn=dict(llm=ref.model.llm.config._attn_implementation,
                          vision=ref.model.vision.config._attn_implementation),
                threads=torch.get_num_threads(), other_cores=other_cores,
                batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                tiles_per_row=FLAGS.tiles_per_row, tokens_per_tile=tokens_per_tile(vision_config),
                steps=FLAGS.steps, warmup=FLAGS.warmup,
                versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                              peft=peft.__version__))


def summary_line(r: dict) -> str:
    """One line of a `benchmark_one` result."""
    return (f"torch reference {r['variant']}: step {r['step_s']:.3f} s (median {r['median_s']:.3f}), "
            f"{r['tokens_per_s']:.0f} tokens/s, trainable {r['trainable'] / 1e6:.2f}M / total "
            f"{r['total'] / 1e6:.2f}M params, peak RSS {r['peak_rss_mb']:.0f} MB")


def print_header(r: dict) -> None:
    """Prints the versions, threads, attention implementations and shapes of a result."""
    print(f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, peft "
          f"{r['versions']['peft']}; {r['threads']} threads; float32 eager; attention: LLM "
          f"{r['attn']['llm']}, vision {r['attn']['vision']}")
    print(f"batch {r['batch_size']} x {r['seq_len']} tokens, {r['tiles_per_row']} tiles/row "
          f"({r['tiles_per_row'] * r['tokens_per_tile']} image tokens/row); {r['steps']} timed steps "
          f"after {r['warmup']} warm-up")


RESULT_PREFIX = "RESULT_JSON "


def run_all() -> None:
    """--all: every variant in a fresh process (the flags forwarded), one summary line each, then
    the table. Raises RuntimeError naming a variant that failed."""
    forwarded = [f"--{name}={FLAGS[name].value}" for name in
                 ("batch_size", "seq_len", "tiles_per_row", "real_tiles", "steps", "warmup", "threads", "seed",
                  "llm_config", "vision_config")]
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "genieblue_jax.cli.benchmark_torch_reference", f"--variant={variant}", *forwarded]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise RuntimeError(f"variant {variant} failed (exit {proc.returncode})")
        line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX))
        results.append(json.loads(line[len(RESULT_PREFIX):]))
        print(summary_line(results[-1]), flush=True)
    print()
    print_header(results[0])
    print("'other CPUs': CPUs kept busy by other processes during the timed steps (> 0.1 skews the figures)")
    print(f"{'variant':<12} {'step s':>8} {'median s':>9} {'min s':>7} {'tokens/s':>9} {'trainable':>11} "
          f"{'total':>11} {'peak RSS MB':>12} {'other CPUs':>10} {'loss first->last':>17}")
    for r in results:
        load = "n/a" if r["other_cores"] is None else f"{r['other_cores']:.2f}"
        print(f"{r['variant']:<12} {r['step_s']:>8.3f} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
              f"{r['tokens_per_s']:>9.0f} {r['trainable']:>11,} {r['total']:>11,} "
              f"{r['peak_rss_mb']:>12.0f} {load:>10} {r['first_loss']:>8.4f}->{r['last_loss']:.4f}")


def main(argv):
    """--all, or the flags' variant in this process (its result also as a RESULT_JSON line)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.all:
        run_all()
        return
    result = benchmark_one()
    print_header(result)
    if result["other_cores"] is not None:
        print(f"other processes kept {result['other_cores']:.2f} of {os.cpu_count()} CPUs busy during the "
              f"timed steps{' (the figures are skewed)' if result['other_cores'] > 0.1 else ''}")
    print(f"loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}")
    print(summary_line(result))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
