"""Stage 2, GenieBlue-Pre: the copied blocks are the first quarter of the LLM."""
from experiments.configs import common


def get_config(arg=None):
    """GenieBlue-Pre (paper Tables 4-6), stage 2: the ViT, the projector, trainable copies of the first quarter of the
    blocks and LoRA elsewhere train. `arg`: "demo" (default) or "paper" scale."""
    c = common.base_config(common.parse_arg(arg))
    c.model.placement = "pre"
    return c
