"""Blocks run as scan loops (`scan_layers`) give the unrolled model's logits and gradients,
with the same parameter tree, for every layer pattern the structures produce."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genieblue_jax import models, structure
from genieblue_jax.models.masks import positions_from_segments
from genieblue_jax.models.scan import scan_groups
from genieblue_jax.train import trainer
from tests.structure.conftest import build, image_batch, perturb

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it


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


def _train_step_inputs(mcfg, params):
    """A stage-2 train step's inputs: state (plain SGD at lr 1, so an update is minus the
    gradient), the frozen tree, and a two-row image batch."""
    tokens, segments, images = image_batch(mcfg)
    batch = {"tokens": tokens, "positions": np.asarray(positions_from_segments(segments)), "segment_ids": segments,
             "loss_mask": np.ones_like(tokens, bool), "source_ids": np.zeros_like(tokens), "images": images}
    trainable, frozen = structure.partition(params, "stage2")
    tx = optax.sgd(1.0)
    state = {"trainable": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0), "bad_steps": jnp.int32(0)}
    return tx, state, frozen, batch


def _shape(x) -> str:
    return f"{x.dtype}[{','.join(map(str, x.shape))}]".replace("float32", "f32")


@pytest.mark.parametrize("variant", ["genieblue", "lora"])
def test_train_step_reads_stacked_weights_in_place(base_params, variant):
    """In the step's layout (`trainer.to_step_layout`: the LLM's and the branch's layers
    stacked once, weights and Adam moments alike) the compiled step creates no array of a
    stacked frozen weight's shape (the named layout's step does: the per-step copy this layout
    removes), its temporaries shrink by the stacked weights' bytes, and its loss and gradients
    equal the unrolled, named model's, with and without remat."""
    mcfg, params = build(variant, "skip", base_params)
    params = {**params, "branch": perturb(params["branch"])}
    tx, state, frozen, batch = _train_step_inputs(mcfg, params)
    want_state, want_m = jax.jit(trainer.make_train_step(mcfg, tx, 1, 1))(state, frozen, batch)
    want_grads = jax.tree.map(jnp.subtract, state["trainable"], want_state["trainable"])
    for remat in (True, False):
        smcfg = _scanned(mcfg, remat)
        s_state, s_frozen = trainer.to_step_layout(smcfg, jax.tree.map(jnp.copy, (state, frozen)))
        assert sorted(k for k in s_frozen["llm"] if k.startswith("layers")) == (
            ["layers_0-4:4", "layers_1-5:4", "layers_2-6:4", "layers_3-7:4"] if variant == "genieblue"
            else ["layers_0-7:1"])
        assert not any(k.startswith("layers_") and "-" not in k for k in s_state["trainable"]["branch"])
        # The round trip gives the named trees back bitwise (checkpoints and the result are named).
        for got, want in ((s_frozen, frozen), (s_state, state)):
            back = trainer.to_named_layout(got)
            assert jax.tree.structure(back) == jax.tree.structure(want)
            for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
                np.testing.assert_array_equal(a, b)
        step = jax.jit(trainer.make_train_step(smcfg, tx, 1, 1))
        compiled = {"stacked": step.lower(s_state, s_frozen, batch).compile(),
                    "named": step.lower(state, frozen, batch).compile()}
        got_state, got_m = compiled["stacked"](s_state, s_frozen, batch)
        np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-6)
        got_grads = jax.tree.map(jnp.subtract, trainer.to_named_layout(s_state)["trainable"],
                                 trainer.to_named_layout(got_state)["trainable"])
        diff = max(float(np.abs(np.asarray(g) - np.asarray(models.flatten(want_grads)[name])).max())
                   for name, g in models.flatten(got_grads).items())
        print(f"{variant} remat={remat}: gradients' largest difference from the unrolled model {diff:.1e}")
        assert diff <= 1e-5
        # Frozen stacked matrices the loops read, told apart by shape from the trainable ones
        # (whose gradients the step makes). A GenieBlue branch's replicated blocks have the
        # base's shapes, so only the LoRA variant's are told apart; the temporaries cover both.
        stacked_layers = lambda tree: {n: x for n, x in models.flatten(tree).items() if re.match(r"layers_\d+-", n)}
        read = stacked_layers(s_frozen["llm"])
        if variant == "genieblue":  # the base's layers 0 and 4 are replaced by the branch's copies
            read = {n: x for n, x in read.items() if not n.startswith("layers_0-")}
        trained = stacked_layers(s_state["trainable"]["branch"])
        watched = {_shape(x) for x in read.values() if x.ndim == 3} - {_shape(x) for x in trained.values()}
        assert bool(watched) == (variant == "lora")
        made = {}
        for layout, c in compiled.items():
            made[layout] = [line.strip()[:120] for line in c.as_text().splitlines()
                            if (m := re.match(r"\s*(?:ROOT )?%\S+ = (\w+\[[\d,]+\])\S* ([\w\-]+)\(", line))
                            and m.group(1) in watched and m.group(2) not in ("parameter", "get-tuple-element", "tuple",
                                                                             "bitcast")]
        print(f"{variant} remat={remat}: {len(watched)} watched shapes; arrays of them made by the step: "
              f"stacked layout {len(made['stacked'])}, named layout {len(made['named'])}")
        assert made["stacked"] == [], made["stacked"][:5]
        assert bool(made["named"]) == bool(watched), "the check must see the named layout's per-step stacking"
        temp = {layout: c.memory_analysis().temp_size_in_bytes for layout, c in compiled.items()}
        copied = sum(x.nbytes for x in (read | {"branch/" + n: x for n, x in trained.items()}).values())
        print(f"  temporaries: named {temp['named']} B, stacked {temp['stacked']} B; stacked weights the "
              f"loops read {copied} B")
        assert temp["named"] - temp["stacked"] >= 0.9 * copied


