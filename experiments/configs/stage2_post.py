"""Stage 2, GenieBlue-Post: the copied blocks are the last quarter of the LLM."""
from experiments.configs import common


def get_config(arg=None):
    c = common.base_config(common.parse_arg(arg))
    c.model.placement = "post"
    return c
