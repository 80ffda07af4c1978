"""The installed console scripts (setup.cfg `[options.entry_points]`): `genieblue-NAME` runs
exactly what `python -m MODULE` runs, the module executed as `__main__` (`runpy`), so the
flags, `--help` (absl prints `__main__`'s docstring and its flags), exit status and output
are those of the module form.

    genieblue-to-torch --checkpoint workdirs/stage2_skip --out /export/mllm
    # = python -m tools.to_torch --checkpoint workdirs/stage2_skip --out /export/mllm
    # = python tools/to_torch.py --checkpoint workdirs/stage2_skip --out /export/mllm

`COMMANDS` maps each script to its module; tests/test_cli.py runs `--help` in all three forms.
"""
import runpy

COMMANDS = {
    "genieblue-train": "experiments.run",
    "genieblue-reproduce": "experiments.reproduce",
    "genieblue-convert": "data_pipelines.convert",
    "genieblue-aot-memory": "tools.aot_memory",
    "genieblue-benchmark-compile": "tools.benchmark_compile",
    "genieblue-benchmark-convert": "tools.benchmark_convert",
    "genieblue-benchmark-data": "tools.benchmark_data",
    "genieblue-benchmark-generate": "tools.benchmark_generate",
    "genieblue-benchmark-torch-reference": "tools.benchmark_torch_reference",
    "genieblue-benchmark-train": "tools.benchmark_train",
    "genieblue-chat": "tools.chat",
    "genieblue-evaluate": "tools.evaluate",
    "genieblue-export-qnn": "tools.export_qnn",
    "genieblue-fault-drill": "tools.fault_drill",
    "genieblue-from-hf": "tools.from_hf",
    "genieblue-param-report": "tools.param_report",
    "genieblue-serve": "tools.serve",
    "genieblue-to-torch": "tools.to_torch",
}


def _command(module: str):
    def run():
        # alter_sys: sys.argv[0] becomes the module's file and the module is `__main__`, as under -m.
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    run.__doc__ = f"`python -m {module}`"
    return run


# One entry point per script, named after it (genieblue-to-torch -> to_torch): the names setup.cfg lists.
globals().update({script.removeprefix("genieblue-").replace("-", "_"): _command(module)
                  for script, module in COMMANDS.items()})
