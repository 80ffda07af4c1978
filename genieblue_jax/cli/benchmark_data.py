"""Throughput of the stage-2 input pipeline vs what a training step consumes.

    python -m tools.benchmark_data [--seq_len=1024 --batch_size=8 --batches=40]
    python -m tools.benchmark_data --images=real

`--images=real`: photographs of ordinary sizes instead of the demo's 56 px scenes, through
the paper's stage-2 path: `--photos` JPEGs (quality 90) of random sizes from 640 x 480 to
2048 x 1536 with random smooth content, dynamic resolution at 384 px tiles (up to 16 + the
thumbnail, 196 tokens each after the downsampler, as SigLIP-so400m-384), seq_len 4096.
Reported: examples/s and rows/s per worker process. Then the CPU cores one TPU v5p host
(4 chips, 208 vCPUs) needs to feed its chips at 50% MFU: rows/s = 4 x 0.5 x peak / FLOPs
per 4096-token row of the paper's stage-2 step (`stage2_skip:paper`), with the FLOPs from
`train.metrics.step_flops` (a test holds it within 10% of XLA's `cost_analysis()` of the
unrolled demo step); cores = rows/s / (rows/s of one worker). The compiled paper step's own
`cost_analysis()` is no use here: XLA counts a loop body once, not once per iteration, and
that step is loops (scanned layers, micro-batches, vision tower calls; at qwen2.5-0.5b with
scanned layers XLA counts 5.5e11 FLOPs of the FLOP model's 2.76e12).

Default (`--images=demo`):

1. Writes the demo datasets (or reuses --data_dir), then runs the stage-2 pipeline
   (decode, dynamic resolution, chat template, tokenize, pack) with 0, 1 and 2 workers
   and reports examples/s and non-padding tokens/s after a warm-up.
2. Packing efficiency at seq_len 4096 on the demo mixture (tile slots not limiting).
3. Consumption: a jitted stage-2 gradient step (tiny GenieBlue-Skip MLLM, the demo
   scale) on the same batches, in tokens/s; the pipeline should deliver >= 3x that.
"""
import multiprocessing
import os
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    flags.DEFINE_string("data_dir", None, "Demo data directory (written if missing).")
    flags.DEFINE_integer("seq_len", 1024, "Row length for the throughput runs.")
    flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
    flags.DEFINE_integer("batches", 40, "Timed batches per run (after 3 warm-up batches).")
    flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to measure.")
    flags.DEFINE_integer("max_tiles_per_row", 48, "Image tile slots per row in the throughput runs.")
    flags.DEFINE_enum("images", "demo", ["demo", "real"], "The demo's scenes, or photographs at the paper's shapes.")
    flags.DEFINE_integer("photos", 200, "--images=real: JPEGs to make.")

V5P_HOST = {"chips": 4, "vcpus": 208}  # one v5p host (its chips' peak: train.metrics.PEAK_FLOPS_BY_DEVICE_KIND)


def pipeline_config(demo, seq_len, batch_size, workers, max_tiles_per_row):
    """The stage-2 pipeline over the demo datasets of `demo` (its tokenizer and train sources in the
    demo mixture): `seq_len` tokens per row, `batch_size` rows, `workers` processes."""
    from data_pipelines.pipeline import PipelineConfig, mixture
    from experiments.demo_data import MIXTURE
    return PipelineConfig(sources=mixture(demo["datasets"]["train"], MIXTURE), tokenizer=demo["tokenizer"],
                          seq_len=seq_len, batch_size=batch_size, tile_size=56, tokens_per_tile=16,
                          image_mode="dynamic", max_tiles=4, max_tiles_per_row=max_tiles_per_row,
                          num_workers=workers)


def time_pipeline(cfg, batches):
    """Times `batches` batches of the pipeline `cfg` after 3 warm-up batches: examples/s,
    tokens/s, packing efficiency, seconds, and the batches and iterator themselves."""
    from data_pipelines.pipeline import build_pipeline, packing_efficiency
    it = iter(build_pipeline(cfg, process_index=0, process_count=1))
    for _ in range(3):
        next(it)
    s0, t0 = dict(it.stats), time.perf_counter()
    kept = [next(it) for _ in range(batches)]
    dt = time.perf_counter() - t0
    samples = it.stats["samples"] - s0["samples"]
    tokens = it.stats["tokens"] - s0["tokens"]
    return {"examples_s": samples / dt, "tokens_s": tokens / dt, "efficiency": packing_efficiency(it.stats),
            "seconds": dt,
            "batches": kept, "iterator": it}


