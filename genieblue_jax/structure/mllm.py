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
from genieblue_jax.models import scan as scan_lib
from genieblue_jax.models.llm import scan_signatures
from genieblue_jax.structure.branch import abstract_branch, init_branch, multimodal_decoder, multimodal_llm_params
from genieblue_jax.structure.config import LLM_COMPONENTS, MODES, MLLMConfig


def check_image_tokens(tokens, image_token_id: int, image_valid, tokens_per_tile: int) -> None:
    """Host-side check, per row, that the image tokens and the valid tiles agree.

    tokens (b, t); image_valid (b, P) bool (which tile slots of each row hold a tile).
    """
    tokens, image_valid = np.asarray(tokens), np.asarray(image_valid, bool)
    n_tokens = (tokens == image_token_id).sum(axis=1)
    n_features = image_valid.sum(axis=1) * tokens_per_tile
    for row in np.nonzero(n_tokens != n_features)[0]:
        raise ValueError(f"row {row}: the input has {n_tokens[row]} image tokens (id {image_token_id}) but "
                         f"its images give {n_features[row]} features ({image_valid[row].sum()} tiles x "
                         f"{tokens_per_tile} tokens)")


def merge_image_features(embeds, is_image, features):
    """Writes each row's image features into its image-token positions, in reading order.

    embeds (b, t, d); is_image (b, t) bool; features (b, n, d): the i-th image token of
    row r gets features[r, i]. Rows may carry padding features after the used ones.
    Example with one row, t = 5 and two image features f0, f1:

        is_image = [[0, 1, 0, 1, 0]]  ->  [[e0, f0, e2, f1, e4]]

    The counts must agree (`check_image_tokens`); inside jit they cannot be checked.
    """
    if features.shape[1] == 0:
        return embeds
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features.astype(embeds.dtype), index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, embeds)


def image_features(mcfg: MLLMConfig, params: dict, tiles):
    """tiles (n, S, S, C) -> (n, tokens_per_tile, llm_hidden): vision tower, then projector,
    on every tile given. tiles: uint8 as the pipeline delivers them (normalised on device) or
    normalised float (HF `pixel_values`); see `models.siglip.normalize_pixels`."""
    vision = models.build(mcfg.vision).apply({"params": params["vision"]}, tiles)["tokens"]
    return models.build(mcfg.projector).apply({"params": params["projector"]}, vision)


