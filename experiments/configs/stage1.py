"""Stage 1: train the projector only (ViT and LLM frozen), one 384 px tile per image."""
from experiments.configs import common


def get_config(arg=None):
    c = common.stage1(common.base_config(common.parse_arg(arg)))
    return c
