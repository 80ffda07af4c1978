"""Throughput of the stage-2 input pipeline vs what a demo training step consumes.

    python -m tools.benchmark_data [--seq_len=1024 --batch_size=8 --batches=40]

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
flags.DEFINE_string("data_dir", None, "Demo data directory (written if missing).")
flags.DEFINE_integer("seq_len", 1024, "Row length for the throughput runs.")
flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
flags.DEFINE_integer("batches", 40, "Timed batches per run (after 3 warm-up batches).")
flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to measure.")
flags.DEFINE_integer("max_tiles_per_row", 48, "Image tile slots per row in the throughput runs.")


def pipeline_config(demo, seq_len, batch_size, workers, max_tiles_per_row):
    from data_pipelines.pipeline import PipelineConfig, mixture
    from experiments.demo_data import MIXTURE
    return PipelineConfig(sources=mixture(demo["datasets"]["train"], MIXTURE), tokenizer=demo["tokenizer"],
                          seq_len=seq_len, batch_size=batch_size, tile_size=56, tokens_per_tile=16,
                          image_mode="dynamic", max_tiles=4, max_tiles_per_row=max_tiles_per_row,
                          num_workers=workers)


def time_pipeline(cfg, batches):
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


def main(argv):
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
    # Grain waits up to 25 s per multiprocess iterator on close; the figures are printed.
    for child in multiprocessing.active_children():
        child.kill()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    app.run(main)
