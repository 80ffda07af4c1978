"""Pinned dependencies: the lock satisfies setup.cfg, the suite runs on the locked versions, and
checkpoints record the versions that change results (genieblue_jax/versions.py)."""
import configparser
import json
import os

import jax
import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from genieblue_jax import checkpoint, models, versions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lock() -> dict[str, str]:
    pins = {}
    with open(os.path.join(REPO, "requirements", "lock-cpu.txt")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, sep, version = line.partition("==")
                assert sep, f"requirements/lock-cpu.txt: {line!r} is not NAME==VERSION"
                pins[canonicalize_name(name)] = version
    return pins


def _setup_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in ("test", "qnn"):
        lines += cfg["options.extras_require"][extra].splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")]


def test_the_lock_pins_every_requirement_within_setup_cfg_ranges():
    pins = _lock()
    reqs = _setup_requirements()
    assert len(reqs) > 20
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (setup.cfg) is not pinned in requirements/lock-cpu.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements/lock-cpu.txt pins {req.name}=={pins[name]}, outside setup.cfg's {req}"
    # installed with --no-deps, still pinned; export_qnn's install hint names the same version
    from genieblue_jax.export.qnn.quantize import AIMET_VERSION
    assert pins["aimet-onnx"] == AIMET_VERSION


def test_the_suite_runs_on_the_locked_versions():
    """The suite's measured thresholds (and the README's figures) hold for the lock's versions:
    install with `pip install -c requirements/lock-cpu.txt ...` (README, Set-up and tests)."""
    pins, installed = _lock(), versions.package_versions()
    for name in versions.RESULT_PACKAGES:
        assert installed[name] == pins[canonicalize_name(name)], (
            f"{name} {installed[name]} is installed, requirements/lock-cpu.txt pins {pins[canonicalize_name(name)]}")


def module_versions() -> dict[str, str]:
    """Each result package's own version attribute: another source than importlib.metadata."""
    import flax
    import grain
    import jaxlib
    import optax
    import orbax.checkpoint
    import PIL
    import sentencepiece
    import tokenizers
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax-checkpoint": orbax.checkpoint.__version__,
            "grain": grain.__version__, "numpy": np.__version__, "sentencepiece": sentencepiece.__version__,
            "tokenizers": tokenizers.__version__, "pillow": PIL.__version__}


def test_model_checkpoints_record_the_versions_of_the_packages_results_depend_on(tmp_path):
    cfg = models.get_preset("tiny-llama")
    checkpoint.save(str(tmp_path / "ckpt"), {"llm": cfg}, {"llm": models.init_params(cfg, jax.random.key(0))})
    with open(tmp_path / "ckpt" / checkpoint.META_FILE) as f:
        assert json.load(f)["packages"] == module_versions()
    # (training checkpoints: tests/test_api.py reads them from a trained workdir)


def test_changed_versions_names_what_differs():
    now = versions.package_versions()
    assert versions.changed_versions(now, now) == {}
    assert versions.changed_versions({**now, "numpy": "1.0"}, now) == {"numpy": ("1.0", now["numpy"])}
    assert versions.changed_versions({"not-a-package-we-track": "1"}, now) == {}
