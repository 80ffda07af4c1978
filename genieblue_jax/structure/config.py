"""Structure configs: which variant, where the multimodal branch goes, and the full MLLM.

Layer placement (`replicated_layers`), for L layers and interval n, picks k = ceil(L / n)
blocks (a quarter of them for n = 4):

    skip: every n-th block, starting with the first:  i % n == 0
    pre:  the first k blocks
    post: the last k blocks

    >>> replicated_layers(36, "skip", 4)
    (0, 4, 8, 12, 16, 20, 24, 28, 32)
    >>> replicated_layers(36, "pre", 4)
    (0, 1, 2, 3, 4, 5, 6, 7, 8)
    >>> replicated_layers(36, "post", 4)
    (27, 28, 29, 30, 31, 32, 33, 34, 35)
    >>> replicated_layers(8, "skip", 4), replicated_layers(22, "skip", 4)
    ((0, 4), (0, 4, 8, 12, 16, 20))

Why `skip` starts at block 0: the first block to see the projected image tokens is then a
fully trained copy (the part of the network the paper's *Pre* placement shows matters most
for alignment), and every group of n blocks has the same shape (one replicated block, then
n - 1 LoRA blocks), which keeps the layout uniform for a scan over groups of n.

Interleaved layer types (Gemma 3's five sliding-window layers to one global layer, SmolLM3's
NoPE layers): the placements pick blocks by index alone, whatever their type, and a copy
keeps its block's attention type, window and RoPE (it is the same block with trained
weights). Gemma-3-1B (26 layers, global layers 5, 11, 17, 23) with Skip, n = 4, copies
0, 4, 8, 12, 16, 20, 24: all sliding-window blocks; Post copies 19-25 (global layer 23
among them); Pre copies 0-6 (global layer 5 among them):

    >>> replicated_layers(26, "skip", 4), replicated_layers(26, "post", 4)
    ((0, 4, 8, 12, 16, 20, 24), (19, 20, 21, 22, 23, 24, 25))
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from genieblue_jax.models.configs import LLMConfig, ProjectorConfig, VisionConfig, get_preset
from genieblue_jax.models.lora import LORA_TARGETS, LoRASpec
from genieblue_jax.models.projector import downsampled_grid

VARIANTS = ("genieblue", "cogvlm", "lora", "full")
PLACEMENTS = ("skip", "pre", "post")
MODES = ("text", "multimodal", "shared")
# The MLLM tree's components that hold LLM decoder layers: the frozen base and the branch
# (replicated blocks + LoRA). Their layers can be stacked for scan loops; QNN quantises them to int4.
LLM_COMPONENTS = ("llm", "branch")


def replicated_layers(num_layers: int, placement: str, interval: int) -> tuple[int, ...]:
    """Indices of the blocks that get a trainable copy (GenieBlue) / a visual expert (CogVLM)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; choose one of {PLACEMENTS}")
    if interval < 1 or interval > num_layers:
        raise ValueError(f"interval={interval} must be in [1, num_layers={num_layers}]")
    k = math.ceil(num_layers / interval)
    if placement == "skip":
        return tuple(range(0, num_layers, interval))
    if placement == "pre":
        return tuple(range(k))
    return tuple(range(num_layers - k, num_layers))


