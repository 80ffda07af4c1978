"""Every command runs the three ways users type it (issue 19): `python tools/NAME.py`,
`python -m tools.NAME` and the installed console script `genieblue-NAME`, with the same
`--help` (the module's docstring and flags), the same output and the same exit status.
The commands' code is the library's (`genieblue_jax.cli.NAME`); `tools/NAME.py` are thin
scripts over it, and the installed project claims no `tools` package (issue 33).

The reference for what `--help` must show is the command's own source file, read with `ast`
(its docstring), not anything the command prints; the table of scripts
(`genieblue_jax.cli.console.COMMANDS`) is checked against setup.cfg and against the modules
and scripts on disk, so a new command without a console script or a script fails here.
"""
import ast
import concurrent.futures
import configparser
import os
import shutil
import subprocess
import sys
import time

import pytest

from genieblue_jax.cli import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CLI = "genieblue_jax.cli."


def _file(module: str, root: str = REPO) -> str:
    return os.path.join(root, *module.split(".")) + ".py"


def _docstring_first_line(module: str) -> str:
    with open(_file(module)) as f:
        return ast.get_docstring(ast.parse(f.read())).splitlines()[0]


def _entry_point(script: str) -> str:
    return f"genieblue_jax.cli.console:{script.removeprefix('genieblue-').replace('-', '_')}"


def test_every_command_has_a_console_script_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    declared = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert declared == {script: _entry_point(script) for script in console.COMMANDS}
    for target in declared.values():
        assert callable(getattr(console, target.split(":")[1]))
    commands = {f"{CLI}{name[:-3]}" for name in os.listdir(os.path.join(REPO, *CLI.split(".")[:-1]))
                if name.endswith(".py") and name not in ("__init__.py", "console.py")}
    missing = commands - set(console.COMMANDS.values())
    assert not missing, f"commands without a console script: {missing}"
    for module in console.COMMANDS.values():
        assert os.path.exists(_file(module)), module
    # tools/: one thin script per library command (it runs the command's module), nothing else
    scripts = {f"tools.{name[:-3]}" for name in os.listdir(os.path.join(REPO, "tools"))
               if name.endswith(".py") and name != "__init__.py"}
    assert scripts == set(console.TOOLS_SCRIPT.values()) and set(console.TOOLS_SCRIPT) == commands
    for module, script in console.TOOLS_SCRIPT.items():
        with open(_file(script)) as f:
            source = f.read()
        assert f'run_command("{module}")' in source and len(source.splitlines()) <= 12, script


@pytest.mark.slow
def test_every_command_module_imports_beside_the_others():
    """Importing a command defines no flags (each defines them under `__main__`), so tests and
    tools can import several in one process without absl's DuplicateFlagError; nor does it
    import jax (a command sets jax's environment first, and --help stays fast)."""
    modules = sorted(console.COMMANDS.values())
    code = ("import importlib, sys\nfrom absl import flags\n"
            "for m in sys.argv[1:]:\n    importlib.import_module(m)\n"
            "print([m for m in sys.argv[1:] if flags.FLAGS.flags_by_module_dict().get(m)])")
    rc, out, err = _run([sys.executable, "-c", code, *modules], REPO)
    assert rc == 0, err
    assert out.strip() == "[]", f"modules that define flags when imported: {out}"
    lone = [m for m in modules if m.startswith(CLI) and m != f"{CLI}benchmark_torch_reference"]  # that one is torch
    rc, out, err = _run([sys.executable, "-c", "import importlib, sys\nfor m in sys.argv[1:]:\n"
                         "    importlib.import_module(m)\nprint('jax' in sys.modules)", *lone], REPO)
    assert (rc, out.strip()) == (0, "False"), err


