"""Layer constructors shared by every model: the config decides dtypes and initialisers.

Any of our configs works (`compute_dtype`, `params_dtype`, `initializer_range`; plus
`layer_norm_eps` for LayerNorm), so every Dense and LayerNorm is built the same way.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over


class Dense(nn.Dense):
    """`nn.Dense` (same parameters, same result) applied to a 2-d (tokens, features) view
    of its input: XLA:CPU computes the weight gradient of a 2-d matmul 1.4x faster than
    the batched (batch, seq) contraction a 3-d input gives."""

    def __call__(self, inputs):
        lead = inputs.shape[:-1]
        return super().__call__(inputs.reshape(-1, inputs.shape[-1])).reshape(*lead, self.features)


def dense(cfg, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    """Our `Dense` (kernel (in, features)) in `cfg`'s compute / parameter dtypes, N(0, initializer_range) init."""
    return Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


def layer_norm(cfg, name: str) -> nn.LayerNorm:
    """flax LayerNorm (scale, bias) with `cfg.layer_norm_eps` in `cfg`'s dtypes (SigLIP, projector)."""
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                        param_dtype=cfg.params_dtype, name=name)


def _batch_mesh_axes() -> tuple[str, ...]:
    mesh = jax.sharding.get_abstract_mesh()
    return tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)


def batch_shards(rows: int) -> int:
    """How many devices' shares `rows` batch rows are split into under the mesh being traced
    (the product of its batch axes); 1 without a mesh or when `rows` does not divide."""
    axes = _batch_mesh_axes()
    mesh = jax.sharding.get_abstract_mesh()
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    return shards if rows % shards == 0 else 1


def shard_batch(x):
    """Pins the leading (batch) dimension of an activation to the mesh's batch axes.

    Active only while tracing under a mesh (the trainer's step runs under
    `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`); a no-op otherwise, or when the
    batch does not divide. Why: with FSDP the weights are sharded over `fsdp` too, and
    without the pin XLA may keep a weight sharded and gather the activations instead. The
    LM head did exactly that: every device computed the logits of the whole batch.
    """
    if batch_shards(x.shape[0]) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, P(_batch_mesh_axes()))
