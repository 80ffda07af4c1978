"""Frozen means frozen: gradients and optimizer state exist only for the trainable leaves."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genieblue_jax import models, structure
from genieblue_jax.models.masks import positions_from_segments
from tests.structure.conftest import build, image_batch, perturb


def _loss(mcfg, trainable, frozen, tokens, positions, segments, images):
    params = structure.combine(trainable, frozen)
    logits = structure.forward(mcfg, params, tokens, positions, segments, images)
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


@pytest.mark.parametrize("variant,stage", [("genieblue", "stage2"), ("cogvlm", "stage2"),
                                           ("lora", "stage2"), ("full", "full"), ("genieblue", "stage1")])
def test_gradient_tree_is_exactly_the_trainable_leaves(variant, stage, base_params):
    mcfg, params = build(variant, "skip", base_params)
    # Move every branch weight off its init (LoRA B = 0 would make A's gradient exactly 0).
    params = dict(params, branch=perturb(params["branch"]))
    trainable, frozen = structure.partition(params, stage)
    tokens, segments, images = image_batch(mcfg)
    grads = jax.grad(_loss, argnums=1)(mcfg, trainable, frozen, tokens, positions_from_segments(segments), segments, images)
    names = set(models.flatten(grads))
    expected = structure.trainable_names(params, stage)
    assert names == expected
    if variant != "full":
        assert not any(n.startswith("llm/") for n in names)
    assert not any(n.startswith("vision/head/") for n in names)  # never used, never trained
    zero = [n for n, g in models.flatten(grads).items() if not np.any(np.asarray(g))]
    assert zero == []
    expected_components = {"stage1": {"projector"}, "stage2": {"vision", "projector", "branch"},
                           "full": {"vision", "projector", "llm"}}[stage]
    assert {n.split("/")[0] for n in names} == expected_components


def test_optimizer_state_only_for_trainable_and_base_stays_bitwise(base_params):
    mcfg, params = build("genieblue", "skip", base_params)
    trainable, frozen = structure.partition(params, "stage2")
    tx = optax.adamw(1e-3)
    opt_state = tx.init(trainable)
    n_trainable = models.count_params(trainable)
    mu = opt_state[0].mu
    assert set(models.flatten(mu)) == set(models.flatten(trainable))
    assert models.count_params(mu) == n_trainable
    before = {n: np.asarray(v).copy() for n, v in models.flatten(frozen).items()}
    tokens, segments, images = image_batch(mcfg)
    step = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
    for _ in range(2):
        grads = step(mcfg, trainable, frozen, tokens, positions_from_segments(segments), segments, images)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    for n, v in models.flatten(frozen).items():
        np.testing.assert_array_equal(np.asarray(v), before[n], err_msg=n)
    assert any(n.startswith("llm/") for n in before)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trainable,
                         structure.partition(params, "stage2")[0])
    assert all(jax.tree.leaves(moved))


def test_trainable_parts_are_config_and_typos_are_errors(base_params):
    _, params = build("genieblue", "skip", base_params)
    train, frozen = structure.partition(params, ["projector/linear_2/.*"])
    assert set(models.flatten(train)) == {"projector/linear_2/kernel", "projector/linear_2/bias"}
    with pytest.raises(ValueError, match=r"rule\(s\) \['projektor/.\*'\] match no parameter"):
        structure.partition(params, ["projektor/.*"])
    with pytest.raises(ValueError, match="unknown stage 'stage3'"):
        structure.partition(params, "stage3")
