"""Model core: configs and presets, the decoder LLM, the SigLIP tower, the projector.

`build(cfg)` gives the Flax module of any config; `abstract_params(cfg)` its parameter
shapes without allocating anything (`jax.eval_shape`), which is how parameter counts are
reported and how sharded initialisation / loading is planned.

    >>> from genieblue_jax import models
    >>> models.count_params(models.abstract_params(models.get_preset("qwen2.5-3b")))
    3085938688
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from genieblue_jax.models.configs import PRESETS, LLMConfig, ProjectorConfig, VisionConfig, config_from_dict, get_preset
from genieblue_jax.models.layers import BATCH_AXES, batch_shards, shard_batch
from genieblue_jax.models.llm import DecoderLM
from genieblue_jax.models.projector import Projector, vila_downsample
from genieblue_jax.models.siglip import SiglipVisionTower

__all__ = ["LLMConfig", "VisionConfig", "ProjectorConfig", "PRESETS", "get_preset",
           "config_from_dict", "BATCH_AXES", "batch_shards", "shard_batch", "DecoderLM", "SiglipVisionTower",
           "Projector", "vila_downsample", "build", "example_inputs", "abstract_params", "init_params",
           "count_params", "flatten", "unflatten"]


def build(cfg):
    """The Flax module for a config."""
    if isinstance(cfg, LLMConfig):
        return DecoderLM(cfg)
    if isinstance(cfg, VisionConfig):
        return SiglipVisionTower(cfg)
    if isinstance(cfg, ProjectorConfig):
        return Projector(cfg)
    raise TypeError(f"no model for config type {type(cfg).__name__}")


def example_inputs(cfg) -> tuple:
    """Smallest inputs that trace every parameter of `build(cfg)` (used by init)."""
    if isinstance(cfg, LLMConfig):
        ones = jnp.ones((1, 1), jnp.int32)
        return (ones, jnp.zeros((1, 1), jnp.int32), ones)
    if isinstance(cfg, VisionConfig):
        return (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)
    if isinstance(cfg, ProjectorConfig):
        return (jnp.zeros((1, 4, cfg.vision_hidden_size), jnp.float32),)
    raise TypeError(f"no model for config type {type(cfg).__name__}")


def _init_fn(cfg):
    module, inputs = build(cfg), example_inputs(cfg)
    return lambda rng: module.init(rng, *inputs)["params"]


@functools.lru_cache(maxsize=64)
def _abstract_params(cfg):
    return jax.eval_shape(_init_fn(cfg), jax.random.key(0))


def abstract_params(cfg):
    """Parameter tree of ShapeDtypeStructs; allocates nothing. Cached per config (configs
    are frozen); each call returns its own dict structure, safe to modify."""
    return jax.tree.map(lambda x: x, _abstract_params(cfg))


def init_params(cfg, rng, shardings=None):
    """Random initialisation, created directly in `shardings` (a tree matching
    `abstract_params(cfg)`, e.g. from `genieblue_jax.sharding.param_shardings`): each device
    only ever holds its own shards, never the whole model."""
    return jax.jit(_init_fn(cfg), out_shardings=shardings)(rng)


def count_params(tree) -> int:
    """Number of elements over all array leaves of `tree` (arrays or ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def flatten(tree, sep: str = "/") -> dict:
    """{"a/b/c": leaf} for a nested dict tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[sep.join(str(getattr(k, "key", k)) for k in path)] = leaf
    return out


def unflatten(flat: dict, sep: str = "/") -> dict:
    """Inverse of `flatten`: {"a/b/c": leaf} -> {"a": {"b": {"c": leaf}}}."""
    tree: dict = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree
