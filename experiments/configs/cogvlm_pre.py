"""CogVLM-Pre baseline: visual experts in the first quarter of the blocks."""
from experiments.configs import common


def get_config(arg=None):
    c = common.base_config(common.parse_arg(arg))
    c.model.variant = "cogvlm"
    c.model.placement = "pre"
    return c
