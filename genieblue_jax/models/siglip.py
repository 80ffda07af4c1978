"""SigLIP vision tower in Flax linen (Hugging Face `SiglipVisionModel` semantics).

Images are NHWC (batch, H, W, C) tiles: uint8 as the data pipeline delivers them, normalised
on device by `normalize_pixels` (HF `SiglipImageProcessor`: x / 255, then (x - 0.5) / 0.5), or
float already normalised (HF `pixel_values`).
Parameter tree (1:1 with HF `vision_model.*`, see `genieblue_jax.hf.tables`):

    embeddings/patch_embedding/{kernel (p, p, C, hidden), bias}
    embeddings/position_embedding/embedding      (num_patches, hidden)
    encoder/layers_{i}/layer_norm{1,2}/{scale,bias}
    encoder/layers_{i}/self_attn/{q,k,v,out}_proj/{kernel,bias}
    encoder/layers_{i}/mlp/fc{1,2}/{kernel,bias}
    post_layernorm/{scale,bias}
    head/probe (1, 1, hidden), head/attention/{in_proj,out_proj}/{kernel,bias},
    head/layernorm, head/mlp/fc{1,2}                only when cfg.use_head
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genieblue_jax.models.configs import VisionConfig
from genieblue_jax.models.layers import dense, layer_norm, shard_batch
from genieblue_jax.models.scan import run_scanned

# SigLIP's normalisation of each uint8 value, (x / 255 - 0.5) / 0.5, computed once in numpy
# float32: looked up on device, the result is bitwise the host's (`data_pipelines.images.normalize`,
# HF's processor), which a traced formula is not (XLA turns x / 255 into x * (1 / 255)).
_NORMALIZED_UINT8 = (np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def normalize_pixels(pixels):
    """uint8 tiles (..., H, W, C) -> float32 in [-1, 1], on device: (x / 255 - 0.5) / 0.5, as
    HF `SiglipImageProcessor` (rescale 1/255, mean 0.5, std 0.5) and, on the host,
    `data_pipelines.images.normalize`, bitwise (a 256-entry table lookup). Float input is taken
    as already normalised and returned as is, so the tower accepts both the pipeline's uint8
    tiles and HF `pixel_values`.

        >>> normalize_pixels(jnp.array([0, 255], jnp.uint8))
        Array([-1.,  1.], dtype=float32)
    """
    if pixels.dtype != jnp.uint8:
        return pixels
    return jnp.asarray(_NORMALIZED_UINT8)[pixels.astype(jnp.int32)]


def _attend(q, k, v, num_heads: int, dtype):
    """Unmasked multi-head attention; q: (b, t, D), k/v: (b, s, D). Softmax in float32."""
    b, t, dim = q.shape
    d = dim // num_heads
    q, k, v = (x.reshape(x.shape[0], x.shape[1], num_heads, d) for x in (q, k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * d ** -0.5
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, dim)


class SiglipMLP(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, as `SiglipMLP`."""
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x):
        x = dense(self.cfg, self.cfg.intermediate_size, "fc1")(x)
        return dense(self.cfg, self.cfg.hidden_size, "fc2")(nn.gelu(x, approximate=True))


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases, as `SiglipAttention`."""
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        q, k, v = (dense(cfg, cfg.hidden_size, f"{n}_proj")(x) for n in "qkv")
        return dense(cfg, cfg.hidden_size, "out_proj")(_attend(q, k, v, cfg.num_heads, cfg.compute_dtype))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN encoder layer: x + attn(LN(x)), then + mlp(LN(.)), as `SiglipEncoderLayer`."""
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = x + SiglipAttention(cfg, name="self_attn")(layer_norm(cfg, "layer_norm1")(x))
        return x + SiglipMLP(cfg, name="mlp")(layer_norm(cfg, "layer_norm2")(x))


class SiglipPoolingHead(nn.Module):
    """Multihead attention pooling (MAP): a learned probe attends over all tokens.

    Mirrors HF's `SiglipMultiheadAttentionPoolingHead`. Its `torch.nn.MultiheadAttention`
    stores q/k/v as one packed `in_proj` (3 * hidden outputs, q first); we keep that packing
    so that parameter names stay 1:1 with HF.
    """

    cfg: VisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dim = cfg.hidden_size
        probe = self.param("probe", nn.initializers.normal(cfg.initializer_range), (1, 1, dim),
                           cfg.params_dtype)
        query = jnp.broadcast_to(probe.astype(cfg.compute_dtype), (x.shape[0], 1, dim))
        out = _PackedAttention(cfg, name="attention")(query, x)
        out = out + SiglipMLP(cfg, name="mlp")(layer_norm(cfg, "layernorm")(out))
        return out[:, 0]


