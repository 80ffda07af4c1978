"""`genieblue_jax.load(path)`: the one public entry point to a model.

    >>> import numpy as np, genieblue_jax
    >>> model = genieblue_jax.load("/ckpt/qwen2.5-3b")        # or an HF model directory
    >>> logits = model.logits(np.array([[151644, 872, 198]]))  # (1, 3, vocab) float32 numpy

Inputs are numpy (or lists); outputs are float32 numpy. Padding is given HF-style with an
`attention_mask` (1 = token, 0 = pad, left or right); packed rows with `segment_ids`.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from genieblue_jax import checkpoint, models
from genieblue_jax.models.masks import positions_from_segments


class GenieBlue:
    """A loaded model: configs and parameters of its components ("llm", "vision", ...)."""

    def __init__(self, configs: dict, params: dict, *, path: str | None = None, mesh=None):
        self.configs = dict(configs)
        self.params = dict(params)
        self.path = path
        self.mesh = mesh

    def __repr__(self):
        parts = ", ".join(f"{n}: {models.count_params(p) / 1e6:.2f}M params" for n, p in self.params.items())
        return f"GenieBlue({self.path or 'in memory'}; {parts})"

    def _component(self, name: str):
        if name not in self.configs:
            raise ValueError(f"this model ({self.path or 'in memory'}) has no {name!r} component; "
                             f"it has {sorted(self.configs)}")
        return self.configs[name], self.params[name]

    @functools.cached_property
    def _llm_forward(self):
        cfg, _ = self._component("llm")
        return jax.jit(models.build(cfg).apply)

    @functools.cached_property
    def _vision_forward(self):
        cfg, _ = self._component("vision")
        return jax.jit(models.build(cfg).apply, static_argnames="with_pooled")

    def logits(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None) -> np.ndarray:
        """Next-token logits (batch, seq, vocab), float32 numpy.

        `attention_mask` (1 = token, 0 = padding) or `segment_ids` (packed samples 1, 2, ...;
        padding 0) say which tokens belong together; positions restart in every segment
        unless given. Logits at padding positions are meaningless.
        """
        _, params = self._component("llm")
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integer (batch, seq), got {ids.dtype} {ids.shape}")
        vocab = self.configs["llm"].vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids outside [0, {vocab}): min {ids.min()}, max {ids.max()}")
        if segment_ids is None:
            segment_ids = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        elif attention_mask is not None:
            raise ValueError("give attention_mask or segment_ids, not both")
        segment_ids = np.asarray(segment_ids, np.int32).reshape(ids.shape)
        positions = (positions_from_segments(segment_ids) if positions is None
                     else np.asarray(positions, np.int32).reshape(ids.shape))
        out = self._llm_forward({"params": params}, jnp.asarray(ids, jnp.int32),
                                jnp.asarray(positions), jnp.asarray(segment_ids))
        return np.asarray(out, np.float32)

    def vision_features(self, pixel_values, *, with_pooled: bool = False):
        """SigLIP features of NHWC images normalised to [-1, 1]: {"tokens", "pooled"} numpy."""
        _, params = self._component("vision")
        out = self._vision_forward({"params": params}, jnp.asarray(pixel_values, jnp.float32),
                                   with_pooled=with_pooled)
        return {k: None if v is None else np.asarray(v, np.float32) for k, v in out.items()}


def load(path: str, *, mesh=None) -> GenieBlue:
    """Loads a genieblue_jax checkpoint, or imports a Hugging Face model directory on the fly."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if checkpoint.is_checkpoint(path):
        configs, params, _ = checkpoint.restore(path, mesh=mesh)
        return GenieBlue(configs, params, path=path, mesh=mesh)
    if os.path.isfile(os.path.join(path, "config.json")):
        from genieblue_jax.hf import import_hf
        name, cfg, params = import_hf(path, mesh=mesh)
        return GenieBlue({name: cfg}, {name: params}, path=path, mesh=mesh)
    raise FileNotFoundError(f"{path} is neither a genieblue_jax checkpoint ({checkpoint.META_FILE}) "
                            "nor a Hugging Face model directory (config.json)")
