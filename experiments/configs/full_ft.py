"""Full fine-tune baseline: ViT, projector and the whole LLM train (no non-shared base)."""
from experiments.configs import common


def get_config(arg=None):
    """Full fine-tuning (paper Table 3; the reference of Tables 4-5's retention): after stage 1, the ViT, the
    projector and the whole LLM train, leaving no untouched base. `arg`: "demo" (default) or "paper" scale."""
    c = common.base_config(common.parse_arg(arg))
    c.model.variant = "full"
    c.train.stage = "full"
    return c
