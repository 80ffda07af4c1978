"""Pretraining a (small) LLM from scratch on text: the demo's base LLM. Stage "pretrain"
trains the LLM alone (variant "full" holds no branch); rows carry no image tiles.

At paper scale the base LLM is a pretrained checkpoint (`tools.from_hf`), not this recipe.
"""
from experiments.configs import common


def get_config(arg=None):
    """Stage "pretrain": the demo's base LLM trains alone, from scratch, on text (no paper table). `arg`: "demo"
    (default); "paper" raises ValueError (import a pretrained LLM with tools.from_hf instead)."""
    scale = common.parse_arg(arg)
    if scale == "paper":
        raise ValueError("pretrain is a demo-scale recipe; at paper scale import a pretrained LLM with tools.from_hf")
    c = common.base_config(scale)
    c.model.variant = "full"
    c.train.stage = "pretrain"
    c.data.image_mode = "single"
    c.data.max_tiles_per_row = 0   # text only: no tile slots, the vision tower never runs
    c.init.from_scratch = "llm,vision"  # pretraining from scratch (the vision tower is never run)
    c.train.steps = 300
    c.train.global_batch_size = 16
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    return c
