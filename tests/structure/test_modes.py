"""Deployment modes: text (non-shared base), multimodal, shared; CogVLM routing; image merge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genieblue_jax
from genieblue_jax import structure
from genieblue_jax.models.masks import positions_from_segments
from tests.structure.conftest import build, image_batch, perturb, run, text_batch


@pytest.mark.parametrize("variant,placement", [("genieblue", "skip"), ("genieblue", "pre"),
                                               ("genieblue", "post"), ("cogvlm", "skip"), ("lora", "skip")])
def test_multimodal_mode_at_init_is_the_base_on_text(variant, placement, base_params):
    mcfg, params = build(variant, placement, base_params)
    tokens, segments = text_batch()
    base = run(mcfg, params, tokens, segments, mode="text")
    mm = run(mcfg, params, tokens, segments, mode="multimodal")
    valid = segments.astype(bool)
    diff = np.abs(mm - base)[valid].max()
    print(f"{variant}-{placement}: multimodal vs base at init {diff:.2e}")
    assert diff <= 1e-5


def test_replicated_blocks_start_as_exact_copies_in_new_buffers(base_params):
    mcfg, params = build("genieblue", "skip", base_params)
    for i in (0, 4):
        for (path, copy), (_, orig) in zip(
                sorted(genieblue_jax.models.flatten(params["branch"][f"layers_{i}"]).items()),
                sorted(genieblue_jax.models.flatten(base_params["llm"][f"layers_{i}"]).items())):
            np.testing.assert_array_equal(np.asarray(copy), np.asarray(orig), err_msg=path)
            assert copy.unsafe_buffer_pointer() != orig.unsafe_buffer_pointer(), path
    lora_b = params["branch"]["layers_1"]["mlp"]["down_proj"]["lora_b"]
    assert not np.any(np.asarray(lora_b))


_LLM_LEAVES = ("input_layernorm/scale", "post_attention_layernorm/scale", "self_attn/q_proj/kernel",
               "self_attn/q_proj/bias", "self_attn/k_proj/kernel", "self_attn/k_proj/bias",
               "self_attn/v_proj/kernel", "self_attn/v_proj/bias", "self_attn/o_proj/kernel",
               "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel")  # a Qwen2 block
_LORA_TARGETS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                 "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def _shared_on_text_weights(variant, base_llm, branch):
    """The plain decoder's weights that shared mode runs on text, assembled by hand in numpy:
    8 layers, skip, interval 4 -> layers 0 and 4 are special. GenieBlue takes those whole
    blocks from the branch; CogVLM keeps their text weights (the base's: its vision_* experts
    only see image tokens); every other layer folds its LoRA: W + (alpha / r) A B."""
    scale = 16.0 / 8  # StructureConfig defaults lora_alpha=16, lora_rank=8 (asserted below)
    special = {"genieblue": (0, 4), "cogvlm": (0, 4), "lora": ()}[variant]
    flat = {n: np.asarray(v, np.float64) for n, v in genieblue_jax.models.flatten(base_llm).items()}
    br = {n: np.asarray(v, np.float64) for n, v in genieblue_jax.models.flatten(branch).items()}
    used = set()
    for i in range(8):
        if i in special:
            if variant == "genieblue":
                for leaf in _LLM_LEAVES:
                    flat[f"layers_{i}/{leaf}"] = br[f"layers_{i}/{leaf}"]
                    used.add(f"layers_{i}/{leaf}")
            else:
                used |= {n for n in br if n.startswith(f"layers_{i}/") and "/vision_" in n}
            continue
        for t in _LORA_TARGETS:
            a, b = br[f"layers_{i}/{t}/lora_a"], br[f"layers_{i}/{t}/lora_b"]
            flat[f"layers_{i}/{t}/kernel"] = flat[f"layers_{i}/{t}/kernel"] + scale * a @ b
            used |= {f"layers_{i}/{t}/lora_a", f"layers_{i}/{t}/lora_b"}
    assert used == set(br)  # every branch leaf accounted for
    return genieblue_jax.models.unflatten({n: v.astype(np.float32) for n, v in flat.items()})


@pytest.mark.parametrize("variant", ["genieblue", "cogvlm", "lora"])
def test_text_mode_is_bitwise_the_base_after_training_and_shared_is_the_branch_folded_in(variant, base_params):
    mcfg, params = build(variant, "skip", base_params)
    assert (mcfg.structure.lora_alpha, mcfg.structure.lora_rank) == (16.0, 8)
    params = dict(params, branch=perturb(params["branch"]))
    tokens, segments = text_batch(seed=3)
    base_alone = genieblue_jax.GenieBlue({"llm": mcfg.llm}, {"llm": base_params["llm"]}).logits(
        tokens, segment_ids=segments)
    np.testing.assert_array_equal(run(mcfg, params, tokens, segments, mode="text"), base_alone)
    shared = run(mcfg, params, tokens, segments, mode="shared")
    valid = segments.astype(bool)
    assert np.abs(shared - base_alone)[valid].max() > 1e-3
    # Reference by another path: the plain decoder (no LoRA layers, no experts, no merge) on
    # weights assembled in numpy. The two differ only by float32 rounding: shared computes
    # x W + ((x A) B) * 2, the reference x (W + 2 A B) with the sum rounded once. Measured
    # <= 3.6e-7 on logits up to 0.7 (a few float32 ulps); 2e-6 leaves 5x for other CPUs /
    # thread counts, while a real mistake (scale dropped, a block not swapped) moves them > 0.1.
    plain = genieblue_jax.models.build(mcfg.llm)
    want = np.asarray(jax.jit(plain.apply)({"params": _shared_on_text_weights(variant, base_params["llm"],
                                                                               params["branch"])},
                                           tokens, positions_from_segments(segments), segments))
    diff = np.abs(shared - want)[valid].max()
    print(f"{variant}: shared vs hand-folded plain decoder max diff {diff:.2e} "
          f"(logits up to {np.abs(want[valid]).max():.2f}); "
          f"shared vs base {np.abs(shared - base_alone)[valid].max():.2e}")
    assert diff <= 2e-6


def test_cogvlm_expert_only_touches_image_tokens(base_params):
    mcfg, params = build("cogvlm", "skip", base_params)
    params = dict(params, branch=perturb(params["branch"]))
    changed = jax.tree.map(lambda x: x, params)
    w = changed["branch"]["layers_4"]["mlp"]["vision_up_proj"]["kernel"]
    changed["branch"]["layers_4"]["mlp"]["vision_up_proj"]["kernel"] = w + 0.5
    tokens, segments = text_batch()
    np.testing.assert_array_equal(run(mcfg, params, tokens, segments), run(mcfg, changed, tokens, segments))
    tokens, segments, images = image_batch(mcfg)
    before, after = run(mcfg, params, tokens, segments, images), run(mcfg, changed, tokens, segments, images)
    assert np.abs(before - after).max() > 1e-3
    # joint attention: text tokens after the image see the change, text tokens before it do not
    np.testing.assert_array_equal(before[0, :3], after[0, :3])
    assert np.abs(before[0, 20:] - after[0, 20:]).max() > 1e-4


def test_images_change_the_multimodal_output(base_params):
    mcfg, params = build("genieblue", "skip", base_params)
    tokens, segments, images = image_batch(mcfg)
    a = run(mcfg, params, tokens, segments, images)
    b = run(mcfg, params, tokens, segments, images[::-1].copy())
    assert np.abs(a - b).max() > 1e-4
    np.testing.assert_array_equal(a[:, :3], b[:, :3])  # before any image token: unaffected


def test_merge_image_features_worked_example():
    embeds = jnp.zeros((1, 5, 2)) + jnp.arange(5.0)[None, :, None]
    features = jnp.array([[[10.0, 10.0], [11.0, 11.0]]])
    out = structure.merge_image_features(embeds, jnp.array([[0, 1, 0, 1, 0]], bool), features)
    np.testing.assert_array_equal(out[0, :, 0], [0, 10, 2, 11, 4])


def test_image_token_count_mismatch_says_both_counts(base_params):
    mcfg, _ = build("genieblue", "skip", base_params)
    tokens, _, _ = image_batch(mcfg)
    valid = np.array([[True, False], [True, True]])
    with pytest.raises(ValueError, match=r"row 1: the input has 16 image tokens \(id 511\) but its images "
                                         r"give 32 features \(2 tiles x 16 tokens\)"):
        structure.check_image_tokens(tokens, mcfg.image_token_id, valid, mcfg.tokens_per_tile)
    structure.check_image_tokens(tokens, mcfg.image_token_id, valid[:, :1], mcfg.tokens_per_tile)


def test_padding_tiles_are_ignored(base_params):
    mcfg, params = build("genieblue", "skip", base_params)
    tokens, segments, images = image_batch(mcfg)
    padded = np.concatenate([images, np.random.default_rng(9).normal(size=images.shape).astype(np.float32)], 1)
    np.testing.assert_allclose(run(mcfg, params, tokens, segments, padded),
                               run(mcfg, params, tokens, segments, images), atol=1e-5)


def test_text_mode_refuses_images(base_params):
    mcfg, params = build("genieblue", "skip", base_params)
    tokens, segments, images = image_batch(mcfg)
    with pytest.raises(ValueError, match="takes no images"):
        run(mcfg, params, tokens, segments, images, mode="text")
    with pytest.raises(ValueError, match="mode='auto'"):
        run(mcfg, params, tokens, segments, mode="auto")