class _PackedAttention(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, query, kv):
        cfg = self.cfg
        dim = cfg.hidden_size
        in_proj = dense(cfg, 3 * dim, "in_proj")
        q = in_proj(query)[..., :dim]
        kv = in_proj(kv)
        attn = _attend(q, kv[..., dim:2 * dim], kv[..., 2 * dim:], cfg.num_heads, cfg.compute_dtype)
        return dense(cfg, dim, "out_proj")(attn)


class _Embeddings(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, pixels):
        cfg = self.cfg
        init = nn.initializers.normal(cfg.initializer_range)
        x = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size),
                    strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                    dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, kernel_init=init,
                    name="patch_embedding")(pixels.astype(cfg.compute_dtype))
        x = x.reshape(x.shape[0], cfg.num_patches, cfg.hidden_size)  # row-major grid, as HF
        pos = nn.Embed(cfg.num_patches, cfg.hidden_size, dtype=cfg.compute_dtype,
                       param_dtype=cfg.params_dtype, embedding_init=init, name="position_embedding")
        return x + pos(jnp.arange(cfg.num_patches))[None]


class _Encoder(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x, run_layers: int, select: int):
        """Runs the first `run_layers` layers; returns (hidden_states[select], last output)."""
        x = shard_batch(x)
        if self.cfg.scan_layers and not self.is_initializing():
            params = self.variables["params"]
            apply_layer = lambda i, p, h: SiglipEncoderLayer(self.cfg, parent=None).apply({"params": p}, h)
            selected = run_scanned(apply_layer, params, ("encoder",) * select, x, remat=self.cfg.remat)
            if run_layers == select:
                return selected, selected
            rest = run_scanned(apply_layer, params, ("encoder",) * (run_layers - select), selected,
                               remat=self.cfg.remat, offset=select)
            return selected, rest
        selected = x
        layer = nn.remat(SiglipEncoderLayer) if self.cfg.remat else SiglipEncoderLayer
        for i in range(run_layers):
            x = shard_batch(layer(self.cfg, name=f"layers_{i}")(x))
            if i + 1 == select:
                selected = x
        return selected, x


class SiglipVisionTower(nn.Module):
    """`__call__(pixels) -> {"tokens": (b, num_patches, hidden), "pooled": (b, hidden) | None}`.

    `tokens` are the features picked by `cfg.select_layer` (see `VisionConfig`); `pooled` is
    the attention-pooling head's output on `last_hidden_state`, computed only with
    `with_pooled=True` (it needs every layer). Layers after the selected one are skipped,
    except at init, where every parameter is created.
    """

    cfg: VisionConfig

    @nn.compact
    def __call__(self, pixels, with_pooled: bool = False):
        """pixels (b, H, W, C): uint8 tiles or normalised float (`normalize_pixels`)."""
        cfg = self.cfg
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"pixels have shape {pixels.shape}; this tower expects NHWC "
                             f"(batch, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels})")
        if with_pooled and not cfg.use_head:
            raise ValueError("with_pooled=True but this tower has no pooling head (use_head=False)")
        x = _Embeddings(cfg, name="embeddings")(normalize_pixels(pixels))
        select = cfg.num_layers if cfg.select_layer == -1 else cfg.select_layer % (cfg.num_layers + 1)
        run_all = with_pooled or self.is_initializing()
        selected, final = _Encoder(cfg, name="encoder")(x, cfg.num_layers if run_all else select, select)
        post_layernorm = layer_norm(cfg, "post_layernorm")
        if cfg.select_layer == -1:
            selected = post_layernorm(selected)
        pooled = None
        if run_all:
            last_hidden = post_layernorm(final)
            if cfg.use_head:
                pooled = SiglipPoolingHead(cfg, name="head")(last_hidden)
        return {"tokens": selected, "pooled": pooled if with_pooled else None}