@pytest.mark.parametrize("types,nope,groups", [
    (("sliding_attention", "full_attention") * 2, (), [(0, 2, 2)]),  # periodic with the kinds: one loop
    (("sliding_attention",) * 3 + ("full_attention",), (2,), [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1)]),
])
def test_interleaved_layer_types_scan_as_the_unrolled_model(types, nope, groups):
    """Gemma 3's sliding / global layers (two RoPE bases), and a NoPE layer, under GenieBlue-Skip
    (interval 2): a loop body runs only layers of one signature (`models.llm.scan_signatures`:
    kind, attention type, RoPE), so the scanned model in the trainer's stacked step layout
    gives the unrolled model's loss and gradients."""
    llm = dataclasses.replace(models.get_preset("tiny-qwen2"), family="gemma3", qkv_bias=False, num_layers=4,
                              layer_types=types, sliding_window=5, local_rope_theta=1e4, nope_layers=nope,
                              query_pre_attn_scalar=12.0)
    vit = models.get_preset("tiny-siglip")
    mcfg = structure.MLLMConfig(llm, vit, models.ProjectorConfig.between(vit, llm),
                                structure.StructureConfig(interval=2), image_token_id=3)
    assert scan_groups(models.llm.scan_signatures(llm, mcfg.layer_kinds)) == groups
    params = structure.init_mllm(mcfg, jax.random.key(0))
    params = {**params, "llm": perturb(params["llm"], seed=3), "branch": perturb(params["branch"])}
    tx, state, frozen, batch = _train_step_inputs(mcfg, params)
    want_state, want_m = jax.jit(trainer.make_train_step(mcfg, tx, 1, 1))(state, frozen, batch)
    smcfg = _scanned(mcfg, remat=False)
    s_state, s_frozen = trainer.to_step_layout(smcfg, jax.tree.map(jnp.copy, (state, frozen)))
    got_state, got_m = jax.jit(trainer.make_train_step(smcfg, tx, 1, 1))(s_state, s_frozen, batch)
    np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-6)
    got, want = trainer.to_named_layout(got_state)["trainable"], want_state["trainable"]
    for name, g in models.flatten(got).items():
        np.testing.assert_allclose(g, models.flatten(want)[name], rtol=1e-4, atol=1e-6, err_msg=name)
