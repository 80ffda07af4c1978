"""CogVLM-Skip baseline: visual experts in every 4th block, LoRA elsewhere."""
from experiments.configs import common


def get_config(arg=None):
    c = common.base_config(common.parse_arg(arg))
    c.model.variant = "cogvlm"
    c.model.placement = "skip"
    return c
