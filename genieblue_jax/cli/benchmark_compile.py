"""Compile time of the multimodal forward at any scale, from abstract shapes only.

    python -m tools.benchmark_compile --llm=qwen2.5-3b --vit=siglip-so400m-384 \\
        --variant=genieblue --placement=skip --seq_len=1024 --images=1

Nothing is allocated: parameters and inputs are ShapeDtypeStructs, the forward is lowered
(`jax.jit(...).lower`) and compiled (`.compile()`). Prints both times and XLA's memory
plan for the compiled executable (arguments, outputs, temporaries).
"""
import time

from absl import app, flags

FLAGS = flags.FLAGS
def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    flags.DEFINE_string("llm", "qwen2.5-3b", "LLM preset.")
    flags.DEFINE_string("vit", "siglip-so400m-384", "Vision tower preset.")
    flags.DEFINE_enum("variant", "genieblue", ["genieblue", "cogvlm", "lora", "full"], "Structure variant.")
    flags.DEFINE_enum("placement", "skip", ["skip", "pre", "post"], "Placement of replicated blocks / experts.")
    flags.DEFINE_enum("mode", "multimodal", ["text", "multimodal"], "Which path to compile.")
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
    flags.DEFINE_integer("batch", 1, "Rows.")
    flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
    flags.DEFINE_integer("images", 1, "Image tile slots per row (0 for none).")


def measure(llm, vit, variant, placement, mode, dtype, batch, seq_len, images) -> dict:
    """Lowers and compiles `structure.forward` of the `llm` + `vit` presets' MLLM (GenieBlue
    `variant` / `placement`, `mode`, parameters in `dtype`) on abstract inputs of `batch` x `seq_len`
    tokens and `images` tile slots per row; returns the seconds of each and XLA's memory plan (GB)."""
    import jax
    import jax.numpy as jnp

    from genieblue_jax import structure
    mcfg = structure.MLLMConfig.from_presets(llm, vit, structure.StructureConfig(variant, placement))
    mcfg = mcfg.replace(llm=mcfg.llm.replace(dtype=dtype), vision=mcfg.vision.replace(dtype=dtype),
                        projector=mcfg.projector.replace(dtype=dtype))
    params = structure.abstract_mllm(mcfg)
    ints = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    size = mcfg.vision.image_size
    pixels = (jax.ShapeDtypeStruct((batch, images, size, size, 3), jnp.uint8)  # as the pipeline delivers them
              if images and mode != "text" else None)
    fn = jax.jit(structure.forward, static_argnums=0, static_argnames="mode")
    t0 = time.perf_counter()
    lowered = fn.lower(mcfg, params, ints, ints, ints, pixels, mode=mode)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1,
            "argument_gb": getattr(mem, "argument_size_in_bytes", 0) / 1e9,
            "temp_gb": getattr(mem, "temp_size_in_bytes", 0) / 1e9,
            "output_gb": getattr(mem, "output_size_in_bytes", 0) / 1e9}


def main(argv):
    """Measures the flags' configuration and prints the lower / compile seconds and the memory plan."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax
    r = measure(FLAGS.llm, FLAGS.vit, FLAGS.variant, FLAGS.placement, FLAGS.mode, FLAGS.dtype,
                FLAGS.batch, FLAGS.seq_len, FLAGS.images)
    print(f"{FLAGS.llm} + {FLAGS.vit}, {FLAGS.variant}-{FLAGS.placement}, mode={FLAGS.mode}, "
          f"{FLAGS.dtype}, batch {FLAGS.batch} x {FLAGS.seq_len} tokens, {FLAGS.images} image(s), "
          f"backend {jax.default_backend()}")
    print(f"  lower   {r['lower_s']:.1f} s")
    print(f"  compile {r['compile_s']:.1f} s")
    print(f"  memory plan: arguments {r['argument_gb']:.2f} GB, temporaries {r['temp_gb']:.2f} GB, "
          f"outputs {r['output_gb']:.2f} GB")


if __name__ == "__main__":
    define_flags()
    app.run(main)
