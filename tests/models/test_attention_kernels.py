"""The attention entry point (`models.attention.causal_attention`) and its kernels.

The TPU kernel (Pallas splash attention, as `impl="auto"` lowers it on a TPU) runs here in
the Pallas interpreter and is compared with the XLA path, values and gradients, on packed
rows with padding and grouped-query heads. That the TPU compiler takes it inside the
trainer's step is tests/test_aot_memory.py's check.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genieblue_jax import models
from genieblue_jax.models import attention


def _inputs(b=2, t=256, heads=4, kv_heads=2, d=32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32) for _ in range(2))
    segments = np.ones((b, t), np.int32)
    segments[0, 100:] = 2       # two packed samples
    segments[0, 230:] = 3       # and a third
    segments[1, 200:] = 0       # a padded row
    return q, k, v, jnp.asarray(segments)


@pytest.mark.parametrize("window,scale", [(None, None), (48, 0.07)])
@pytest.mark.slow
def test_the_splash_kernel_equals_the_xla_path_values_and_gradients(window, scale):
    """Causal, and a sliding window (Gemma 3's layers: splash's LocalMask against the XLA path
    that skips the keys before each query block's window) with Gemma's own score scale."""
    q, k, v, segments = _inputs()
    real = np.asarray(segments) > 0  # outputs at padding are meaningless on every path

    def loss(fn):
        return lambda q, k, v: jnp.sum((fn(q, k, v).reshape(*q.shape[:2], -1) * real[..., None]) ** 2)

    xla = lambda q, k, v: attention.xla_attention(q, k, v, segments, jnp.float32, chunk=64, scale=scale,
                                                  window=window)
    splash = lambda q, k, v: attention.splash_attention(q, k, v, segments, interpret=True, scale=scale,
                                                        window=window)
    if window is not None:  # the window changes the result: the comparison has teeth
        full = attention.xla_attention(q, k, v, segments, jnp.float32, chunk=64, scale=scale)
        assert np.abs(np.asarray(full) - np.asarray(xla(q, k, v)))[real].max() > 1e-2
    got, want = jax.jit(splash)(q, k, v).reshape(*q.shape[:2], -1), jax.jit(xla)(q, k, v)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6, rtol=0)
    got_g = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    want_g = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-5, err_msg=f"d{name}")


def test_auto_runs_xla_ops_on_cpu_and_equals_the_forced_xla_path_bitwise():
    q, k, v, segments = _inputs()
    run = lambda impl: jax.jit(lambda *a: attention.causal_attention(*a, jnp.float32, 64, impl))
    assert attention.splash_applies(q, k)  # so "auto" does carry a TPU branch here
    hlo = run("auto").lower(q, k, v, segments).compile().as_text()
    assert "tpu_custom_call" not in hlo and "custom_call_target=\"__cudnn" not in hlo
    np.testing.assert_array_equal(np.asarray(run("auto")(q, k, v, segments)),
                                  np.asarray(run("xla")(q, k, v, segments)))


def test_rows_the_kernel_cannot_take_and_unknown_impls():
    q, k, v, segments = _inputs(t=200)          # not a multiple of the kernel's 128-token block
    assert not attention.splash_applies(q, k)
    with pytest.raises(ValueError, match="attention impl='flash'"):
        attention.causal_attention(q, k, v, segments, jnp.float32, impl="flash")
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        models.get_preset("tiny-qwen2").replace(attention_impl="flash")
