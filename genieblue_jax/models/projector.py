"""VILA / BlueLM-V-3B projector: 2x2 token downsampler, then LayerNorm -> Linear -> GELU -> Linear.

Parameter tree: layer_norm/{scale,bias}, linear_1/{kernel,bias}, linear_2/{kernel,bias}.
GELU is the exact (erf) form: VILA builds the MLP with `torch.nn.GELU()`.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from genieblue_jax.models.configs import ProjectorConfig
from genieblue_jax.models.layers import dense, layer_norm


def downsampled_grid(num_tokens: int) -> int:
    """Side of the grid after downsampling a square grid of `num_tokens`: ceil(g / 2)."""
    g = math.isqrt(num_tokens)
    if g * g != num_tokens:
        raise ValueError(f"{num_tokens} vision tokens do not form a square grid")
    return (g + 1) // 2


def vila_downsample(tokens):
    """VILA's `DownSampleBlock`: (b, g*g, c) -> (b, ceil(g/2)^2, 4c).

    The g x g grid (row-major, as the vision tower emits it) is zero-padded at the bottom
    and right to an even side, then each 2x2 group is concatenated along channels. The
    exact channel and token order of VILA's `flat_square` is kept, so projector weights
    trained there work here. For output token (p, q) (row-major over the g/2 x g/2 grid):

        out[p * (g/2) + q] = concat(x[2q, 2p], x[2q, 2p+1], x[2q+1, 2p], x[2q+1, 2p+1])

    i.e. the downsampled grid is transposed w.r.t. the input grid (a VILA quirk we keep).
    Worked example, g = 3 (9 tokens numbered by row-major position, pad = zeros):

        0 1 2        pad to     0 1 2 _      out[0] = [0, 1, 3, 4]   out[1] = [6, 7, _, _]
        3 4 5        4 x 4:     3 4 5 _      out[2] = [2, _, 5, _]   out[3] = [8, _, _, _]
        6 7 8                   6 7 8 _
                                _ _ _ _
    """
    b, n, c = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} vision tokens do not form a square grid")
    x = tokens.reshape(b, g, g, c)
    pad = g % 2
    x = jnp.pad(x, ((0, 0), (0, pad), (0, pad), (0, 0)))
    h = (g + pad) // 2
    # x[b, r, col] -> group columns in pairs: (b, r, h, 2c)
    x = x.reshape(b, 2 * h, h, 2 * c)
    x = x.transpose(0, 2, 1, 3)  # (b, colpair, r, 2c)
    x = x.reshape(b, h, h, 4 * c)  # rows in pairs -> (b, colpair, rowpair, 4c)
    return x.reshape(b, h * h, 4 * c)


class Projector(nn.Module):
    """`__call__(vision_tokens (b, g*g, vision_hidden)) -> (b, ceil(g/2)^2, llm_hidden)`."""

    cfg: ProjectorConfig

    @nn.compact
    def __call__(self, vision_tokens):
        cfg = self.cfg
        x = layer_norm(cfg, "layer_norm")(vila_downsample(vision_tokens.astype(cfg.compute_dtype)))
        x = nn.gelu(dense(cfg, cfg.llm_hidden_size, "linear_1")(x), approximate=False)
        return dense(cfg, cfg.llm_hidden_size, "linear_2")(x)
