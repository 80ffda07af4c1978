"""Runs a training recipe: `python -m experiments.run --config=stage2_skip [--workdir=DIR]`.

    python -m experiments.run --config=stage2_skip                  # demo scale, CPU, minutes
    python -m experiments.run --config=stage2_skip:paper --workdir=gs://... \\
        --config.init.llm_checkpoint=/ckpt/qwen2.5-3b --config.init.vit_checkpoint=/ckpt/siglip \\
        --config.init.stage1_workdir=/runs/stage1 --config.data.tokenizer=/ckpt/qwen2.5-3b/hf_assets

At demo scale (the default) the run is the embedded demo (experiments/demo.py): the demo
data, a base LLM pretrained on its text tasks and the stage-1 projector are made or taken
from the cache (demo.cache_dir; default: `demo` beside the workdir), the recipe trains around
them, and the result is evaluated on held-out questions; `--config.demo.enabled=false` trains the recipe alone.

`--config` takes a recipe name from experiments/configs/ (or a path to a config file),
optionally followed by `:demo` / `:paper`. Any field can be overridden with
`--config.a.b=value`. The recipe becomes the typed run config here, first
(`genieblue_jax.run_config.RunConfig`): an unknown key, a wrong type or a value out of range is
a one-line error naming the key, before any data, model or compile work. Running the same
command again resumes from the latest checkpoint in the workdir.
"""
import os
import sys

if not __package__:  # run as `python experiments/NAME.py`: the repository root, not experiments/, goes first
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from experiments.configs import expand_config_arg, parse_flags, typed


def define_flags():
    """The flags, defined only when run as a program: importing this module (tests, other
    tools) defines none, so tools never collide over a flag name in one process."""
    config_flags.DEFINE_config_file("config", None, "Recipe (name[:scale] or path).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, config). Default: workdirs/<recipe>.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with what JAX detects (Cloud TPU pods, "
                      "SLURM, Open MPI); implied by --coordinator_address.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters JAX does not detect "
                        "(GPU clusters without SLURM, localhost runs); with --num_processes and --process_id.")
    flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1 (with "
                         "--coordinator_address).")


def initialize_distributed(jax, f) -> None:
    """jax.distributed.initialize for `--distributed` / `--coordinator_address`; CPU processes
    talk through gloo (XLA:CPU has no other cross-process collectives)."""
    explicit = (f.coordinator_address, f.num_processes, f.process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    if not (f.distributed or f.coordinator_address):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f.coordinator_address, num_processes=f.num_processes, process_id=f.process_id)


def main(argv):
    """absl's entry point, after the flags are parsed: types and validates `--config` (a bad key or
    value exits with a one-line "config error"), then runs the embedded demo (`demo.enabled`) or
    trains the recipe alone in `--workdir` (default workdirs/RECIPE[_SCALE]), resuming what is
    there. `argv` holds the program name only; anything more is a UsageError."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    from genieblue_jax.run_config import ConfigError  # imports no JAX backend work: checks only
    try:
        config = typed(flags.FLAGS.config)
        if not config.demo.enabled:  # (the demo makes its own base LLM, vision tower, stage 1 and data)
            config.required_checkpoints()
            config.check_data_sources()
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if config.demo.enabled:  # before JAX starts its CPU backend: the README's demo figures
        from experiments import demo
        demo.pin_cpu_numerics()
    from genieblue_jax.cli import cpu_only_without_accelerators
    cpu_only_without_accelerators()  # no libtpu start-up errors on a machine without a TPU
    import jax
    initialize_distributed(jax, flags.FLAGS)
    from genieblue_jax.train import trainer
    name = os.path.basename(flags.FLAGS["config"].config_filename or "run").removesuffix(".py")
    default = os.path.join("workdirs", name + ("" if config.scale == "demo" else f"_{config.scale}"))
    workdir = flags.FLAGS.workdir or default
    print(f"recipe {name} ({config.scale} scale), workdir {workdir}", flush=True)
    try:
        if config.demo.enabled:  # demo scale: data, base LLM, stage 1 (cached), the recipe, evaluation
            try:
                demo.run(config, workdir, name)
            except demo.Preempted as e:
                print(e, flush=True)
            return
        from experiments.demo_data import with_demo_sources
        try:
            config = with_demo_sources(config, workdir)  # demo scale without data: the demo datasets
        except ValueError as e:
            raise trainer.ConfigError(str(e)) from None
        result = trainer.train(config, workdir)
    except trainer.ConfigError as e:
        sys.exit(f"config error: {e}")
    except trainer.WorkdirInUseError as e:
        sys.exit(str(e))
    print(f"done: step {result['step']}, loss {result.get('loss', float('nan')):.4f}; workdir {workdir}")


if __name__ == "__main__":
    define_flags()
    sys.argv = expand_config_arg(sys.argv)
    app.run(main, flags_parser=parse_flags)
