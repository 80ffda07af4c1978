"""Stage 1: train the projector only (ViT and LLM frozen), one 384 px tile per image."""
from experiments.configs import common


def get_config(arg=None):
    """Stage 1 (paper Appendix D), which every multimodal recipe starts from: only the projector trains, on one
    384 px tile per image. `arg`: "demo" (default) or "paper" scale."""
    c = common.stage1(common.base_config(common.parse_arg(arg)))
    return c
