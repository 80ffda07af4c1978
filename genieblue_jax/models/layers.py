"""Layer constructors shared by every model: the config decides dtypes and initialisers.

Any of our configs works (`compute_dtype`, `params_dtype`, `initializer_range`; plus
`layer_norm_eps` for LayerNorm), so every Dense and LayerNorm is built the same way.
"""
from __future__ import annotations

import flax.linen as nn


def dense(cfg, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


def layer_norm(cfg, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                        param_dtype=cfg.params_dtype, name=name)