@dataclasses.dataclass(frozen=True)
class StructureConfig:
    """How the multimodal branch is built around the frozen LLM."""

    variant: str = "genieblue"
    placement: str = "skip"
    interval: int = 4
    lora_rank: int = 8
    lora_alpha: float = 16.0  # scaling = alpha / rank = 2
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}; choose one of {VARIANTS}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}; choose one of {PLACEMENTS}")
        if self.interval < 1:
            raise ValueError(f"interval={self.interval} must be >= 1")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self.lora_spec  # validates rank and targets

    @property
    def lora_spec(self) -> LoRASpec:
        """The LoRA adapters of the non-replicated blocks (rank, alpha, target projections)."""
        return LoRASpec(self.lora_rank, self.lora_alpha, self.lora_targets)

    @property
    def name(self) -> str:
        """The variant's name as the paper's tables write it: "lora", "full", "genieblue-skip"."""
        return self.variant if self.variant in ("lora", "full") else f"{self.variant}-{self.placement}"

    def selected_layers(self, num_layers: int) -> tuple[int, ...]:
        """Indices of the replicated (genieblue) / expert (cogvlm) blocks of a `num_layers`-block
        LLM (`replicated_layers`); () for lora and full."""
        if self.variant in ("lora", "full"):
            return ()
        return replicated_layers(num_layers, self.placement, self.interval)

    def layer_kinds(self, num_layers: int) -> tuple[str, ...]:
        """Per-layer kinds of the multimodal decoder (see `models.llm.DecoderLM`)."""
        if self.variant == "full":
            return ("base",) * num_layers
        chosen = set(self.selected_layers(num_layers))
        special = "base" if self.variant == "genieblue" else "expert"
        return tuple(special if i in chosen else "lora" for i in range(num_layers))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (genieblue.json); `from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StructureConfig":
        """Inverse of `to_dict` (validated as any construction)."""
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """A whole multimodal model: frozen LLM, vision tower, projector, branch structure."""

    llm: LLMConfig
    vision: VisionConfig
    projector: ProjectorConfig
    structure: StructureConfig
    image_token_id: int

    def __post_init__(self):
        if (self.projector.vision_hidden_size, self.projector.llm_hidden_size) != (
                self.vision.hidden_size, self.llm.hidden_size):
            raise ValueError(f"projector maps {self.projector.vision_hidden_size} -> "
                             f"{self.projector.llm_hidden_size} but the vision tower has hidden "
                             f"{self.vision.hidden_size} and the LLM {self.llm.hidden_size}")
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} outside the vocabulary "
                             f"[0, {self.llm.vocab_size})")

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one image tile becomes (after the 2x2 downsampler): 196 for so400m."""
        return downsampled_grid(self.vision.num_patches) ** 2

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Per-layer kinds of this model's multimodal decoder (`StructureConfig.layer_kinds`)."""
        return self.structure.layer_kinds(self.llm.num_layers)

    def replace(self, **changes) -> "MLLMConfig":
        """A copy with `changes` (dataclasses.replace; validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (every shape; a workdir's config.json records it); `from_dict` inverts it.

            >>> mcfg = MLLMConfig.from_presets("tiny-qwen2", "tiny-siglip")
            >>> MLLMConfig.from_dict(mcfg.to_dict()) == mcfg
            True
        """
        return {"llm": self.llm.to_dict(), "vision": self.vision.to_dict(), "projector": self.projector.to_dict(),
                "structure": self.structure.to_dict(), "image_token_id": int(self.image_token_id)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MLLMConfig":
        """Inverse of `to_dict` (validated as any construction; ValueError / KeyError naming the field)."""
        return cls(LLMConfig.from_dict(d["llm"]), VisionConfig.from_dict(d["vision"]),
                   ProjectorConfig.from_dict(d["projector"]), StructureConfig.from_dict(d["structure"]),
                   int(d["image_token_id"]))

    @staticmethod
    def from_presets(llm: str, vit: str, structure: StructureConfig | None = None,
                     image_token_id: int | None = None) -> "MLLMConfig":
        """An MLLM of two presets (`models.PRESETS` names), the projector between them, the given
        structure (default `StructureConfig()`), image token id (default: the last vocab id)."""
        llm_cfg, vit_cfg = get_preset(llm), get_preset(vit)
        return MLLMConfig(llm_cfg, vit_cfg, ProjectorConfig.between(vit_cfg, llm_cfg),
                          structure or StructureConfig(),
                          llm_cfg.vocab_size - 1 if image_token_id is None else image_token_id)
