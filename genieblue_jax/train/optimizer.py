"""AdamW as in the paper's Appendix D, built for the trainable tree only.

    schedule      linear warm-up to `lr`, then cosine decay to 0 at `steps`
    weight decay  on matrices only: not on norms, biases, position embeddings, the probe
    ViT layer-wise LR decay  encoder layer i (0-based) of L gets lr * decay ** (L - 1 - i): the
                  top layer and everything after it (post-LayerNorm, projector, LLM branch)
                  get lr; patch / position embeddings, one step below layer 0, decay ** L
    ViT LR scale  every vision-tower leaf's lr is further multiplied by `vit_lr_scale` (1 in the
                  paper's recipe; the demo's randomly initialised tower trains at 0.1, see
                  experiments/configs/common.py)
    clipping      global-norm clipping before Adam

The optimizer sees only the trainable tree, so its state exists for trainable leaves only.

    >>> [layer_lr_scale(f"vision/encoder/layers_{i}/mlp/fc1/kernel", 4, 0.5) for i in range(4)]
    [0.125, 0.25, 0.5, 1.0]
    >>> layer_lr_scale("vision/embeddings/patch_embedding/kernel", 4, 0.5)
    0.0625
    >>> (layer_lr_scale("vision/post_layernorm/scale", 4, 0.5, vit_scale=0.1),
    ...  layer_lr_scale("projector/linear_1/kernel", 4, 0.5, 0.1))
    (0.1, 1.0)
    >>> no_weight_decay("llm/layers_0/input_layernorm/scale"), no_weight_decay("branch/layers_0/mlp/up_proj/kernel")
    (True, False)

The rules read stacked layers (`trainer.to_step_layout`: layers 1, 5, ..., 33 as one leaf)
the same way:

    >>> no_weight_decay("branch/layers_1-33:4/input_layernorm/scale"), layer_lr_scale("branch/layers_1-33:4/x", 4, 0.5)
    (True, 1.0)
"""
from __future__ import annotations

import re

import jax
import optax

from genieblue_jax import models
from genieblue_jax import rules as rules_lib

# Weight decay per parameter (genieblue_jax.rules: first full match wins): none on biases, norm
# scales, position embeddings and the attention-pooling probe; every other (matrix) leaf decays.
DECAY_RULES = ((r".*/bias", False), (r".*(norm\d?|layernorm|layer_norm\d?)/scale", False),
               (r".*position_embedding/embedding", False), (r".*/probe", False), (r".*", True))
_VIT_LAYER = re.compile(r"^vision/encoder/layers_(\d+)/")


def no_weight_decay(name: str) -> bool:
    """True when `name` (a flat parameter name) gets no weight decay (DECAY_RULES)."""
    return not rules_lib.first_match(DECAY_RULES, name, what="weight-decay rule")


def layer_lr_scale(name: str, num_vit_layers: int, decay: float, vit_scale: float = 1.0) -> float:
    """The learning-rate factor of parameter `name` (module docstring: ViT layer-wise decay)."""
    m = _VIT_LAYER.match(name)
    if m:
        return vit_scale * decay ** (num_vit_layers - 1 - int(m.group(1)))
    if name.startswith("vision/embeddings/"):
        return vit_scale * decay ** num_vit_layers
    return vit_scale if name.startswith("vision/") else 1.0


def schedule(lr: float, warmup_steps: int, steps: int):
    """optax schedule: step -> learning rate, linear warm-up from 0 to `lr` over `warmup_steps`
    (at least 1), then cosine decay to 0 at `steps` (Appendix D of the paper).

        >>> s = schedule(1e-3, 10, 100)
        >>> [round(float(s(step)), 7) for step in (0, 5, 10, 55, 100)]
        [0.0, 0.0005, 0.001, 0.0005, 0.0]
    """
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1), 0.0)


def _scale_by_tree(factors):
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * f, updates, factors), state

    return optax.GradientTransformation(init, update)


def make_optimizer(trainable: dict, *, lr: float, warmup_steps: int, steps: int, b1: float, b2: float,
                   eps: float, weight_decay: float, clip_norm: float, vit_layer_decay: float,
                   num_vit_layers: int, vit_lr_scale: float = 1.0) -> optax.GradientTransformation:
    """AdamW for the `trainable` tree only (its leaves name the parameters: see the module
    docstring): global-norm clipping at `clip_norm`, Adam (`b1`, `b2`, `eps`), decoupled weight
    decay `weight_decay` on the leaves `DECAY_RULES` decays, the `schedule`, then the per-leaf
    ViT factors (`layer_lr_scale`: layer-wise decay `vit_layer_decay` over `num_vit_layers`
    encoder layers, times `vit_lr_scale`). The optimizer state has the trainable tree's
    structure: frozen weights get none."""
    flat = models.flatten(trainable)
    decay_mask = models.unflatten({n: not no_weight_decay(n) for n in flat})
    lr_scales = models.unflatten({n: layer_lr_scale(n, num_vit_layers, vit_layer_decay, vit_lr_scale) for n in flat})
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule(lr, warmup_steps, steps)),
        _scale_by_tree(lr_scales),
    )
