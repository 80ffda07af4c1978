"""Compute dtype and parameter dtype are independent settings."""
import jax
import jax.numpy as jnp
import numpy as np

import genieblue_jax
from genieblue_jax import models


def test_bfloat16_compute_is_close_to_float32(hf_decoder_dir):
    f32 = genieblue_jax.load(hf_decoder_dir("qwen2-a"))
    cfg = f32.configs["llm"].replace(dtype="bfloat16")
    bf16 = genieblue_jax.GenieBlue({"llm": cfg}, f32.params)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12))
    a, b = f32.logits(ids), bf16.logits(ids)
    assert b.dtype == np.float32
    diff = np.abs(a - b).max()
    assert 0 < diff < 0.05 * np.abs(a).max()  # really computed in bf16, and still close


def test_bfloat16_parameters_with_float32_compute():
    cfg = models.get_preset("tiny-llama").replace(param_dtype="bfloat16")
    params = models.init_params(cfg, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    tokens = jnp.ones((1, 4), jnp.int32)
    module = models.build(cfg)
    hidden = module.apply({"params": params}, tokens, method="embed")
    assert hidden.dtype == jnp.float32  # bf16 weights, f32 activations
    logits = module.apply({"params": params}, tokens, jnp.zeros((1, 4), jnp.int32), tokens)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_remat_keeps_names_and_gradients():
    import numpy as np
    cfg = models.get_preset("tiny-llama")
    params = models.init_params(cfg, jax.random.key(0))
    remat_cfg = cfg.replace(remat=True)
    assert jax.tree.structure(models.abstract_params(remat_cfg)) == jax.tree.structure(params)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(1, 12)
    pos, seg = jnp.arange(12)[None], jnp.ones((1, 12), jnp.int32)

    def loss(p, c):
        return jnp.sum(models.build(c).apply({"params": p}, tokens, pos, seg)[..., :5] ** 2)

    g1, g2 = jax.grad(loss)(params, cfg), jax.grad(loss)(params, remat_cfg)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
