"""PyTorch modules for the parts of a GenieBlue model that have no transformers class.

The VILA projector (2x2 token downsampler + LayerNorm -> Linear -> GELU -> Linear), with
the exact token and channel order of `genieblue_jax.models.projector.vila_downsample`, so
weights exported from JAX give the same features in PyTorch:

    >>> proj = VilaProjector.from_params(projector_cfg, params["projector"])   # doctest: +SKIP
    >>> feats = proj(vision_tokens)     # (b, g*g, vision_hidden) -> (b, ceil(g/2)^2, llm_hidden)

Tensor names (`PROJECTOR_TABLE` in `genieblue_jax.hf.tables`): layer_norm.{weight,bias},
linear_1.{weight,bias}, linear_2.{weight,bias}. Needs torch (the `export` extra).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import nn

from genieblue_jax import models
from genieblue_jax.hf.tables import PROJECTOR_TABLE, resolve
from genieblue_jax.models.configs import ProjectorConfig


def vila_downsample(tokens: torch.Tensor) -> torch.Tensor:
    """(b, g*g, c) -> (b, ceil(g/2)^2, 4c), as `genieblue_jax.models.projector.vila_downsample`
    (see its docstring for the worked example: the output grid is transposed, VILA's quirk)."""
    b, n, c = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} vision tokens do not form a square grid")
    x = tokens.reshape(b, g, g, c)
    pad = g % 2
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad, 0, pad))
    h = (g + pad) // 2
    x = x.reshape(b, 2 * h, h, 2 * c).transpose(1, 2).reshape(b, h, h, 4 * c)
    return x.reshape(b, h * h, 4 * c)


class VilaProjector(nn.Module):
    """`forward(vision_tokens (b, g*g, vision_hidden)) -> (b, ceil(g/2)^2, llm_hidden)`."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.layer_norm = nn.LayerNorm(cfg.in_features, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(cfg.in_features, cfg.llm_hidden_size)
        self.linear_2 = nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(vila_downsample(vision_tokens))
        return self.linear_2(nn.functional.gelu(self.linear_1(x)))  # exact erf GELU, as VILA

    @classmethod
    def from_params(cls, cfg: ProjectorConfig, params) -> "VilaProjector":
        module = cls(cfg)
        module.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                                for k, v in projector_state_dict(cfg, params).items()})
        return module.eval()


def projector_state_dict(cfg: ProjectorConfig, params) -> dict[str, np.ndarray]:
    """Our projector parameters (nested or flat) -> {torch name: numpy array} (kernels
    transposed to torch's (out, in)); every parameter exactly once, shapes checked."""
    flat = models.flatten(dict(params))
    abstract = models.flatten(models.abstract_params(cfg))
    if set(flat) != set(abstract):
        raise ValueError(f"projector parameters {sorted(flat)} do not match the config's {sorted(abstract)}")
    out = {}
    for path, (name, transform) in resolve(PROJECTOR_TABLE, abstract).items():
        if tuple(np.shape(flat[path])) != tuple(abstract[path].shape):
            raise ValueError(f"projector parameter {path!r} has shape {np.shape(flat[path])}, "
                             f"the config needs {tuple(abstract[path].shape)}")
        out[name] = transform.to_hf(np.asarray(flat[path]))
    return out


def projector_params_from_state_dict(cfg: ProjectorConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """The inverse of `projector_state_dict` (e.g. to read a projector.safetensors back)."""
    abstract = models.flatten(models.abstract_params(cfg))
    mapping = resolve(PROJECTOR_TABLE, abstract)
    missing = sorted(name for name, _ in mapping.values() if name not in tensors)
    extra = sorted(set(tensors) - {name for name, _ in mapping.values()})
    if missing or extra:
        raise ValueError(f"projector tensors: missing {missing}, unexpected {extra}")
    return models.unflatten({path: transform.to_ours(np.asarray(tensors[name]))
                             for path, (name, transform) in mapping.items()})
