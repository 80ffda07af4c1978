"""The library's layers point down only (WORKSPACE.md, "Layers"): every import in
genieblue_jax/ and data_pipelines/, at module level or inside a function, read with `ast`,
must go to a layer its own layer may use. Nothing in the library imports `experiments`,
`tools` or `tests` (the demo, the command scripts, the tests), except the commands
(`genieblue_jax.cli`, the top layer), which run the recipes; nothing imports the commands.

No private name (a leading underscore) crosses a module, in any file of ours or the code strings
it runs: what another module needs is public and documented (`private_uses`).
"""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layer -> the layers it may import (besides itself). A module's layer is the longest prefix of
# its dotted name listed in LAYER_OF.
USES = {
    "base": set(),                      # paths, JSON marker files, checksums, package versions
    "data": {"base"},                   # input pipelines: know nothing of models
    "models": {"base"},
    "sharding": {"base", "models"},
    "structure": {"base", "models", "sharding"},
    "checkpoint": {"base", "models", "sharding", "structure", "data"},   # + the training workdir format
    "hf": {"base", "models", "sharding", "structure", "checkpoint"},
    "inference": {"base", "data", "models", "sharding", "structure", "checkpoint"},
    "train": {"base", "data", "models", "sharding", "structure", "checkpoint"},
    "api": {"base", "data", "models", "sharding", "structure", "checkpoint", "hf", "inference"},
    "export": {"base", "data", "models", "sharding", "structure", "checkpoint", "hf", "inference", "api"},
    # the commands: anything in the library (+ experiments, OUTSIDE_USES); nothing imports them
    "cli": {"base", "data", "models", "sharding", "structure", "checkpoint", "hf", "inference", "train", "api",
            "export"},
}
LAYER_OF = {
    "genieblue_jax.paths": "base", "genieblue_jax.jsonfile": "base", "genieblue_jax.checksums": "base",
    "genieblue_jax.versions": "base", "genieblue_jax.rules": "base",
    "data_pipelines": "data",
    "genieblue_jax.models": "models",
    "genieblue_jax.sharding": "sharding",
    "genieblue_jax.structure": "structure",
    "genieblue_jax.checkpoint": "checkpoint", "genieblue_jax.workdir": "checkpoint",
    "genieblue_jax.random_model": "checkpoint", "genieblue_jax.run_config": "checkpoint",
    "genieblue_jax.hf": "hf",
    "genieblue_jax.inference": "inference",
    "genieblue_jax.train": "train",
    "genieblue_jax.api": "api", "genieblue_jax.evaluate": "api", "genieblue_jax.vlmeval": "api",
    "genieblue_jax": "api",             # the package itself: `genieblue_jax.load` is the public API
    "genieblue_jax.export": "export",
    "genieblue_jax.cli": "cli",
}
OUTSIDE = ("experiments", "tools", "tests")
# What outside the library a layer may import: the commands run the recipes and the demo's data
# (aot_memory, benchmark_data, benchmark_train read experiments.configs / experiments.demo_data).
OUTSIDE_USES = {"cli": {"experiments"}}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:i])]
    return None


