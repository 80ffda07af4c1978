"""Generation speed: prefill tokens/s, decode tokens/s of text (base LLM) and multimodal
requests, and the per-token decode latency at short vs long context.

    python -m tools.benchmark_generate                        # demo-scale GenieBlue-Skip, random weights
    python -m tools.benchmark_generate --checkpoint workdirs/stage2_skip
    python -m tools.benchmark_generate --llm=qwen2.5-3b --vit=siglip-so400m-384 --dtype=bfloat16  # on a GPU

Each figure is the median of `--repeats` timed runs after a warm-up run (compilation is
excluded). Decode latency at context C: a prompt of C tokens is prefilled, then
`--decode_steps` single-token steps are timed; the ratio latency(1024) / latency(128)
shows how much the per-token cost grows with the cache (the target is <= 1.5). MFU is
reported against `--peak_flops`, by default this machine's measured float32 matmul peak
(`genieblue_jax.cli.benchmark_train.matmul_peak`, as the training benchmark does); FLOPs are counted as
2 x the weights a token passes through, plus attention over the cache.
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    flags.DEFINE_string("checkpoint", None, "A workdir / checkpoint (default: random demo-scale weights).")
    flags.DEFINE_string("llm", "demo-qwen2", "LLM preset (without --checkpoint).")
    flags.DEFINE_string("vit", "demo-siglip", "Vision tower preset (without --checkpoint).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute / parameter dtype (random weights).")
    flags.DEFINE_list("contexts", ["128", "1024"], "Prompt lengths for the decode-latency comparison.")
    flags.DEFINE_list("batches", ["1", "8"], "Batch sizes for the decode throughput.")
    flags.DEFINE_integer("prompt_len", 256, "Prompt tokens for the throughput runs.")
    flags.DEFINE_integer("decode_steps", 64, "Decode steps timed per run.")
    flags.DEFINE_integer("repeats", 3, "Timed runs per figure (median).")
    flags.DEFINE_float("peak_flops", 0, "Peak FLOP/s of the device, for MFU; 0: measured here (float32 matmul).")
    flags.DEFINE_string("json_out", None, "Also write the figures as JSON here.")


def _model():
    import jax

    from genieblue_jax import structure
    if FLAGS.checkpoint:
        import genieblue_jax
        model = genieblue_jax.load(FLAGS.checkpoint)
        if not model.is_mllm:
            raise app.UsageError(f"--checkpoint={FLAGS.checkpoint} is not a multimodal model")
        return model.mcfg, model.params
    mcfg = structure.MLLMConfig.from_presets(FLAGS.llm, FLAGS.vit, structure.StructureConfig())
    d = FLAGS.dtype
    mcfg = mcfg.replace(llm=mcfg.llm.replace(dtype=d, param_dtype=d),
                        vision=mcfg.vision.replace(dtype=d, param_dtype=d),
                        projector=mcfg.projector.replace(dtype=d, param_dtype=d))
    params = structure.init_mllm(mcfg, jax.random.key(0))
    # LoRA B starts at zero; make it non-zero so the multimodal path does its real work.
    params["branch"] = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
                                    params["branch"])
    return mcfg, params


def _decode_flops(mcfg, context: int) -> float:
    """FLOPs of one decoded token: 2 x LLM weights on the multimodal path + attention."""
    from genieblue_jax import models
    n = models.count_params(models.abstract_params(mcfg.llm))
    llm = mcfg.llm
    attention = 2 * 2 * llm.num_layers * llm.num_heads * llm.head_dim * context
    return 2.0 * n + attention


def main(argv):
    """Builds or loads the model, measures prefill and decode at the flags' shapes, prints the table."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from genieblue_jax import inference
    from genieblue_jax.cli.benchmark_train import matmul_peak
    peak = FLAGS.peak_flops or matmul_peak()
    print(f"peak: {peak / 1e9:.0f} GFLOP/s ({'--peak_flops' if FLAGS.peak_flops else 'measured'})", flush=True)
    mcfg, params = _model()
    rng = np.random.default_rng(0)
    vocab = mcfg.llm.vocab_size
    size = mcfg.vision.image_size
    tpp = mcfg.tokens_per_tile
    sampling = inference.Sampling.make()
    key = jax.random.key(0)
    results = {"model": f"{mcfg.llm.num_layers}-layer {mcfg.llm.hidden_size}-hidden LLM "
                        f"({mcfg.structure.name}), {FLAGS.dtype}", "device": str(jax.devices()[0].platform)}

    def prompts(batch, length, with_image):
        out = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
        out[out == mcfg.image_token_id] = 0
        if with_image:
            out[:, 4:4 + tpp] = mcfg.image_token_id
        return out

    def prefill_and_decode(batch, length, with_image, steps):
        mode = "multimodal" if with_image else "text"
        toks, pos, seg = inference.pad_prompts(prompts(batch, length, with_image))
        images = (jnp.asarray(rng.integers(0, 256, (batch, 1, size, size, 3), np.uint8)) if with_image else None)
        cache_len = toks.shape[1] + inference.bucket_length(steps)
        timings = {}

        def run():
            t0 = time.perf_counter()
            cache, state, logits = inference.prefill(mcfg, params, toks, pos, seg, images, sampling, key, mode=mode,
                                                     cache_len=cache_len)
            jax.block_until_ready(logits)
            t1 = time.perf_counter()
            for _ in range(steps):
                cache, state, logits = inference.decode_step(mcfg, params, cache, state, sampling, mode=mode)
            jax.block_until_ready(state.tokens)
            timings["prefill"], timings["decode"] = t1 - t0, time.perf_counter() - t1

        samples = []
        run()
        for _ in range(FLAGS.repeats):
            run()
            samples.append(dict(timings))
        return {k: statistics.median(s[k] for s in samples) for k in ("prefill", "decode")}

    # Prefill throughput (batch 1).
    t = prefill_and_decode(1, FLAGS.prompt_len, False, 1)
    results["prefill_tokens_per_s"] = FLAGS.prompt_len / t["prefill"]
    t_img = prefill_and_decode(1, FLAGS.prompt_len, True, 1)
    results["prefill_tokens_per_s_with_image"] = FLAGS.prompt_len / t_img["prefill"]
    # Decode throughput, text (base LLM) vs multimodal requests.
    for b in map(int, FLAGS.batches):
        for kind, with_image in (("text", False), ("multimodal", True)):
            t = prefill_and_decode(b, FLAGS.prompt_len, with_image, FLAGS.decode_steps)
            results[f"decode_tokens_per_s_{kind}_batch{b}"] = b * FLAGS.decode_steps / t["decode"]
    # Per-token decode latency vs context.
    for c in map(int, FLAGS.contexts):
        t = prefill_and_decode(1, c, False, FLAGS.decode_steps)
        ms = 1000 * t["decode"] / FLAGS.decode_steps
        results[f"decode_ms_per_token_context{c}"] = ms
        results[f"decode_mfu_context{c}"] = _decode_flops(mcfg, c) / (ms / 1000) / peak
    c0, c1 = map(int, (FLAGS.contexts[0], FLAGS.contexts[-1]))
    results[f"latency_ratio_{c1}_vs_{c0}"] = (results[f"decode_ms_per_token_context{c1}"]
                                              / results[f"decode_ms_per_token_context{c0}"])
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
