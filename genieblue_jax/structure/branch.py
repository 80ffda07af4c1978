"""The multimodal branch tree: its layout, its initialisation from the base, LoRA folding.

The branch holds only what the multimodal path adds to the frozen base LLM, under the
base's own parameter names, so `merge_trees(base, branch)` is the multimodal decoder's
parameter tree (the base is referenced, never copied):

    genieblue  layers_{i}/...                     whole replicated block i (all its leaves)
               layers_{j}/self_attn/q_proj/lora_a  (in, r)   LoRA on block j
               layers_{j}/self_attn/q_proj/lora_b  (r, out)
    cogvlm     layers_{i}/self_attn/vision_q_proj/kernel ... visual expert of block i
               (q, k, v, o, gate, up, down; no norms) + LoRA leaves on the other blocks
    lora       LoRA leaves on every block
    full       empty (the LLM itself trains)
"""
from __future__ import annotations

import functools
import re
import zlib

import jax
import jax.numpy as jnp

from genieblue_jax import models
from genieblue_jax.models.lora import lora_a_init
from genieblue_jax.models.scan import merge_trees
from genieblue_jax.structure.config import MLLMConfig

_LAYER = re.compile(r"^layers_(\d+)/")


def multimodal_decoder(mcfg: MLLMConfig) -> models.DecoderLM:
    """The decoder module of the multimodal path (LoRA / expert layers per the structure)."""
    return models.DecoderLM(mcfg.llm, mcfg.layer_kinds, mcfg.structure.lora_spec)


@functools.lru_cache(maxsize=64)
def _abstract_multimodal(mcfg: MLLMConfig) -> dict:
    """Flat {path: ShapeDtypeStruct} of the whole multimodal decoder (nothing allocated)."""
    decoder = multimodal_decoder(mcfg)
    return models.flatten(jax.eval_shape(
        lambda r: decoder.init(r, *models.example_inputs(mcfg.llm))["params"], jax.random.key(0)))


def branch_sources(mcfg: MLLMConfig) -> dict[str, tuple[str, str | None]]:
    """For every branch leaf (path inside the LLM tree): how it is initialised.

    ("copy", base_path) copies a base leaf (replicated blocks, visual experts);
    ("lora_a", None) random; ("zeros", None) for lora_b.
    """
    if mcfg.structure.variant == "full":
        return {}
    replicated = set(mcfg.structure.selected_layers(mcfg.llm.num_layers)) if (
        mcfg.structure.variant == "genieblue") else set()
    sources = {}
    for path in _abstract_multimodal(mcfg):
        m = _LAYER.match(path)
        leaf = path.rsplit("/", 1)[-1]
        if m and int(m.group(1)) in replicated:
            sources[path] = ("copy", path)
        elif leaf == "lora_a":
            sources[path] = ("lora_a", None)
        elif leaf == "lora_b":
            sources[path] = ("zeros", None)
        elif "/vision_" in path:
            # CogVLM initialises each visual expert from the language weights it shadows.
            sources[path] = ("copy", path.replace("/vision_", "/"))
    return sources


def abstract_branch(mcfg: MLLMConfig) -> dict:
    """Shapes and dtypes (ShapeDtypeStructs) of the branch `init_branch` makes: replicated blocks
    or experts and LoRA adapters, named as in the multimodal decoder."""
    abstract = _abstract_multimodal(mcfg)
    return models.unflatten({p: abstract[p] for p in branch_sources(mcfg)})


def init_branch(mcfg: MLLMConfig, base_llm: dict, rng, shardings=None) -> dict:
    """A fresh branch: replicated blocks / experts are exact copies of the base weights (new
    buffers, so training them can never alias the frozen base), LoRA A random, B zero.
    Jitted, so with `shardings` every leaf is created in place on its devices."""
    sources = branch_sources(mcfg)
    abstract = _abstract_multimodal(mcfg)

    def build(base_llm, rng):
        base = models.flatten(base_llm)
        out = {}
        for path, (how, src) in sources.items():
            shape, dtype = abstract[path].shape, abstract[path].dtype
            if how == "copy":
                out[path] = jnp.copy(base[src])  # explicit: never forward the base buffer
            elif how == "lora_a":
                out[path] = lora_a_init(jax.random.fold_in(rng, zlib.crc32(path.encode())), shape, dtype)
            else:
                out[path] = jnp.zeros(shape, dtype)
        return models.unflatten(out)

    return jax.jit(build, out_shardings=shardings)(base_llm, rng)


def multimodal_llm_params(base_llm: dict, branch: dict) -> dict:
    """Parameter tree of the multimodal decoder: the base with the branch swapped / added in."""
    return merge_trees(base_llm, branch)


def fold_lora(mcfg: MLLMConfig, base_llm: dict, branch: dict) -> tuple[dict, tuple[str, ...]]:
    """Folds every adapter into its kernel: W' = W + A B * alpha / r.

    Returns (llm_params, layer_kinds) of a decoder with no LoRA left: for `genieblue` and
    `lora` a plain dense LLM (`layer_kinds` all "base") that runs on any LLM runtime; for
    `cogvlm` the expert layers stay ("expert" kinds keep their routing).
    """
    scale = mcfg.structure.lora_spec.scale
    flat = models.flatten(multimodal_llm_params(base_llm, branch))
    out = {}
    for path, value in flat.items():
        if path.endswith(("/lora_a", "/lora_b")):
            continue
        prefix = path[: -len("kernel")]
        if path.endswith("/kernel") and prefix + "lora_a" in flat:
            a = jnp.asarray(flat[prefix + "lora_a"], jnp.float32)
            b = jnp.asarray(flat[prefix + "lora_b"], jnp.float32)
            value = (jnp.asarray(value, jnp.float32) + (a @ b) * scale).astype(value.dtype)
        out[path] = value
    kinds = tuple("base" if k == "lora" else k for k in mcfg.layer_kinds)
    return models.unflatten(out), kinds