def _modules():
    for root in ("genieblue_jax", "data_pipelines"):
        for d, _, files in os.walk(os.path.join(REPO, root)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    yield name, path


def imports_of(module: str, path: str):
    """(line, imported module) for every import statement of the file; `from P import X` counts
    as importing P.X when P.X is a module of ours, else P."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                is_module = os.path.exists(os.path.join(REPO, *full.split("."))) or \
                    os.path.exists(os.path.join(REPO, *full.split(".")) + ".py")
                yield node.lineno, full if is_module else base


def violations():
    out = []
    for module, path in _modules():
        mine = layer_of(module)
        if mine is None:
            out.append(f"{path}: not in LAYER_OF (give the new module a layer)")
            continue
        for line, target in imports_of(module, path):
            top = target.split(".")[0]
            where = f"{os.path.relpath(path, REPO)}:{line}: {module} ({mine}) imports {target}"
            if top in OUTSIDE and top not in OUTSIDE_USES.get(mine, ()):
                out.append(f"{where}, outside the library")
            elif top in ("genieblue_jax", "data_pipelines"):
                theirs = layer_of(target)
                if theirs != mine and theirs not in USES[mine]:
                    out.append(f"{where} ({theirs}): {mine} may use only {sorted(USES[mine])}")
    return out


def test_every_import_points_down_the_layers():
    assert violations() == []


# Imports of our own modules inside a function, with the reason each one is there. A deferred
# import that only dodges a cycle hides a layering fault, so every other one is an error.
DEFERRED = {
    ("data_pipelines.pipeline", "data_pipelines.tfds_source"):
        "tensorflow_datasets takes seconds to import and only TFDS sources need it",
    ("genieblue_jax", "genieblue_jax.api"):
        "`genieblue_jax.load` imports jax when first used, so importing a command (genieblue_jax.cli) does not, "
        "and the command can set JAX_PLATFORMS / XLA_FLAGS before jax reads them",
}
# Layers whose every import of ours may be deferred, and why.
DEFERRED_LAYERS = {
    "cli": "a command imports the library when it runs, after its flags are parsed (and, for aot_memory, the "
           "device count is set before jax starts): --help and importing every command stay fast",
}


def deferred_imports(module: str, path: str) -> set[tuple[str, str]]:
    """(module, our module imported) for every import of ours inside a function of the file."""
    tree = ast.parse(open(path).read(), path)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    lines = {n.lineno for n in ast.walk(tree) if id(n) in inside}
    return {(module, ".".join(target.split(".")[:2])) for line, target in imports_of(module, path)
            if line in lines and target.split(".")[0] in ("genieblue_jax", "data_pipelines")}


def test_no_import_of_our_own_modules_is_deferred_without_a_reason():
    found = set().union(*(deferred_imports(m, p) for m, p in _modules() if layer_of(m) not in DEFERRED_LAYERS))
    assert found == set(DEFERRED)


def test_the_recipes_and_the_demo_import_no_jax():
    """tests/conftest.py imports experiments.demo (the recipes with it) before it sets
    JAX_PLATFORMS=cpu, which jax reads when imported: were jax imported first, every test
    process would also start libtpu (the `tpu` extra), holding its lockfile against the TPU
    compiler that tools.aot_memory runs as a subprocess."""
    code = "import sys, experiments.demo, experiments.configs.stage2_skip; print(sorted(m for m in sys.modules " \
           "if m.split('.')[0] in ('jax', 'jaxlib', 'genieblue_jax')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule's other side: an import up the layers (models -> train), one into the demo and
    one hidden inside a function are all reported, with the file and line."""
    bad = tmp_path / "genieblue_jax" / "models"
    bad.mkdir(parents=True)
    (bad / "upward.py").write_text("import numpy\nfrom genieblue_jax.train import trainer\n\n\ndef f():\n"
                                   "    from experiments import demo_data\n    import data_pipelines.pipeline\n")
    monkeypatch.setattr(f"{__name__}.REPO", str(tmp_path))
    found = violations()
    assert found == [
        "genieblue_jax/models/upward.py:2: genieblue_jax.models.upward (models) imports genieblue_jax.train "
        "(train): models may use only ['base']",
        "genieblue_jax/models/upward.py:6: genieblue_jax.models.upward (models) imports experiments, outside the "
        "library",
        "genieblue_jax/models/upward.py:7: genieblue_jax.models.upward (models) imports data_pipelines.pipeline "
        "(data): models may use only ['base']"]
    assert deferred_imports("genieblue_jax.models.upward", str(bad / "upward.py")) == {
        ("genieblue_jax.models.upward", "data_pipelines.pipeline")}


@pytest.mark.parametrize("module,layer", [("genieblue_jax.models.llm", "models"), ("genieblue_jax", "api"),
                                          ("data_pipelines.pipeline", "data"), ("genieblue_jax.export.qnn", "export"),
                                          ("genieblue_jax.paths", "base"), ("genieblue_jax.cli.serve", "cli"),
                                          ("genieblue_jax.random_model", "checkpoint")])
def test_layer_of(module, layer):
    assert layer_of(module) == layer


def test_the_commands_sit_on_top(tmp_path, monkeypatch):
    """The commands (genieblue_jax.cli) may import any layer and the recipes; the library may not
    import them, and they may not import the repository's scripts (tools) or the tests."""
    cli = tmp_path / "genieblue_jax" / "cli"
    cli.mkdir(parents=True)
    (cli / "__init__.py").write_text("")
    (cli / "cmd.py").write_text("from genieblue_jax.export import to_torch\nfrom genieblue_jax.train import trainer\n"
                                "from experiments.configs import stage2_skip\nimport tools\n")
    (tmp_path / "genieblue_jax" / "api.py").write_text("from genieblue_jax.cli import cmd\n")
    monkeypatch.setattr(f"{__name__}.REPO", str(tmp_path))
    assert violations() == [
        "genieblue_jax/api.py:1: genieblue_jax.api (api) imports genieblue_jax.cli.cmd (cli): api may use only "
        f"{sorted(USES['api'])}",
        "genieblue_jax/cli/cmd.py:4: genieblue_jax.cli.cmd (cli) imports tools, outside the library"]


# ---------------------------------------------------------------------------------------------
# No private name crosses a module: a name with a leading underscore is its module's own. Read in
# every file of ours (the library, experiments, tools and tests: a test checks the public
# behaviour), and in the code strings they run (`python -c`, a benchmark's child script).

OURS = ("genieblue_jax", "data_pipelines") + OUTSIDE
ATTRIBUTE_CALLS = ("getattr", "setattr", "hasattr", "delattr", "object")  # (obj, "name"): + patch.object
PATH_CALLS = ("setattr", "delattr", "patch")  # ("pkg.module.name", ...): monkeypatch / mock.patch targets


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def _is_ours(module: str | None) -> bool:
    """Whether `module` names a module or package of this repository."""
    if not module or module.split(".")[0] not in OURS:
        return False
    base = os.path.join(REPO, *module.split("."))
    return os.path.isfile(base + ".py") or os.path.isdir(base)


def private_uses(module: str, path: str, source: str | None = None, first_line: int = 1) -> list[str]:
    """'file:line: module uses other._name' for every private name of another of our modules that
    `source` (default: the file at `path`, module `module`) uses: `from other import _name`
    (relative too), `other._name` (other bound by an import, `a.b._name` through `import a.b`),
    getattr / setattr / monkeypatch.setattr / mock.patch.object(other, "_name") and
    monkeypatch.setattr / mock.patch("other._name"); the same in any string constant that
    parses as Python holding an import (its lines counted from the string's)."""
    if source is None:
        with open(path) as f:
            source = f.read()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []  # a string that only looks like code
    package = module if path.endswith("__init__.py") and first_line == 1 else module.rsplit(".", 1)[0]

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        return ".".join(parts + ([node.module] if node.module else []))

    bound = {}  # local name -> our module it names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                    alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _is_ours(f"{absolute(node)}.{alias.name}"):
                    bound[alias.asname or alias.name] = f"{absolute(node)}.{alias.name}"

    def dotted(node) -> str | None:
        if isinstance(node, ast.Name):
            return bound.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = dotted(node.value)
            return owner and f"{owner}.{node.attr}"
        return None

    def text(node) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    out = []
    for node in ast.walk(tree):
        uses = []  # (module, private name)
        if isinstance(node, ast.ImportFrom):
            uses = [(absolute(node), alias.name) for alias in node.names if _is_private(alias.name)]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            uses = [(dotted(node.value), node.attr)]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            name = text(node.args[1]) if len(node.args) > 1 else None
            if func in ATTRIBUTE_CALLS and name and _is_private(name):
                uses = [(dotted(node.args[0]), name)]
            elif func in PATH_CALLS and (target := text(node.args[0])) and "." in target:
                owner, _, name = target.rpartition(".")
                uses = [(owner, name)] if _is_private(name) else []
        elif text(node) and "import" in node.value:
            out += private_uses(module, path, node.value, first_line + node.lineno - 1)
        for owner, name in uses:
            if owner != module and _is_ours(owner):
                out.append(f"{os.path.relpath(path, REPO)}:{first_line + node.lineno - 1}: {module} uses "
                           f"{owner}.{name}")
    return sorted(set(out), key=lambda line: (int(line.split(":")[1]), line))


def _files(root: str):
    """(module, path) of every Python file under `root` (a directory of the repository)."""
    for d, _, files in os.walk(os.path.join(REPO, root)):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(d, f)
                yield os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__"), path


@pytest.mark.parametrize("root", OURS)
def test_no_private_name_crosses_a_module(root):
    """One check per top folder, so that a failure says whose it is."""
    found = [line for module, path in _files(root) for line in private_uses(module, path)]
    assert not found, "private names of another module used (make them public, or keep them home):\n" + \
        "\n".join(found)


def test_the_checker_sees_a_private_name_cross_a_module(tmp_path, monkeypatch):
    """The rule's other side, on a deliberate break: each way of reaching another module's private
    name is reported with its file and line; a module's own privates, dunders, other packages'
    privates (os._exit) and private attributes of objects that are not modules are not."""
    lib = tmp_path / "data_pipelines" / "fmt"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "base.py").write_text("_helper = 1\n\n\ndef _own():\n    return _helper\n")
    (lib / "user.py").write_text(
        "import os\nimport data_pipelines.fmt.base\nfrom data_pipelines.fmt import base as b\n"
        "from data_pipelines.fmt.base import _helper\n"                           # 4
        "from .base import _own\n"                                                # 5
        "x = b._helper + data_pipelines.fmt.base._own()\n"                        # 6
        "y = getattr(b, '_helper')\n"                                             # 7
        "CHILD = '''\nimport sys\nfrom data_pipelines.fmt.base import _own\n'''\n"  # 10
        "os._exit, b.__name__, b.public, x.__class__, 'not code: from a import _b'\n"
        "def f(self, monkeypatch):\n    self._state = 1\n"
        "    monkeypatch.setattr('data_pipelines.fmt.base._helper', 2)\n")         # 15
    monkeypatch.setattr(f"{__name__}.REPO", str(tmp_path))
    found = [line for module, path in _files("data_pipelines") for line in private_uses(module, path)]
    assert found == [
        "data_pipelines/fmt/user.py:4: data_pipelines.fmt.user uses data_pipelines.fmt.base._helper",
        "data_pipelines/fmt/user.py:5: data_pipelines.fmt.user uses data_pipelines.fmt.base._own",
        "data_pipelines/fmt/user.py:6: data_pipelines.fmt.user uses data_pipelines.fmt.base._helper",
        "data_pipelines/fmt/user.py:6: data_pipelines.fmt.user uses data_pipelines.fmt.base._own",
        "data_pipelines/fmt/user.py:7: data_pipelines.fmt.user uses data_pipelines.fmt.base._helper",
        "data_pipelines/fmt/user.py:10: data_pipelines.fmt.user uses data_pipelines.fmt.base._own",
        "data_pipelines/fmt/user.py:15: data_pipelines.fmt.user uses data_pipelines.fmt.base._helper"]
