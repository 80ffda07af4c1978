"""Parameter and storage accounting for every variant (the paper's #Param column, Table 4-5).

Counts come from abstract shapes only. Conventions, matching the paper:
- "#Param" = every parameter of the parts that train during MLLM training (stage 2), with
  the vision tower counted whole: the paper's figures include SigLIP's attention-pooling
  head although an LLaVA-style projector never uses it. Our trainer leaves the head frozen
  (it would get no gradient), so "trainable (ours)" is #Param minus the head.
- Deploy storage at the paper's precisions (Sec. 4.2): LLM weights, including replicated
  blocks and visual experts, 4-bit; ViT, projector and LoRA 8-bit. The pooling head is
  not deployed.
"""
from __future__ import annotations

import dataclasses
import re

from genieblue_jax import models
from genieblue_jax.structure.config import MLLMConfig, StructureConfig
from genieblue_jax.structure.mllm import abstract_mllm
from genieblue_jax.structure.trainable import trainable_names

PAPER_VARIANTS: tuple[tuple[str, StructureConfig], ...] = (
    ("Full fine-tune", StructureConfig(variant="full")),
    ("LoRA", StructureConfig(variant="lora")),
    *((f"CogVLM-{p.capitalize()}", StructureConfig(variant="cogvlm", placement=p)) for p in ("post", "pre", "skip")),
    *((f"GenieBlue-{p.capitalize()}", StructureConfig(variant="genieblue", placement=p))
      for p in ("post", "pre", "skip")),
)
LLM_BITS, OTHER_BITS = 4, 8


@dataclasses.dataclass(frozen=True)
class VariantCount:
    """One row of the paper's Tables 4-5 (`count_variant`): parameter counts and storage bytes."""
    name: str
    stage1_trainable: int
    stage2_trainable: int      # what our trainer updates
    paper_param: int           # the paper's #Param convention (+ the unused pooling head)
    deploy_text: int           # parameters a text-only request runs
    deploy_multimodal: int     # parameters held for the multimodal path (incl. base and ViT)
    deploy_storage_bytes: int  # everything on the phone, at the paper's precisions


def _count(flat: dict, pattern: str) -> int:
    return models.count_params([v for n, v in flat.items() if re.fullmatch(pattern, n)])


def count_variant(name: str, mcfg: MLLMConfig) -> VariantCount:
    """The paper's Table 4-5 accounting for variant `mcfg`, from parameter shapes alone (no
    memory): trainable parameters in stage 1 and stage 2 (without / with the ViT head), the
    base LLM, what a phone holds, and its storage in bytes at the paper's precisions (LLM-like
    weights at LLM_BITS, ViT / projector / LoRA at OTHER_BITS)."""
    abstract = abstract_mllm(mcfg)
    flat = models.flatten(abstract)
    stage2 = "full" if mcfg.structure.variant == "full" else "stage2"
    s1 = models.count_params([flat[n] for n in trainable_names(abstract, "stage1")])
    s2 = models.count_params([flat[n] for n in trainable_names(abstract, stage2)])
    head = _count(flat, r"vision/head/.*")
    llm, branch = _count(flat, r"llm/.*"), _count(flat, r"branch/.*")
    lora = _count(flat, r"branch/.*/lora_[ab]")
    vit = _count(flat, r"vision/.*") - head
    proj = _count(flat, r"projector/.*")
    llm_like = llm + branch - lora  # base, replicated blocks and visual experts
    storage = (llm_like * LLM_BITS + (vit + proj + lora) * OTHER_BITS) // 8
    return VariantCount(name, s1, s2, s2 + head, llm, vit + proj + llm + branch, storage)


def paper_table(llm: str = "qwen2.5-3b", vit: str = "siglip-so400m-384") -> list[VariantCount]:
    """`count_variant` for each of the paper's variants (PAPER_VARIANTS) at these presets."""
    return [count_variant(name, MLLMConfig.from_presets(llm, vit, structure=s)) for name, s in PAPER_VARIANTS]


def storage_summary(llm: str = "qwen2.5-3b", vit: str = "siglip-so400m-384") -> dict[str, int]:
    """Bytes on the phone: the LLM alone, a base MLLM (BlueLM-V style), and GenieBlue-Skip."""
    genieblue = count_variant("GenieBlue-Skip", MLLMConfig.from_presets(llm, vit))
    mcfg = MLLMConfig.from_presets(llm, vit)
    flat = models.flatten(abstract_mllm(mcfg))
    llm_n = _count(flat, r"llm/.*")
    vit_proj = _count(flat, r"(vision|projector)/.*") - _count(flat, r"vision/head/.*")
    return {"llm_only": llm_n * LLM_BITS // 8,
            "base_mllm": (llm_n * LLM_BITS + vit_proj * OTHER_BITS) // 8,
            "genieblue": genieblue.deploy_storage_bytes}
