"""Blocks run as scan loops (`scan_layers`) give the unrolled model's logits and gradients,
with the same parameter tree, for every layer pattern the structures produce."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genieblue_jax import models, structure
from genieblue_jax.models.masks import positions_from_segments
from tests.structure.conftest import build, image_batch, perturb


def _scanned(mcfg, remat):
    return dataclasses.replace(mcfg, llm=mcfg.llm.replace(scan_layers=True, remat=remat),
                               vision=mcfg.vision.replace(scan_layers=True, remat=remat))


@pytest.mark.parametrize("variant,placement", [("genieblue", "skip"), ("genieblue", "pre"), ("cogvlm", "post")])
def test_scanned_blocks_match_unrolled_logits_and_gradients(base_params, variant, placement):
    mcfg, params = build(variant, placement, base_params)
    params = {**params, "branch": perturb(params["branch"])}
    tokens, segments, images = image_batch(mcfg)
    positions = positions_from_segments(segments)

    def loss(mcfg, trainable, frozen):
        logits = structure.forward(mcfg, structure.combine(trainable, frozen), tokens, positions, segments, images)
        return jnp.mean(logits ** 2), logits

    trainable, frozen = structure.partition(params, "stage2")
    grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)
    (want, want_logits), want_g = grad(mcfg, trainable, frozen)
    assert not mcfg.llm.scan_layers and not mcfg.llm.remat  # the reference: unrolled, no remat
    for remat in (True, False):  # remat=False runs the same loops without jax.checkpoint
        smcfg = _scanned(mcfg, remat)
        assert (smcfg.llm.remat, smcfg.vision.remat) == (remat, remat)
        assert jax.tree.structure(structure.abstract_mllm(smcfg)) == jax.tree.structure(structure.abstract_mllm(mcfg))
        # The compiled step really is a scan loop, with remat's optimisation barriers iff remat.
        lowered = grad.lower(smcfg, trainable, frozen)
        hlo = lowered.as_text()
        barriers = hlo.count("optimization_barrier")
        print(f"{variant}-{placement} remat={remat}: {hlo.count('stablehlo.while')} while loops, "
              f"{barriers} optimization barriers")
        assert "stablehlo.while" in hlo
        assert (barriers > 0) == remat
        (got, got_logits), got_g = lowered.compile()(trainable, frozen)
        print(f"  logits max diff vs unrolled {np.abs(np.asarray(got_logits) - np.asarray(want_logits)).max():.2e}")
        np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        for name, g in models.flatten(got_g).items():
            np.testing.assert_allclose(g, models.flatten(want_g)[name], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{variant}-{placement} remat={remat} {name}")


def test_scanned_text_mode_and_vision_select_layer(base_params):
    mcfg, params = build("genieblue", "skip", base_params)
    tokens, segments, images = image_batch(mcfg)
    positions = positions_from_segments(segments)
    fwd = jax.jit(structure.forward, static_argnums=0, static_argnames="mode")
    smcfg = _scanned(mcfg, False)
    np.testing.assert_allclose(fwd(smcfg, params, tokens, positions, segments, mode="text"),
                               fwd(mcfg, params, tokens, positions, segments, mode="text"), rtol=1e-5, atol=1e-5)
    for select in (-1, -2, 1):  # post-LN last layer, the LLaVA-style penultimate layer, the first
        vit = mcfg.vision.replace(select_layer=select)
        pixels = images[:, 0]
        want = jax.jit(models.build(vit).apply)({"params": params["vision"]}, pixels)["tokens"]
        got = jax.jit(models.build(vit.replace(scan_layers=True)).apply)({"params": params["vision"]}, pixels)["tokens"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"select_layer={select}")
