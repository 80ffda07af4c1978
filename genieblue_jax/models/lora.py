"""LoRA for Dense layers, keeping the base parameter names (Levanter-style).

A LoRA projection owns `kernel` (and `bias`) exactly like `nn.Dense`, plus `lora_a`
(in, r) and `lora_b` (r, out):  y = x W + b + (x A) B * alpha / r.
Because the base names are unchanged, a base checkpoint loads as-is and the adapters are
just extra leaves (`.../q_proj/lora_a`), kept in the trainable branch tree.
B starts at zero, so a freshly added adapter leaves the model's function unchanged.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """LoRA adapters: rank r, alpha (the update is scaled by alpha / r, as PEFT), and the
    projections they wrap (names of LORA_TARGETS). ValueError for rank < 1 or unknown targets."""
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora targets {unknown or '()'} invalid; choose from {LORA_TARGETS}")

    @property
    def scale(self) -> float:
        """alpha / rank: the factor on the adapter's output (PEFT's `scaling`)."""
        return self.alpha / self.rank


def lora_a_init(key, shape, dtype=jnp.float32):
    """PEFT's default for A (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRADense(nn.Module):
    """A Dense layer (kernel (in, features), optional bias) with a LoRA adapter, as PEFT's
    `lora.Linear`: y = x W + b + (alpha / r) * (x A) B, A (in, r) kaiming-uniform, B (r, out)
    zero, so an adapter starts as the identity change. The base parameter names are kept
    (`kernel`, `bias`; Levanter-style), the adapter adds `lora_a` / `lora_b`. Input (..., in),
    output (..., features), computed in `dtype`."""
    features: int
    use_bias: bool
    spec: LoRASpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # 2-d matmuls: faster weight gradients (see layers.Dense)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        a = self.param("lora_a", lora_a_init, (x.shape[-1], self.spec.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros, (self.spec.rank, self.features), self.param_dtype)
        y = y + jnp.dot(jnp.dot(x, a.astype(self.dtype)), b.astype(self.dtype)) * self.spec.scale
        return y.reshape(*lead, self.features)
