"""Stage 2, GenieBlue-Skip: ViT + projector + copies of every 4th block + LoRA elsewhere."""
from experiments.configs import common


def get_config(arg=None):
    """GenieBlue-Skip (paper Tables 4-6; the deployed structure), stage 2: the ViT, the projector, trainable copies of
    every 4th block and LoRA elsewhere train. `arg`: "demo" (default) or "paper" scale."""
    c = common.base_config(common.parse_arg(arg))
    c.model.placement = "skip"
    return c
