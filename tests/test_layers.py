"""The library's layers point down only (WORKSPACE.md, "Layers"): every import in
genieblue_jax/ and data_pipelines/, at module level or inside a function, read with `ast`,
must go to a layer its own layer may use. Nothing in the library imports `experiments`,
`tools` or `tests` (the demo, the command lines, the tests).
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
}
LAYER_OF = {
    "genieblue_jax.paths": "base", "genieblue_jax.jsonfile": "base", "genieblue_jax.checksums": "base",
    "genieblue_jax.versions": "base", "genieblue_jax.rules": "base",
    "data_pipelines": "data",
    "genieblue_jax.models": "models",
    "genieblue_jax.sharding": "sharding",
    "genieblue_jax.structure": "structure",
    "genieblue_jax.checkpoint": "checkpoint", "genieblue_jax.workdir": "checkpoint",
    "genieblue_jax.hf": "hf",
    "genieblue_jax.inference": "inference",
    "genieblue_jax.train": "train",
    "genieblue_jax.api": "api", "genieblue_jax.evaluate": "api", "genieblue_jax.vlmeval": "api",
    "genieblue_jax": "api",             # the package itself: `genieblue_jax.load` is the public API
    "genieblue_jax.export": "export",
}
OUTSIDE = ("experiments", "tools", "tests")


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
            if top in OUTSIDE:
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
    found = set().union(*(deferred_imports(m, p) for m, p in _modules()))
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
                                          ("genieblue_jax.paths", "base")])
def test_layer_of(module, layer):
    assert layer_of(module) == layer