def embed_image_tokens(mcfg: MLLMConfig, params: dict, embeds, is_image, images):
    """Image features written into the image-token slots of `embeds`, computing the vision
    tower and projector on the real tiles only.

    embeds (b, t, d); is_image (b, t) bool; images (b, P, S, S, C): each row's tiles in the
    order of its image tokens, real tiles first, then padding slots (as the pipeline's packed
    rows and `stack_tiles` lay them out). A row's real tiles are its image tokens divided by
    `tokens_per_tile`.

    How padding is skipped with static shapes: the rows are split into one group per batch
    shard (the rows one device holds; a single group without a mesh), each group's real
    tiles are gathered to the front of a flat buffer of capacity rows x P (a gather within the
    device), and the tower runs over that buffer in calls of `vision.tiles_per_call` tiles, a
    `lax.cond` skipping every call past the fullest group's last real tile. A group's
    features are then in the order of its image tokens (rows in order, each row's tiles in
    order), and fill them by a running count as in `merge_image_features`. Example: 2 rows,
    P = 4, real tiles (1, 0), tiles_per_call 1, one group: the tower runs once, on one tile.
    """
    b, p = images.shape[:2]
    groups = models.batch_shards(b)
    n_real = jnp.sum(is_image, axis=1) // mcfg.tokens_per_tile                # (b,)
    real = jnp.arange(p)[None, :] < n_real[:, None]                          # (b, P)
    capacity = (b // groups) * p
    # Real slots first within each group, in (row, slot) order: a stable sort on "is padding".
    order = jnp.argsort(~real.reshape(groups, capacity), axis=1, stable=True)
    flat = images.reshape(groups, capacity, *images.shape[2:])
    flat = jnp.take_along_axis(flat, order.reshape(groups, capacity, *(1,) * (images.ndim - 2)), axis=1)
    count = jnp.sum(real.reshape(groups, capacity), axis=1)                  # (groups,)
    per_call = min(mcfg.vision.tiles_per_call, capacity)
    calls = -(-capacity // per_call)
    flat = jnp.pad(flat, ((0, 0), (0, calls * per_call - capacity)) + ((0, 0),) * (images.ndim - 2))
    chunks = models.shard_batch(flat.reshape(groups, calls, per_call, *images.shape[2:]).swapaxes(0, 1))
    tokens, d = mcfg.tokens_per_tile, mcfg.llm.hidden_size
    dtype = embeds.dtype
    most = jnp.max(count)

    def run(chunk):  # (groups, per_call, S, S, C) -> (groups, per_call, tokens, d)
        feats = image_features(mcfg, params, chunk.reshape(groups * per_call, *chunk.shape[2:]))
        return feats.astype(dtype).reshape(groups, per_call, tokens, d)

    def call(_, xs):
        j, chunk = xs
        return None, jax.lax.cond(j * per_call < most, run,
                                  lambda c: jnp.zeros((groups, per_call, tokens, d), dtype), chunk)

    _, feats = jax.lax.scan(call, None, (jnp.arange(calls), chunks))         # (calls, groups, per_call, ...)
    feats = feats.swapaxes(0, 1).reshape(groups, calls * per_call * tokens, d)
    grouped = merge_image_features(embeds.reshape(groups, (b // groups) * embeds.shape[1], d),
                                   is_image.reshape(groups, -1), feats)
    return grouped.reshape(embeds.shape)


def forward(mcfg: MLLMConfig, params: dict, tokens, positions, segment_ids, images=None,
            mode: str = "multimodal"):
    """Logits (b, t, vocab) float32 of the model in `mode` (jit-friendly; `mode` static).

    `images` (b, P, H, W, C): each row's tiles in the order of its image tokens, real tiles
    first (as the data pipeline's packed batches carry them; uint8 or normalised float), or
    None for text-only input. The vision tower runs on the real tiles only
    (`embed_image_tokens`)."""
    hidden, unembed = forward_hidden(mcfg, params, tokens, positions, segment_ids, images, mode)
    return unembed(hidden)


def forward_hidden(mcfg: MLLMConfig, params: dict, tokens, positions, segment_ids, images=None,
                   mode: str = "multimodal"):
    """`forward` without the LM head: (final-norm hidden states (b, t, hidden), `unembed`),
    where `unembed(h)` maps any (..., hidden) slice of them to float32 logits. Training
    applies the head a chunk of positions at a time, so the (b, t, vocab) logits of a long
    row (4096 x 151,936 floats = 2.5 GB for Qwen2.5) never exist at once."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if images is not None and images.shape[1] == 0:  # rows with no tile slots (text-only batches)
        images = None
    if mode == "text":
        if images is not None:
            raise ValueError("mode='text' runs the base LLM alone and takes no images")
        decoder, llm_params = models.build(mcfg.llm), params["llm"]
        hidden = decoder.apply({"params": llm_params}, tokens, positions, segment_ids, return_hidden=True)
    else:
        decoder = multimodal_decoder(mcfg)
        llm_params = multimodal_llm_params(params["llm"], params.get("branch", {}))
        hidden = decode(mcfg, decoder, llm_params, params, tokens, positions, segment_ids, images,
                        return_hidden=True)
    return hidden, lambda h: decoder.apply({"params": llm_params}, h, method="unembed")


def decode(mcfg: MLLMConfig, decoder, llm_params: dict, params: dict, tokens, positions, segment_ids,
           images=None, return_hidden: bool = False):
    """Runs `decoder` (a `DecoderLM`) with `llm_params` on a multimodal input: image features
    from `params["vision"]` / `params["projector"]` fill the image-token slots, and token
    types route expert layers. `forward` uses it with the merged branch; deployment uses it
    with LoRA-folded weights (`fold_lora`)."""
    embeds = decoder.apply({"params": llm_params}, tokens, method="embed")
    is_image = tokens == mcfg.image_token_id
    if images is not None:
        embeds = embed_image_tokens(mcfg, params, embeds, is_image, images)
    return decoder.apply({"params": llm_params}, tokens, positions, segment_ids,
                         inputs_embeds=embeds, token_types=is_image.astype(jnp.int32), return_hidden=return_hidden)


def stack_layers(mcfg: MLLMConfig, params: dict, stack=None) -> dict:
    """`params` (any part of the MLLM tree, e.g. the frozen one) with the LLM's and the branch's
    layers in the stacked layout the multimodal path's scan loops read in place
    (`models.scan.stack_layers`, slots from `models.llm.scan_signatures`: the layer kinds, and
    the attention types and RoPE of models that mix them); unchanged unless
    `mcfg.llm.scan_layers`. For training only: the text mode, generation and export take the
    named layout (`unstack_layers`).

        >>> import dataclasses
        >>> mcfg = MLLMConfig.from_presets("tiny-qwen2", "tiny-siglip")
        >>> mcfg = dataclasses.replace(mcfg, llm=mcfg.llm.replace(num_layers=8, scan_layers=True))
        >>> stacked = jax.eval_shape(lambda p: stack_layers(mcfg, p), abstract_mllm(mcfg))
        >>> sorted(stacked["llm"]), stacked["llm"]["layers_1-5:4"]["mlp"]["up_proj"]["kernel"].shape
        (['embed_tokens', 'layers_0-4:4', 'layers_1-5:4', 'layers_2-6:4', 'layers_3-7:4', 'norm'], (2, 64, 128))
    """
    if not mcfg.llm.scan_layers:
        return params
    signatures = scan_signatures(mcfg.llm, mcfg.layer_kinds)  # the slots the decoder's loops read
    return {c: scan_lib.stack_layers(p, signatures, stack) if c in LLM_COMPONENTS else p
            for c, p in params.items()}


def unstack_layers(params: dict, unstack=None) -> dict:
    """Inverse of `stack_layers`: every component in the named (Hugging Face) layout."""
    return {c: scan_lib.unstack_layers(p, unstack) if c in LLM_COMPONENTS else p for c, p in params.items()}


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