def train_step_tokens_per_s(batches):
    """Stage-2 loss + gradient of the tiny MLLM on real pipeline batches."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from data_pipelines.tokenizer import IMAGE_PAD, load_tokenizer
    from genieblue_jax import models, structure
    tok = load_tokenizer(FLAGS.data_dir and os.path.join(FLAGS.data_dir, "tokenizer.model"))
    llm, vit = models.get_preset("tiny-qwen2"), models.get_preset("tiny-siglip")
    mcfg = structure.MLLMConfig(llm, vit, models.ProjectorConfig.between(vit, llm), structure.StructureConfig(),
                                image_token_id=tok.token_id(IMAGE_PAD))
    trainable, frozen = structure.partition(structure.init_mllm(mcfg, jax.random.key(0)), "stage2")

    def loss(trainable, frozen, b):
        logits = structure.forward(mcfg, structure.combine(trainable, frozen), b["tokens"], b["positions"],
                                   b["segment_ids"], b["images"])
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, b["tokens"][:, 1:, None], axis=-1)[..., 0]
        mask = b["loss_mask"][:, 1:]
        return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1)

    step = jax.jit(jax.value_and_grad(loss))
    keys = ("tokens", "positions", "segment_ids", "images", "loss_mask")
    jax.block_until_ready(step(trainable, frozen, {k: batches[0][k] for k in keys}))
    t0 = time.perf_counter()
    for b in batches[1:]:
        jax.block_until_ready(step(trainable, frozen, {k: b[k] for k in keys}))
    dt = time.perf_counter() - t0
    return sum(int(np.sum(b["segment_ids"] > 0)) for b in batches[1:]) / dt


def write_photos(out_dir: str, n: int, seed: int = 0) -> str:
    """`n` JPEG photographs (random sizes, 640 x 480 .. 2048 x 1536, smooth random colour
    fields with noise) as one dataset of single-image questions; returns its directory."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from data_pipelines.records import IMAGE_TAG, Example, ShardedWriter
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    writer = ShardedWriter(out_dir, num_shards=2)
    for i in range(n):
        w, h = rng.randint(640, 2048), rng.randint(480, 1536)
        coarse = nrng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
        pixels = np.clip(pixels + nrng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        turns = [{"role": "user", "content": f"{IMAGE_TAG}\nWhat colour is the top left corner?"},
                 {"role": "assistant", "content": "red" if pixels[0, 0, 0] > 127 else "blue"}]
        writer.write(Example(f"photo-{i:04d}", "vqa", turns, [buf.getvalue()]))
    writer.close()
    return out_dir


def row_flops() -> tuple[float, str]:
    """FLOPs of one 4096-token row of the paper's stage-2 step, and where they come from."""
    from experiments import configs
    config = configs.load("stage2_skip", "paper")
    from genieblue_jax import workdir as workdir_lib
    from genieblue_jax.train import metrics as metrics_lib
    mcfg = workdir_lib.model_config(config, image_token_id=0)
    base, per_tile = metrics_lib.step_flops(mcfg, config.train.stage, rows=1, seq_len=config.data.seq_len,
                                            attention_chunk=config.model.attention_chunk)
    tiles = config.data.seq_len // mcfg.tokens_per_tile  # a row full of image tiles: the most work
    return base + per_tile * tiles, "FLOP model (train.metrics.step_flops), a row of image tiles"


def real_images(data_dir: str, tokenizer: str) -> None:
    """--images=real: the stage-2 pipeline on --photos JPEG photographs at paper-scale tiles, per
    worker count, and the share of a v5p host's vCPUs it needs to keep its chips fed."""
    from data_pipelines.pipeline import PipelineConfig, mixture
    photos = os.path.join(data_dir, f"photos{FLAGS.photos}")
    if not os.path.isdir(photos):
        t = time.perf_counter()
        write_photos(photos, FLAGS.photos)
        print(f"wrote {FLAGS.photos} JPEGs to {photos} in {time.perf_counter() - t:.1f} s")
    seq_len, tokens_per_tile = 4096, 196
    print(f"stage-2 pipeline on {FLAGS.photos} photographs: 384 px tiles (dynamic, up to 16 + thumbnail, "
          f"{tokens_per_tile} tokens each), seq_len {seq_len}, {os.cpu_count()} CPU cores")
    per_worker = {}
    for w in map(int, FLAGS.workers):
        cfg = PipelineConfig(sources=mixture({"vqa": photos}, {"vqa": 1}), tokenizer=tokenizer, seq_len=seq_len,
                             batch_size=1, tile_size=384, tokens_per_tile=tokens_per_tile, image_mode="dynamic",
                             max_tiles=16, max_tiles_per_row=seq_len // tokens_per_tile, num_workers=w)
        r = time_pipeline(cfg, FLAGS.batches)
        # Counted from the rows delivered (the stats count samples read into the packing window).
        rows_s = FLAGS.batches / r["seconds"]
        per_row = _examples_per_row(r)
        examples_s = rows_s * per_row
        per_worker[w] = (examples_s / max(w, 1), rows_s / max(w, 1))
        print(f"  workers={w}: {examples_s:7.2f} examples/s  {rows_s:6.2f} rows/s  "
              f"({per_row:.2f} examples per row; per worker process: "
              f"{per_worker[w][0]:.2f} examples/s, {per_worker[w][1]:.2f} rows/s)")
    from genieblue_jax.train.metrics import peak_flops_per_device
    peak = peak_flops_per_device("TPU v5p")
    flops, source = row_flops()
    need = V5P_HOST["chips"] * 0.5 * peak / flops
    one = max(v[1] for v in per_worker.values())
    cores = need / one
    print(f"one 4096-token row of stage2_skip:paper: {flops / 1e12:.1f} TFLOP ({source})")
    print(f"a v5p host (4 chips at 50% MFU, {peak / 1e12:.0f} TFLOP/s bf16 peak each) trains "
          f"{need:.2f} rows/s; one worker process packs {one:.2f} rows/s here, so it needs {cores:.1f} cores "
          f"= {100 * cores / V5P_HOST['vcpus']:.1f}% of its {V5P_HOST['vcpus']} vCPUs (target < 25%)")


def _examples_per_row(r) -> float:
    rows = sum(len(b["tokens"]) for b in r["batches"])
    return sum(len(set(row[row > 0].tolist())) for b in r["batches"] for row in b["segment_ids"]) / rows


def main(argv):
    """Writes the demo data (once per --data_dir), times the pipeline per worker count, prints the
    packing efficiency and the ratio to a train step's consumption; exits without Grain's waits."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from experiments.demo_data import write_demo_datasets
    if FLAGS.data_dir is None:
        FLAGS.data_dir = tempfile.mkdtemp(prefix="genieblue_demo_")
    if not os.path.isfile(os.path.join(FLAGS.data_dir, "tokenizer.model")):
        t = time.perf_counter()
        write_demo_datasets(FLAGS.data_dir, splits={"train": 4000, "eval": 200})
        print(f"wrote demo data to {FLAGS.data_dir} in {time.perf_counter() - t:.1f} s")
    demo = {"datasets": {"train": {s: os.path.join(FLAGS.data_dir, "train", s)
                                   for s in ("caption", "vqa", "ocr", "text")}},
            "tokenizer": os.path.join(FLAGS.data_dir, "tokenizer.model")}
    if FLAGS.images == "real":
        real_images(FLAGS.data_dir, demo["tokenizer"])
        _exit()
    print(f"stage-2 pipeline, seq_len {FLAGS.seq_len}, batch {FLAGS.batch_size}, {FLAGS.batches} batches, "
          f"{os.cpu_count()} CPU cores")
    results = {}
    for w in map(int, FLAGS.workers):
        r = time_pipeline(pipeline_config(demo, FLAGS.seq_len, FLAGS.batch_size, w, FLAGS.max_tiles_per_row),
                          FLAGS.batches)
        results[w] = r
        print(f"  workers={w}: {r['examples_s']:8.1f} examples/s  {r['tokens_s']:10.0f} tokens/s  "
              f"packing efficiency {r['efficiency']:.3f}")
    # A tile budget that cannot bind (every token an image token), so this measures packing.
    eff = time_pipeline(pipeline_config(demo, 4096, 2, 0, 4096 // 16), 10)["efficiency"]
    print(f"packing efficiency at seq_len 4096 (demo mixture, tile budget not binding): {eff:.3f}")
    consumed = train_step_tokens_per_s(results[min(results)]["batches"][:12])
    best = max(r["tokens_s"] for r in results.values())
    print(f"demo stage-2 train step consumes {consumed:10.0f} tokens/s (tiny GenieBlue-Skip MLLM, same batches)")
    print(f"pipeline / consumption: {best / consumed:.1f}x (best worker count); "
          + ", ".join(f"{w} workers {r['tokens_s'] / consumed:.1f}x" for w, r in results.items()))
    _exit()


def _exit():
    # Grain waits up to 25 s per multiprocess iterator on close; the figures are printed.
    for child in multiprocessing.active_children():
        child.kill()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    define_flags()
    app.run(main)
