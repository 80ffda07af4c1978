"""CogVLM-Skip baseline: visual experts in every 4th block, LoRA elsewhere."""
from experiments.configs import common


def get_config(arg=None):
    """CogVLM-Skip (a paper Tables 4-6 baseline), stage 2: the ViT, the projector, visual experts in every 4th block
    and LoRA elsewhere train. `arg`: "demo" (default) or "paper" scale."""
    c = common.base_config(common.parse_arg(arg))
    c.model.variant = "cogvlm"
    c.model.placement = "skip"
    return c
