"""Chunked cross-entropy and the batch-axis activation pin."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from genieblue_jax import models
from genieblue_jax import sharding as sharding_lib
from genieblue_jax.train.losses import token_nll


def _problem(t=11, d=8, vocab=37):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (2, t, d))
    head = jax.random.normal(k2, (d, vocab))
    targets = jax.random.randint(k3, (2, t), 0, vocab)
    return hidden, head, targets


def test_chunked_nll_equals_log_softmax_values_and_gradients():
    hidden, head, targets = _problem()

    def loss(hidden, head, chunk):
        return jnp.sum(token_nll(hidden, targets, lambda h: h @ head, chunk) * jnp.arange(11.0))

    reference = -jnp.take_along_axis(jax.nn.log_softmax(hidden @ head), targets[..., None], -1)[..., 0]
    for chunk in (0, 1, 4, 5, 11, 64):  # 4 and 5 leave a padded last block
        nll = jax.jit(token_nll, static_argnums=(2, 3))(hidden, targets, lambda h: h @ head, chunk)
        assert nll.shape == (2, 11)
        np.testing.assert_allclose(nll, reference, rtol=1e-5, atol=1e-6, err_msg=f"chunk={chunk}")
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(hidden, head, chunk)
        want = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(hidden, head, 0)
        for g, w in zip(grads, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"chunk={chunk}")


def test_shard_batch_pins_the_batch_axes_under_a_mesh_and_is_a_no_op_otherwise():
    x = jnp.ones((8, 3))
    assert models.shard_batch(x) is x  # no mesh: untouched
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def f(x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return models.shard_batch(x * 2)

    replicated = NamedSharding(mesh, P())
    out = jax.jit(f, in_shardings=replicated)(jax.device_put(x, replicated))
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
    odd = jax.jit(f, in_shardings=replicated)(jax.device_put(jnp.ones((6, 3)), replicated))
    assert odd.shape == (6, 3)  # 6 rows do not divide over 4 batch shards: left to XLA
