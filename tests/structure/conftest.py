"""A tiny MLLM for structure tests: 8-layer Qwen2-style LLM (so skip, pre and post differ),
7x7-patch SigLIP (16 LLM tokens per image), and batches with and without images."""
import jax
import numpy as np
import pytest

from genieblue_jax import models, structure

IMAGE_TOKEN = 511


def make_mcfg(variant="genieblue", placement="skip") -> structure.MLLMConfig:
    llm = models.get_preset("tiny-qwen2").replace(num_layers=8)
    vit = models.get_preset("tiny-siglip")
    return structure.MLLMConfig(llm, vit, models.ProjectorConfig.between(vit, llm),
                                structure.StructureConfig(variant=variant, placement=placement),
                                image_token_id=IMAGE_TOKEN)


@pytest.fixture(scope="session")
def base_params():
    """One pretrained-looking base (LLM + ViT) shared by every variant, as in the paper."""
    mcfg = make_mcfg()
    return {"llm": models.init_params(mcfg.llm, jax.random.key(1)),
            "vision": models.init_params(mcfg.vision, jax.random.key(2))}


def build(variant, placement, base_params, seed=0):
    mcfg = make_mcfg(variant, placement)
    return mcfg, structure.init_mllm(mcfg, jax.random.key(seed), **base_params)


def perturb(tree, seed=7, scale=0.05):
    """Random noise on every leaf (LoRA B included), so no branch weight is at its init."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


def text_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 500, size=(2, 24)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[1, 18:] = 0
    return tokens, segments


def image_batch(mcfg, seed=0):
    """Two rows, one 16-token image tile each; images are per row: (2, 1, S, S, 3)."""
    rng = np.random.default_rng(seed)
    k = mcfg.tokens_per_tile
    tokens = rng.integers(0, 500, size=(2, 40)).astype(np.int32)
    tokens[0, 3:3 + k] = IMAGE_TOKEN
    tokens[1, 10:10 + k] = IMAGE_TOKEN
    size = mcfg.vision.image_size
    images = rng.uniform(-1, 1, size=(2, 1, size, size, 3)).astype(np.float32)
    return tokens, np.ones_like(tokens), images


_forward = jax.jit(structure.forward, static_argnums=0, static_argnames="mode")


def run(mcfg, params, tokens, segments, images=None, mode="multimodal"):
    """The jitted forward, as deployment runs it (eager op-by-op rounding differs)."""
    from genieblue_jax.models.masks import positions_from_segments
    return np.asarray(_forward(mcfg, params, tokens, positions_from_segments(segments),
                               segments, images, mode=mode))
