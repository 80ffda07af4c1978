"""Per-device memory of the trainer's step, planned ahead of time by the compiler of the
target: a real TPU topology (libtpu, the `tpu` extra) or fake CPU devices.

    python -m tools.aot_memory --config=stage2_skip:paper --topology=v5p:4x4x8     # 128 v5p chips
    python -m tools.aot_memory --config=stage2_skip:paper --num_devices=256       # XLA:CPU fallback

Compiles exactly the step `train()` runs, built from abstract shapes (nothing is allocated):
the same function (`trainer.make_train_step`), the recipe's mesh over the target's devices,
parameter / optimizer / batch shardings, and the whole global batch of the step as the data
pipeline delivers it (`trainer.batch_plan`: rows per device x batch shards x micro-steps;
int32 tokens, float32 image tiles), with the gradient accumulation inside. Prints XLA's
memory analysis per device: arguments (parameters, optimizer state, batch), temporaries,
outputs, total, and the chip's HBM; the last line is the verdict, `fits` or `does not fit by
N GB` (exit status 1). Use it to size a pod before having one; the TPU compiler's plan is the
one to trust (XLA:CPU schedules and fuses differently: its plan is a rough upper bound).

`--topology` takes `jax.experimental.topologies` names: v5e:2x2, v5e:16x16, v5p:4x4x4,
v5p:4x4x8, v6e:8x8, v6e:16x16, ... HBM per chip comes from the device kind (TPU_HBM_GB);
on fake CPU devices give `--hbm_gb` for a verdict.
"""
import os
import sys


def _set_devices_from_argv():
    """XLA's CPU device count must be fixed before jax is imported."""
    n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--num_devices=")), "8")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n} " + os.environ.get("XLA_FLAGS", "")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU target comes from libtpu's topology, not a backend


if __name__ == "__main__":
    _set_devices_from_argv()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    config_flags.DEFINE_config_file("config", None, "Recipe (name[:scale] or path).", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5p:4x4x8 (needs libtpu: pip install "
                        "-e .[tpu]); default: fake CPU devices.")
    flags.DEFINE_integer("num_devices", 8, "Fake CPU devices to plan for; with --topology, plan for the first "
                         "N chips of the topology (e.g. 1 chip of v5e:2x2).")
    flags.DEFINE_float("hbm_gb", 0.0, "Memory per device for the verdict on fake CPU devices (GB).")

# HBM per chip (GB, 1e9 bytes; Cloud TPU data sheets), by the start of `device_kind`
# ("TPU v5 lite" is v5e, "TPU v5" v5p, "TPU v6 lite" v6e). Longest prefix first.
TPU_HBM_GB = {"TPU v6 lite": 32 * 2**30 / 1e9, "TPU v5 lite": 16 * 2**30 / 1e9, "TPU v5p": 95 * 2**30 / 1e9,
              "TPU v5": 95 * 2**30 / 1e9, "TPU v4": 32 * 2**30 / 1e9}


def target_devices(topology: str | None, num_devices: int, first: int = 0):
    """The devices to compile for: a TPU topology's (no TPU needed; the first `first` of them
    when > 0) or the first `num_devices` CPU devices."""
    import jax
    if not topology:
        devices = jax.devices()
        if len(devices) < num_devices:
            raise ValueError(f"{num_devices} devices asked, {len(devices)} CPU devices exist (set --num_devices "
                             f"before jax starts: python -m tools.aot_memory --num_devices=N)")
        return devices[:num_devices]
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"--topology={topology}: the TPU compiler (libtpu) is not installed: pip install -e .[tpu]")
    from jax.experimental import topologies
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # a name libtpu does not know
        raise ValueError(f"--topology={topology}: cannot build the TPU topology ({type(e).__name__}: "
                         f"{str(e)[:300]})") from None
    return devices[:first] if first > 0 else devices


def hbm_gb(device_kind: str, configured: float = 0.0) -> float | None:
    """Memory per device (GB) for the verdict: `configured` when > 0, else the TPU chip's HBM by its
    `device_kind` (TPU_HBM_GB); None when unknown (fake CPU devices without --hbm_gb)."""
    if configured > 0:
        return configured
    from genieblue_jax.train.metrics import by_device_kind
    return by_device_kind(TPU_HBM_GB, device_kind)


