"""Every command runs the three ways users type it (issue 19): `python tools/NAME.py`,
`python -m tools.NAME` and the installed console script `genieblue-NAME`, with the same
`--help` (the module's docstring and flags), the same output and the same exit status.

The reference for what `--help` must show is the command's own source file, read with `ast`
(its docstring), not anything the command prints; the table of scripts is checked against
setup.cfg and against the modules on disk, so a new tool without a console script fails here.
"""
import ast
import concurrent.futures
import configparser
import os
import subprocess
import sys

import pytest

from tools import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _file(module: str) -> str:
    return os.path.join(REPO, *module.split(".")) + ".py"


def _docstring_first_line(module: str) -> str:
    with open(_file(module)) as f:
        return ast.get_docstring(ast.parse(f.read())).splitlines()[0]


def test_every_command_has_a_console_script_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    declared = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert declared == {script: f"tools.console:{script.removeprefix('genieblue-').replace('-', '_')}"
                        for script in console.COMMANDS}
    for target in declared.values():
        assert callable(getattr(console, target.split(":")[1]))
    on_disk = {f"tools.{name[:-3]}" for name in os.listdir(os.path.join(REPO, "tools"))
               if name.endswith(".py") and name not in ("__init__.py", "console.py")}
    missing = on_disk - set(console.COMMANDS.values())
    assert not missing, f"tools without a console script: {missing}"
    for module in console.COMMANDS.values():
        assert os.path.exists(_file(module)), module


def test_every_command_module_imports_beside_the_others():
    """Importing a command defines no flags (each defines them under `__main__`), so tests and
    tools can import several in one process without absl's DuplicateFlagError."""
    modules = sorted(console.COMMANDS.values())
    code = ("import importlib, sys\nfrom absl import flags\n"
            "for m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "print([m for m in sys.argv[1:] if flags.FLAGS.flags_by_module_dict().get(m)])")
    rc, out, err = _run([sys.executable, "-c", code, *modules], REPO)
    assert rc == 0, err
    assert out.strip() == "[]", f"modules that define flags when imported: {out}"


def _run(argv, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("script", sorted(console.COMMANDS))
def test_help_is_the_same_in_all_three_forms(script, tmp_path):
    module = console.COMMANDS[script]
    installed = os.path.join(BIN, script)
    if not os.path.exists(installed):
        pytest.fail(f"{installed} is not installed: `pip install -e .` installs the console scripts")
    forms = {"python FILE": ([sys.executable, _file(module), "--help"], str(tmp_path)),  # not run from the repo
             "python -m": ([sys.executable, "-m", module, "--help"], REPO),
             "console script": ([installed, "--help"], str(tmp_path))}
    with concurrent.futures.ThreadPoolExecutor(len(forms)) as pool:
        results = dict(zip(forms, pool.map(lambda f: _run(*f), forms.values())))
    for form, (rc, out, err) in results.items():
        assert "Traceback" not in err, f"{script} as {form}:\n{err}"
        assert rc in (0, 1), f"{script} as {form}: exit {rc}\n{err}"  # absl exits 1 after --help, argparse 0
    (rc, out, _), *others = results.values()
    assert all(other[:2] == (rc, out) for other in others), {f: r[:2] for f, r in results.items()}
    doc = _docstring_first_line(module)
    if module == "experiments.reproduce":  # argparse: the description is the docstring's first line
        assert out.startswith("usage: ") and doc in out
    else:  # absl: __main__'s docstring, then the flags this module defines
        assert out.startswith(doc) and f"\n{_file(module)}:\n  --" in out, out[:2000]
