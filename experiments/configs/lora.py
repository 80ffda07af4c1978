"""LoRA baseline: LoRA (rank 8) on every block, LLM frozen."""
from experiments.configs import common


def get_config(arg=None):
    """LoRA (a paper Tables 4-6 baseline), stage 2: the ViT, the projector and LoRA (rank 8) on every block train,
    the LLM stays frozen. `arg`: "demo" (default) or "paper" scale."""
    c = common.base_config(common.parse_arg(arg))
    c.model.variant = "lora"
    return c