def plan(config, devices, hbm: float = 0.0) -> dict:
    """Compiles the trainer's step of `config` (a `RunConfig`) for `devices`; returns the
    per-device memory plan (GB), the batch plan and the compiled step ("compiled"). Raises
    trainer.ConfigError when the batch does not fit the mesh."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from data_pipelines.pipeline import PAPER_STAGE2_MIXTURE
    from genieblue_jax import sharding as sharding_lib
    from genieblue_jax import structure
    from genieblue_jax import workdir as workdir_lib
    from genieblue_jax.train import trainer
    mcfg = workdir_lib.model_config(config, image_token_id=0)
    try:
        mesh = sharding_lib.make_mesh(dataclasses.asdict(config.mesh), list(devices))
    except ValueError as e:
        raise trainer.ConfigError(f"mesh: {e}") from None
    batch = trainer.batch_plan(config, mesh)
    params = workdir_lib.abstract_params(mcfg, mesh)
    trainable, frozen = structure.partition(params, config.train.stage)
    trainable, frozen = trainer.to_step_layout(mcfg, (trainable, frozen))  # the layout the trainer's step reads
    tx = trainer.build_optimizer(config, mcfg, trainable)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(tx.init, trainable), trainer.opt_state_shardings(tx, trainable, mesh))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = {"trainable": trainable, "opt_state": opt_state, "step": scalar, "bad_steps": scalar}
    rows, L = batch["global_rows"], config.data.seq_len
    P, S = config.data.max_tiles_per_row, mcfg.vision.image_size
    bs = trainer.batch_sharding(mesh)
    spec = {"tokens": ((rows, L), jnp.int32), "positions": ((rows, L), jnp.int32),
            "segment_ids": ((rows, L), jnp.int32), "loss_mask": ((rows, L), jnp.bool_),
            "source_ids": ((rows, L), jnp.int32), "images": ((rows, P, S, S, 3), jnp.uint8)}
    batch_shapes = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=bs) for k, (shape, dtype) in spec.items()}
    kind = devices[0].device_kind
    gb = 1e9
    out = {"devices": len(devices), "device_kind": kind, "platform": devices[0].platform, "mesh": dict(mesh.shape),
           "batch": batch, "seq_len": L, "hbm_gb": hbm_gb(kind, hbm), "compiled": None}
    # Parameters, optimizer state and batch are known from their shardings without compiling:
    # when they alone exceed the device, say so before a compile that can take minutes.
    resident = _bytes_per_device((state, frozen, batch_shapes)) / gb
    if out["hbm_gb"] is not None and resident > out["hbm_gb"]:
        return {**out, "arguments_gb": resident, "temporaries_gb": float("nan"), "outputs_gb": float("nan"),
                "aliased_gb": float("nan"), "total_gb": resident}
    num_sources = (len(workdir_lib.parse_sources(config.data.sources)) if config.data.sources
                   else len(PAPER_STAGE2_MIXTURE))
    step = trainer.make_train_step(mcfg, tx, num_sources, config.train.micro_batches, config.train.loss_chunk, mesh)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(step, in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, frozen), bs),
                     out_shardings=(state_sh, None), donate_argnums=(0,))
    compiled = jitted.lower(state, frozen, batch_shapes).compile()
    mem = compiled.memory_analysis()
    out["attention"] = attention_kernel(compiled.as_text())
    out.update(arguments_gb=mem.argument_size_in_bytes / gb, temporaries_gb=mem.temp_size_in_bytes / gb,
               outputs_gb=mem.output_size_in_bytes / gb, aliased_gb=mem.alias_size_in_bytes / gb, compiled=compiled)
    out["total_gb"] = out["arguments_gb"] + out["temporaries_gb"] + out["outputs_gb"] - out["aliased_gb"]
    return out


def attention_kernel(hlo: str) -> str:
    """Which attention the compiled step runs (`models.attention`), read from its HLO."""
    if "tpu_custom_call" in hlo and "splash" in hlo:
        return "splash (Pallas TPU kernel)"
    if "__cudnn$fmha" in hlo:
        return "cuDNN fused attention"
    return "XLA ops"


def _bytes_per_device(tree) -> int:
    """Bytes of the largest per-device share of a tree of sharded ShapeDtypeStructs."""
    import jax
    import numpy as np
    return int(sum(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def verdict(r: dict) -> tuple[bool | None, str]:
    """(fits, the verdict line) of a `plan` result: True / False against `hbm_gb`, None when the
    memory per device is unknown."""
    if r["hbm_gb"] is None:
        return None, "no verdict (memory per device unknown: pass --hbm_gb)"
    spare = r["hbm_gb"] - r["total_gb"]
    if spare >= 0:
        return True, f"fits ({spare:.2f} GB of {r['hbm_gb']:.2f} GB spare per device)"
    return False, f"does not fit by {-spare:.2f} GB ({r['total_gb']:.2f} GB needed, {r['hbm_gb']:.2f} GB per device)"


def main(argv):
    """Plans --config's step on the target, prints the plan and the verdict; exit status 1 when it
    does not fit, an `error:` line for a bad recipe or topology."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import time

    from experiments import configs
    from genieblue_jax.train import trainer
    f = flags.FLAGS
    t = time.perf_counter()
    try:
        devices = target_devices(f.topology, f.num_devices, f.num_devices if f["num_devices"].present else 0)
        r = plan(configs.typed(f.config), devices, f.hbm_gb)
    except (ValueError, trainer.ConfigError) as e:
        sys.exit(f"error: {e}")
    name = os.path.basename(f["config"].config_filename).split(":")[0].removesuffix(".py")
    b = r["batch"]
    target = (f"{r['devices']} chip(s) of {f.topology}" if f.topology and f["num_devices"].present
              else f.topology or f"{r['devices']} fake CPU devices")
    print(f"{name} ({f.config.scale}) on {target}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']} "
          f"(compiled in {time.perf_counter() - t:.0f} s)")
    print(f"  batch       {b['rows_per_device']} rows/device x {b['batch_shards']} batch shards x "
          f"{b['micro_batches']} micro-steps = {b['global_rows']} rows x {r['seq_len']} tokens "
          f"({b['tokens_per_step'] / 1e6:.2f}M tokens) per step")
    if r["compiled"] is not None:
        print(f"  attention   {r['attention']}")
    print("Per device:")
    print(f"  arguments   {r['arguments_gb']:8.2f} GB  (parameters, optimizer state, batch)")
    if r["compiled"] is None:
        print("  (parameters, optimizer state and batch alone exceed the device: not compiled)")
    print(f"  temporaries {r['temporaries_gb']:8.2f} GB")
    print(f"  outputs     {r['outputs_gb']:8.2f} GB  (aliased with donated arguments: {r['aliased_gb']:.2f} GB)")
    print(f"  total       {r['total_gb']:8.2f} GB" + (f"  of {r['hbm_gb']:.2f} GB" if r["hbm_gb"] else ""))
    ok, text = verdict(r)
    print(f"{name}:{f.config.scale} on {target}: {text}")
    if ok is False:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    from experiments.configs import expand_config_arg, parse_flags
    sys.argv = expand_config_arg(sys.argv)
    app.run(main, flags_parser=parse_flags)
