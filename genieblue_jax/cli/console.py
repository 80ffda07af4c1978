"""The installed console scripts (setup.cfg `[options.entry_points]`): `genieblue-NAME` runs
exactly what `python -m MODULE` runs, the module executed as `__main__` (`runpy`), so the
flags, `--help` (absl prints `__main__`'s docstring and its flags), exit status and output
are those of the module form.

    genieblue-to-torch --checkpoint workdirs/stage2_skip --out /export/mllm
    # = python -m tools.to_torch --checkpoint workdirs/stage2_skip --out /export/mllm   (the repository root)
    # = python tools/to_torch.py --checkpoint workdirs/stage2_skip --out /export/mllm   (anywhere)

`COMMANDS` maps each script to its module, the one table of commands: the library's commands
are `genieblue_jax.cli.NAME`, each with a thin script `tools/NAME.py` in the repository
(`TOOLS_SCRIPT`); tests/test_cli.py runs `--help` in all three forms.
"""
import runpy

COMMANDS = {
    "genieblue-train": "experiments.run",
    "genieblue-reproduce": "experiments.reproduce",
    "genieblue-convert": "data_pipelines.convert",
    "genieblue-aot-memory": "genieblue_jax.cli.aot_memory",
    "genieblue-benchmark-compile": "genieblue_jax.cli.benchmark_compile",
    "genieblue-benchmark-convert": "genieblue_jax.cli.benchmark_convert",
    "genieblue-benchmark-data": "genieblue_jax.cli.benchmark_data",
    "genieblue-benchmark-generate": "genieblue_jax.cli.benchmark_generate",
    "genieblue-benchmark-torch-reference": "genieblue_jax.cli.benchmark_torch_reference",
    "genieblue-benchmark-train": "genieblue_jax.cli.benchmark_train",
    "genieblue-chat": "genieblue_jax.cli.chat",
    "genieblue-evaluate": "genieblue_jax.cli.evaluate",
    "genieblue-export-qnn": "genieblue_jax.cli.export_qnn",
    "genieblue-fault-drill": "genieblue_jax.cli.fault_drill",
    "genieblue-from-hf": "genieblue_jax.cli.from_hf",
    "genieblue-param-report": "genieblue_jax.cli.param_report",
    "genieblue-serve": "genieblue_jax.cli.serve",
    "genieblue-to-torch": "genieblue_jax.cli.to_torch",
}
# The repository's `python -m tools.NAME` / `python tools/NAME.py` form of a library command.
TOOLS_SCRIPT = {module: f"tools.{module.rsplit('.', 1)[1]}"
                for module in COMMANDS.values() if module.startswith("genieblue_jax.cli.")}


def run_command(module: str) -> None:
    """Runs `module` as `python -m module` would: as `__main__`, with `sys.argv[0]` its file
    (`runpy`, `alter_sys`), so absl's `--help` shows its docstring and flags."""
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _entry(module: str):
    def entry():
        run_command(module)
    entry.__doc__ = f"`python -m {module}`"
    return entry


# One entry point per script, named after it (genieblue-to-torch -> to_torch): the names setup.cfg lists.
globals().update({script.removeprefix("genieblue-").replace("-", "_"): _entry(module)
                  for script, module in COMMANDS.items()})
