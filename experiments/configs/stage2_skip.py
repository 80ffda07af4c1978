"""Stage 2, GenieBlue-Skip: ViT + projector + copies of every 4th block + LoRA elsewhere."""
from experiments.configs import common


def get_config(arg=None):
    c = common.base_config(common.parse_arg(arg))
    c.model.placement = "skip"
    return c
