"""Stage 2, GenieBlue-Post: the copied blocks are the last quarter of the LLM."""
from experiments.configs import common


def get_config(arg=None):
    """GenieBlue-Post (paper Tables 4-6), stage 2: the ViT, the projector, trainable copies of the last quarter of the
    blocks and LoRA elsewhere train. `arg`: "demo" (default) or "paper" scale."""
    c = common.base_config(common.parse_arg(arg))
    c.model.placement = "post"
    return c
