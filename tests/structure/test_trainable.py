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


# The expected trainable leaves, written out from the structure (not from the stage rules):
# tiny-siglip (2 encoder layers) + projector + 8-layer tiny-qwen2 (tied embeddings, qkv bias),
# skip placement with interval 4 -> layers 0 and 4 are replicated (GenieBlue) / experts (CogVLM).
_BLOCK = ("input_layernorm/scale", "post_attention_layernorm/scale",
          "self_attn/q_proj/kernel", "self_attn/q_proj/bias", "self_attn/k_proj/kernel", "self_attn/k_proj/bias",
          "self_attn/v_proj/kernel", "self_attn/v_proj/bias", "self_attn/o_proj/kernel",
          "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel")  # 12 leaves
_LORA = tuple(f"{p}/{ab}" for p in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                                    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
              for ab in ("lora_a", "lora_b"))  # 7 targets x (A, B) = 14 leaves
_EXPERT = ("self_attn/vision_q_proj/kernel", "self_attn/vision_q_proj/bias", "self_attn/vision_k_proj/kernel",
           "self_attn/vision_k_proj/bias", "self_attn/vision_v_proj/kernel", "self_attn/vision_v_proj/bias",
           "self_attn/vision_o_proj/kernel", "mlp/vision_gate_proj/kernel", "mlp/vision_up_proj/kernel",
           "mlp/vision_down_proj/kernel")  # 10 leaves: no norms in a visual expert
_VIT_LAYER = tuple(f"{m}/{w}" for m in ("layer_norm1", "layer_norm2") for w in ("scale", "bias")) + tuple(
    f"{m}/{w}" for m in ("mlp/fc1", "mlp/fc2", "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                         "self_attn/out_proj") for w in ("kernel", "bias"))  # 16 leaves
_VISION = {"vision/embeddings/patch_embedding/kernel", "vision/embeddings/patch_embedding/bias",
           "vision/embeddings/position_embedding/embedding", "vision/post_layernorm/scale",
           "vision/post_layernorm/bias"} | {f"vision/encoder/layers_{i}/{n}" for i in range(2) for n in _VIT_LAYER}
_PROJECTOR = {f"projector/{m}/{w}" for m, ws in (("layer_norm", ("scale", "bias")), ("linear_1", ("kernel", "bias")),
                                                 ("linear_2", ("kernel", "bias"))) for w in ws}
_REPLICATED = (0, 4)  # skip, 8 layers, interval 4: i % 4 == 0


def _expected_trainable(variant, stage):
    if stage == "stage1":
        return set(_PROJECTOR)
    if variant == "full":
        llm = {"llm/embed_tokens/embedding", "llm/norm/scale"} | {
            f"llm/layers_{i}/{n}" for i in range(8) for n in _BLOCK}
        return _VISION | _PROJECTOR | llm
    special = {"genieblue": _BLOCK, "cogvlm": _EXPERT}.get(variant)
    branch = {f"branch/layers_{i}/{n}" for i in range(8)
              for n in (special if special and i in _REPLICATED else _LORA)}
    return _VISION | _PROJECTOR | branch


# Leaves per component. vision: 3 embedding leaves + 2 layers x 16 + post-LN 2 = 37 (the 11
# pooling-head leaves never train); projector: LayerNorm + 2 Linear = 6; branch: GenieBlue 2
# replicated blocks x 12 + 6 LoRA layers x 14 = 108, CogVLM 2 experts x 10 + 6 x 14 = 104,
# LoRA 8 x 14 = 112; full: llm = embedding + 8 x 12 + final norm = 98 (tied: no lm_head).
_EXPECTED_COUNTS = {
    ("genieblue", "stage2"): {"llm": 0, "vision": 37, "projector": 6, "branch": 108},
    ("cogvlm", "stage2"): {"llm": 0, "vision": 37, "projector": 6, "branch": 104},
    ("lora", "stage2"): {"llm": 0, "vision": 37, "projector": 6, "branch": 112},
    ("full", "full"): {"llm": 98, "vision": 37, "projector": 6, "branch": 0},
    ("genieblue", "stage1"): {"llm": 0, "vision": 0, "projector": 6, "branch": 0},
}


@pytest.mark.parametrize("variant,stage", [("genieblue", "stage2"), ("cogvlm", "stage2"),
                                           ("lora", "stage2"), ("full", "full"), ("genieblue", "stage1")])
def test_gradient_tree_is_exactly_the_trainable_leaves(variant, stage, base_params):
    mcfg, params = build(variant, "skip", base_params)
    # Move every branch weight off its init (LoRA B = 0 would make A's gradient exactly 0).
    params = dict(params, branch=perturb(params["branch"]))
    trainable, frozen = structure.partition(params, stage)
    tokens, segments, images = image_batch(mcfg)
    positions = positions_from_segments(segments)
    grads = jax.grad(_loss, argnums=1)(mcfg, trainable, frozen, tokens, positions, segments, images)
    names = set(models.flatten(grads))
    expected = _expected_trainable(variant, stage)
    # counts first: a readable failure; then the exact names
    counts = {c: sum(n.startswith(c + "/") for n in names) for c in ("llm", "vision", "projector", "branch")}
    assert counts == _EXPECTED_COUNTS[variant, stage]
    assert len(expected) == sum(counts.values())
    assert names == expected
    assert structure.trainable_names(params, stage) == expected
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
