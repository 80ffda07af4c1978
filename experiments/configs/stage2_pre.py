"""Stage 2, GenieBlue-Pre: the copied blocks are the first quarter of the LLM."""
from experiments.configs import common


def get_config(arg=None):
    c = common.base_config(common.parse_arg(arg))
    c.model.placement = "pre"
    return c
