"""CogVLM-Pre baseline: visual experts in the first quarter of the blocks."""
from experiments.configs import common


def get_config(arg=None):
    """CogVLM-Pre (a paper Tables 4-5 baseline), stage 2: the ViT, the projector, visual experts in the first quarter
    of the blocks and LoRA elsewhere train. `arg`: "demo" (default) or "paper" scale."""
    c = common.base_config(common.parse_arg(arg))
    c.model.variant = "cogvlm"
    c.model.placement = "pre"
    return c
