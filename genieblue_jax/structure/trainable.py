"""Which parameters train: regex rules over "component/path" names, as data.

The MLLM parameter tree has four components: `llm` (the frozen base), `vision`,
`projector`, `branch`. A stage is a tuple of regexes; a leaf trains iff its full name
("projector/linear_1/kernel") matches one. Every rule must match at least one leaf (a
typo never silently freezes everything).

    stage1: the projector
    stage2: vision tower (minus its pooling head) + projector + branch
    full:   vision tower (minus its pooling head) + projector + the whole LLM
    pretrain: the LLM alone (language-model pretraining on text, e.g. the demo's base)

The SigLIP attention-pooling head is never trained: the projector reads patch tokens,
so the head gets no gradient (the paper's #Param column still counts it; see
`structure.report`).

`partition` splits the tree into (trainable, frozen); a loss written as
`loss(trainable, frozen, batch)` and differentiated w.r.t. its first argument computes no
weight gradient for frozen leaves, and an optimizer initialised on `trainable` holds no
state for them. This is what `optax.masked` achieves, without ever materialising a
full-size gradient or update tree.
"""
from __future__ import annotations

from typing import Sequence

from genieblue_jax import models
from genieblue_jax import rules as rules_lib

_NOT_HEAD = r"vision/(?!head/).*"
STAGES: dict[str, tuple[str, ...]] = {
    "stage1": (r"projector/.*",),
    "stage2": (_NOT_HEAD, r"projector/.*", r"branch/.*"),
    "full": (_NOT_HEAD, r"projector/.*", r"llm/.*"),
    "pretrain": (r"llm/.*",),   # the LLM alone, on text (the demo's base LLM)
}


def stage_rules(stage: str | Sequence[str]) -> tuple[str, ...]:
    """The trainable-parameter patterns of a stage name (STAGES), or `stage` itself when it is a
    sequence of patterns. ValueError naming an unknown stage."""
    if isinstance(stage, str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; known: {sorted(STAGES)} (or give regexes)")
        return STAGES[stage]
    return tuple(stage)


def trainable_names(params: dict, stage: str | Sequence[str]) -> set[str]:
    """Full names of the trainable leaves; raises if a rule matches nothing."""
    table = [(r, True) for r in stage_rules(stage)]
    try:
        trainable = rules_lib.assign(table, models.flatten(params), default=False, what="trainable rule",
                                     check_used=True)
    except ValueError as e:
        raise ValueError(f"{e}; components present: {sorted(params)}") from None
    return {n for n, t in trainable.items() if t}


def partition(params: dict, stage: str | Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) nested trees; `combine` puts them back together."""
    train = trainable_names(params, stage)
    flat = models.flatten(params)
    return (models.unflatten({n: v for n, v in flat.items() if n in train}),
            models.unflatten({n: v for n, v in flat.items() if n not in train}))


def combine(trainable: dict, frozen: dict) -> dict:
    """Inverse of `partition`: one nested tree of both parts."""
    return models.unflatten({**models.flatten(frozen), **models.flatten(trainable)})
