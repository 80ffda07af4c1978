"""Full fine-tune baseline: ViT, projector and the whole LLM train (no non-shared base)."""
from experiments.configs import common


def get_config(arg=None):
    c = common.base_config(common.parse_arg(arg))
    c.model.variant = "full"
    c.train.stage = "full"
    return c