def _run(argv, cwd, env=None):
    env = dict(env or os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def _check_help(script: str, out: str, root: str = REPO) -> None:
    """`out` is `module --help`: the module's docstring and, for absl, the flags of its file under `root`."""
    module = console.COMMANDS[script]
    doc = _docstring_first_line(module)
    if module == "experiments.reproduce":  # argparse: the description is the docstring's first line
        assert out.startswith("usage: ") and doc in out
    else:  # absl: __main__'s docstring, then the flags this module defines
        assert out.startswith(doc) and f"\n{_file(module, root)}:\n  --" in out, out[:2000]


@pytest.mark.parametrize("script", sorted(console.COMMANDS))
@pytest.mark.slow
def test_help_is_the_same_in_all_three_forms(script, tmp_path):
    module = console.COMMANDS[script]
    installed = os.path.join(BIN, script)
    if not os.path.exists(installed):
        pytest.fail(f"{installed} is not installed: `pip install -e .` installs the console scripts")
    repo_form = console.TOOLS_SCRIPT.get(module, module)  # a library command's tools/NAME.py
    forms = {"python FILE": ([sys.executable, _file(repo_form), "--help"], str(tmp_path)),  # not run from the repo
             "python -m": ([sys.executable, "-m", repo_form, "--help"], REPO),
             "console script": ([installed, "--help"], str(tmp_path))}
    with concurrent.futures.ThreadPoolExecutor(len(forms)) as pool:
        results = dict(zip(forms, pool.map(lambda f: _run(*f), forms.values())))
    for form, (rc, out, err) in results.items():
        assert "Traceback" not in err, f"{script} as {form}:\n{err}"
        assert rc in (0, 1), f"{script} as {form}: exit {rc}\n{err}"  # absl exits 1 after --help, argparse 0
    (rc, out, _), *others = results.values()
    assert all(other[:2] == (rc, out) for other in others), {f: r[:2] for f, r in results.items()}
    _check_help(script, out)


@pytest.mark.slow
def test_installed_outside_the_repository_claims_no_tools(tmp_path):
    """Issue 33's acceptance: the project installed (`pip install .`, not editable) in a fresh
    virtualenv, run outside the repository: `import tools` fails, the installed distribution
    lists no `tools` file, its entry points are the table's, and every genieblue-* console
    script runs `--help` from the installed code.

    The venv sees the test environment's packages (jax, absl, ...) through a .pth of plain
    paths, which, unlike --system-site-packages, also works when that environment is itself a
    venv, and runs none of its .pth files: its editable install of this project stays out.
    The build runs on a copy of the sources (pip builds in the tree: build/, *.egg-info)."""
    start = time.perf_counter()
    src, venv = tmp_path / "src", tmp_path / "venv"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src)
    for package in ("genieblue_jax", "data_pipelines", "experiments", "tools"):  # tools too: it must be left out
        shutil.copytree(os.path.join(REPO, package), src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    import site
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    with open(os.path.join(purelib, "_test_environment.pth"), "w") as f:
        f.write("\n".join(outer) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    rc, out, err = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                         str(src)], str(tmp_path), env)
    assert rc == 0, err[-3000:]
    installed_s = time.perf_counter() - start

    rc, out, err = _run([python, "-c", "import tools"], str(tmp_path), env)
    assert rc == 1 and "ModuleNotFoundError: No module named 'tools'" in err, (rc, out, err)
    code = "import genieblue_jax, data_pipelines, experiments; print(genieblue_jax.__file__, experiments.__file__)"
    rc, out, err = _run([python, "-c", code], str(tmp_path), env)
    assert rc == 0 and all(p.startswith(purelib) for p in out.split()), (out, err)
    dist = next(d for d in os.listdir(purelib) if d.startswith("genieblue_jax-") and d.endswith(".dist-info"))
    with open(os.path.join(purelib, dist, "RECORD")) as f:
        files = [line.split(",")[0] for line in f]
    tops = {path.split("/")[0] for path in files if "/" in path and not path.startswith("..")}  # ../../bin: scripts
    assert tops == {"genieblue_jax", "data_pipelines", "experiments", dist}, tops
    entry_points = configparser.ConfigParser(delimiters=("=",))
    entry_points.optionxform = str
    entry_points.read(os.path.join(purelib, dist, "entry_points.txt"))
    assert {k: v.strip() for k, v in entry_points["console_scripts"].items()} == \
        {script: _entry_point(script) for script in console.COMMANDS}

    def run_help(script):
        return script, _run([str(venv / "bin" / script), "--help"], str(tmp_path), env)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for script, (rc, out, err) in pool.map(run_help, sorted(console.COMMANDS)):
            assert "Traceback" not in err and rc in (0, 1), f"{script}: exit {rc}\n{err[-3000:]}"
            _check_help(script, out, root=purelib)  # the flags of the installed module's file
    print(f"venv + install {installed_s:.1f} s, all {time.perf_counter() - start:.1f} s")
