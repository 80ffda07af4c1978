"""The multimodal model: vision tower -> projector -> image tokens in the LLM sequence, and
the three deployment modes.

    text        the original base LLM alone (non-shared base): bitwise the base model;
                images are not accepted
    multimodal  the base with the branch merged in (replicated blocks, LoRA, experts)
    shared      the multimodal weights, used for text-only requests too (paper Table 6);
                the computation is the multimodal one, the name records the routing choice

Parameters: {"llm": base, "vision": ..., "projector": ..., "branch": ...}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genieblue_jax import models
from genieblue_jax.structure.branch import (abstract_branch, init_branch, multimodal_decoder,
                                            multimodal_llm_params)
from genieblue_jax.structure.config import MODES, MLLMConfig


def check_image_tokens(tokens, image_token_id: int, num_images: int, tokens_per_image: int) -> None:
    """Host-side check that the sequence has a slot for every image feature and vice versa."""
    n_tokens = int(np.sum(np.asarray(tokens) == image_token_id))
    n_features = num_images * tokens_per_image
    if n_tokens != n_features:
        raise ValueError(f"the input has {n_tokens} image tokens (id {image_token_id}) but the images "
                         f"give {n_features} features ({num_images} images x {tokens_per_image} tokens)")


def merge_image_features(embeds, is_image, features):
    """Writes image features into the image-token positions, in reading order.

    embeds (b, t, d); is_image (b, t) bool; features (n, k, d) for n images of k tokens.
    The i-th image token of the flattened batch (row-major) gets feature row i of
    `features.reshape(n * k, d)`. Example with b = 1, t = 5, two 1-token images f0, f1:

        is_image = [[0, 1, 0, 1, 0]]  ->  [[e0, f0, e2, f1, e4]]

    The counts must agree (`check_image_tokens`); inside jit they cannot be checked.
    """
    b, t, d = embeds.shape
    flat = features.reshape(-1, d).astype(embeds.dtype)
    if flat.shape[0] == 0:
        return embeds
    index = jnp.cumsum(is_image.reshape(-1)) - 1
    gathered = flat[jnp.clip(index, 0, flat.shape[0] - 1)].reshape(b, t, d)
    return jnp.where(is_image[..., None], gathered, embeds)


def image_features(mcfg: MLLMConfig, params: dict, images):
    """images (n, H, W, C) normalised NHWC -> (n, tokens_per_image, llm_hidden)."""
    vision = models.build(mcfg.vision).apply({"params": params["vision"]}, images)["tokens"]
    return models.build(mcfg.projector).apply({"params": params["projector"]}, vision)


def forward(mcfg: MLLMConfig, params: dict, tokens, positions, segment_ids, images=None,
            mode: str = "multimodal"):
    """Logits (b, t, vocab) float32 of the model in `mode` (jit-friendly; `mode` static)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if mode == "text":
        if images is not None:
            raise ValueError("mode='text' runs the base LLM alone and takes no images")
        return models.build(mcfg.llm).apply({"params": params["llm"]}, tokens, positions, segment_ids)
    llm_params = multimodal_llm_params(params["llm"], params.get("branch", {}))
    return decode(mcfg, multimodal_decoder(mcfg), llm_params, params, tokens, positions, segment_ids, images)


def decode(mcfg: MLLMConfig, decoder, llm_params: dict, params: dict, tokens, positions, segment_ids,
           images=None):
    """Runs `decoder` (a `DecoderLM`) with `llm_params` on a multimodal input: image features
    from `params["vision"]` / `params["projector"]` fill the image-token slots, and token
    types route expert layers. `forward` uses it with the merged branch; deployment uses it
    with LoRA-folded weights (`fold_lora`)."""
    embeds = decoder.apply({"params": llm_params}, tokens, method="embed")
    is_image = tokens == mcfg.image_token_id
    if images is not None:
        embeds = merge_image_features(embeds, is_image, image_features(mcfg, params, images))
    return decoder.apply({"params": llm_params}, tokens, positions, segment_ids,
                         inputs_embeds=embeds, token_types=is_image.astype(jnp.int32))


def abstract_mllm(mcfg: MLLMConfig) -> dict:
    """Shapes of every component (nothing allocated)."""
    return {"llm": models.abstract_params(mcfg.llm), "vision": models.abstract_params(mcfg.vision),
            "projector": models.abstract_params(mcfg.projector), "branch": abstract_branch(mcfg)}


def init_mllm(mcfg: MLLMConfig, rng, *, llm: dict | None = None, vision: dict | None = None) -> dict:
    """A fresh MLLM around a given (pretrained) base LLM and vision tower, or random ones."""
    k_llm, k_vit, k_proj, k_branch = jax.random.split(rng, 4)
    llm = llm if llm is not None else models.init_params(mcfg.llm, k_llm)
    return {"llm": llm,
            "vision": vision if vision is not None else models.init_params(mcfg.vision, k_vit),
            "projector": models.init_params(mcfg.projector, k_proj),
            "branch": init_branch(mcfg, llm, k_branch)}
