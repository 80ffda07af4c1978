"""Query-blocked attention (`LLMConfig.attention_chunk`) equals attention over all queries."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genieblue_jax import models


@pytest.mark.slow
def test_chunked_attention_equals_full_attention_values_and_gradients():
    cfg = models.get_preset("tiny-qwen2")
    tokens = jax.random.randint(jax.random.key(1), (2, 23), 0, cfg.vocab_size)
    segments = jnp.array([[1] * 10 + [2] * 13, [1] * 20 + [0] * 3])  # packed row, padded row
    positions = jnp.array([list(range(10)) + list(range(13)), list(range(20)) + [0] * 3])
    params = models.init_params(cfg, jax.random.key(0))

    def run(chunk):
        model = models.build(dataclasses.replace(cfg, attention_chunk=chunk))
        loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, positions, segments)[..., :7] ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (want, want_g) = run(0)
    for chunk in (4, 5, 8, 23):  # 4, 5 leave a padded last block
        got, got_g = run(chunk)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"chunk={chunk}")
        for name, g in models.flatten(got_g).items():
            np.testing.assert_allclose(g, models.flatten(want_g)[name], rtol=1e-4, atol=1e-5,
                                       err_msg=f"chunk={chunk} {name}")
