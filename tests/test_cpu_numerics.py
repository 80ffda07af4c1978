"""The demo's float32 arithmetic on CPU (experiments.demo.pin_cpu_numerics): the README's
demo figures are one training run's rounding, so the flags the jobs run with must make that
rounding a property of the packages, not of the shape of the code XLA happens to generate."""
import os
import platform
import subprocess
import sys

import pytest

from experiments import demo

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINGERPRINT = ("from experiments import demo; demo.pin_cpu_numerics(); "
               "print(demo.numerics_fingerprint())")


def _fingerprint(xla_flags: str) -> str:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", FINGERPRINT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[-1]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the ISA cap is x86-64 only")
def test_pinned_numerics_do_not_depend_on_the_shape_of_the_generated_code():
    # One demo training computation (the demo LLM's loss and gradients), compiled twice with
    # the jobs' flags: once as the jobs compile it, once with XLA told to prefer 128-bit
    # vectors, which changes how its loops are vectorised but no operation's definition.
    # Measured with FMA allowed (the cap at AVX2), the two differ (e9838216 vs 1cc08e34
    # with jax 0.10.2): LLVM fuses other multiply-adds in the other code shape, as it can
    # on another CPU model. Under the pin (no FMA) every multiply and add rounds on its own.
    assert _fingerprint("") == _fingerprint("--xla_cpu_prefer_vector_width=128")


def test_the_pin_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=SSE4_2")
    demo.pin_cpu_numerics()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[:2] == ["--xla_force_host_platform_device_count=2", "--xla_cpu_max_isa=SSE4_2"]
    assert flags[2:] == ["--xla_cpu_enable_platform_dependent_math=false"]
    monkeypatch.setenv("XLA_FLAGS", "")
    demo.pin_cpu_numerics()
    expected = ["--xla_cpu_enable_platform_dependent_math=false"]
    if platform.machine() in ("x86_64", "AMD64"):
        expected.insert(0, "--xla_cpu_max_isa=AVX")
    assert os.environ["XLA_FLAGS"].split() == expected


def test_the_readme_names_the_fingerprint_its_tables_were_made_with():
    with open(os.path.join(REPO, "README.md")) as f:
        assert f"numerics fingerprint {demo.README_NUMERICS_FINGERPRINT}" in f.read()
