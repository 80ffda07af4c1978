"""LoRA baseline: LoRA (rank 8) on every block, LLM frozen."""
from experiments.configs import common


def get_config(arg=None):
    c = common.base_config(common.parse_arg(arg))
    c.model.variant = "lora"
    return c
