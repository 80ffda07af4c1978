"""Per-device memory of a training step, planned ahead of time on fake CPU devices.

    python -m tools.aot_memory --config=stage2_skip:paper --num_devices=256

Builds the recipe's model, optimizer and one micro-batch step from abstract shapes only
(nothing is allocated), shards them over a mesh of N fake CPU devices as the config says,
lowers and compiles the step and prints XLA's memory analysis per device: arguments
(parameters, optimizer state, batch), temporaries, outputs, and their total. The last line
is a one-line summary. Use it to size a pod (or a GPU cluster) before having one.

The micro-batch is `--rows_per_device` rows per device of the batch axes (default: the
recipe's micro-batch divided by the batch shards, at least 1); gradient accumulation
repeats it without extra memory.
"""
import os
import sys


def _set_devices_from_argv():
    """XLA's device count must be fixed before jax is imported."""
    n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--num_devices=")), "8")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n} " + os.environ.get("XLA_FLAGS", "")
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _set_devices_from_argv()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe (name[:scale] or path).", lock_config=True)
flags.DEFINE_integer("num_devices", 8, "Fake CPU devices to plan for.")
flags.DEFINE_integer("rows_per_device", 0, "Rows per device per micro-batch (0: from the recipe).")


def plan(config, num_devices: int, rows_per_device: int = 0) -> dict:
    import math

    import jax
    import jax.numpy as jnp

    from genieblue_jax import sharding as sharding_lib, structure
    from genieblue_jax.train import trainer
    mcfg = trainer.model_config(config, image_token_id=0)
    mesh = sharding_lib.make_mesh(dict(config.mesh), jax.devices()[:num_devices])
    params = trainer.abstract_params(mcfg, mesh)
    trainable, frozen = structure.partition(params, config.train.stage)
    tx = trainer.build_optimizer(config, mcfg, trainable)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(tx.init, trainable), trainer.opt_state_shardings(tx, trainable, mesh))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = {"trainable": trainable, "opt_state": opt_state, "step": scalar, "bad_steps": scalar}
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_rows = config.train.global_batch_size // config.train.micro_batches
    rows = (rows_per_device or max(1, math.ceil(micro_rows / shards))) * shards
    L, P, S = config.data.seq_len, config.data.max_patches_per_row, mcfg.vision.image_size
    bs = trainer.batch_sharding(mesh)
    spec = {"tokens": ((rows, L), jnp.int32), "positions": ((rows, L), jnp.int32),
            "segment_ids": ((rows, L), jnp.int32), "loss_mask": ((rows, L), jnp.bool_),
            "source_ids": ((rows, L), jnp.int32), "images": ((rows, P, S, S, 3), jnp.float32)}
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=bs) for k, (shape, dtype) in spec.items()}
    step = trainer.make_train_step(mcfg, tx, num_sources=4, micro_batches=1, loss_chunk=config.train.loss_chunk,
                                   mesh=mesh)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(step, in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, frozen), bs),
                     out_shardings=(state_sh, None), donate_argnums=(0,))
    compiled = jitted.lower(state, frozen, batch).compile()
    mem = compiled.memory_analysis()
    gb = 1e9
    out = {"devices": num_devices, "mesh": dict(mesh.shape), "rows": rows, "seq_len": L,
           "arguments_gb": mem.argument_size_in_bytes / gb, "temporaries_gb": mem.temp_size_in_bytes / gb,
           "outputs_gb": mem.output_size_in_bytes / gb, "aliased_gb": mem.alias_size_in_bytes / gb}
    out["total_gb"] = out["arguments_gb"] + out["temporaries_gb"] + out["outputs_gb"] - out["aliased_gb"]
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import time
    t = time.perf_counter()
    r = plan(_CONFIG.value, flags.FLAGS.num_devices, flags.FLAGS.rows_per_device)
    name = os.path.basename(flags.FLAGS["config"].config_filename).removesuffix(".py")
    print(f"{name} ({_CONFIG.value.scale}) on {r['devices']} devices, mesh {r['mesh']}, micro-batch {r['rows']} rows "
          f"x {r['seq_len']} tokens (compiled in {time.perf_counter() - t:.0f} s). Per device:")
    print(f"  arguments   {r['arguments_gb']:8.2f} GB  (parameters, optimizer state, batch)")
    print(f"  temporaries {r['temporaries_gb']:8.2f} GB")
    print(f"  outputs     {r['outputs_gb']:8.2f} GB  (aliased with donated arguments: {r['aliased_gb']:.2f} GB)")
    print(f"{name}:{_CONFIG.value.scale} devices={r['devices']} per-device total={r['total_gb']:.2f} GB "
          f"(args {r['arguments_gb']:.2f} + temp {r['temporaries_gb']:.2f} + out {r['outputs_gb']:.2f} "
          f"- aliased {r['aliased_gb']:.2f})")


if __name__ == "__main__":
    from experiments.configs import expand_config_arg
    sys.argv = expand_config_arg(sys.argv)
    app.run(main)
