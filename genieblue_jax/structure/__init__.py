"""GenieBlue structure: frozen base + trainable branch, variants, placements, modes.

    >>> from genieblue_jax import structure
    >>> mcfg = structure.MLLMConfig.from_presets("tiny-qwen2", "tiny-siglip")
    >>> mcfg.structure.name, mcfg.layer_kinds
    ('genieblue-skip', ('base', 'lora', 'lora', 'lora'))
"""
from genieblue_jax.models.scan import merge_trees
from genieblue_jax.structure.branch import (
                                            abstract_branch,
                                            branch_sources,
                                            fold_lora,
                                            init_branch,
                                            multimodal_decoder,
                                            multimodal_llm_params,
)
from genieblue_jax.structure.config import (
                                            LLM_COMPONENTS,
                                            MODES,
                                            PLACEMENTS,
                                            VARIANTS,
                                            MLLMConfig,
                                            StructureConfig,
                                            replicated_layers,
)
from genieblue_jax.structure.mllm import (
                                            abstract_mllm,
                                            check_image_tokens,
                                            decode,
                                            embed_image_tokens,
                                            forward,
                                            forward_hidden,
                                            image_features,
                                            init_mllm,
                                            merge_image_features,
                                            stack_layers,
                                            unstack_layers,
)
from genieblue_jax.structure.trainable import STAGES, combine, partition, trainable_names

__all__ = ["MLLMConfig", "StructureConfig", "VARIANTS", "PLACEMENTS", "MODES", "STAGES", "LLM_COMPONENTS",
           "replicated_layers", "abstract_branch", "branch_sources", "init_branch", "merge_trees", "decode",
           "multimodal_decoder", "multimodal_llm_params", "fold_lora", "forward", "forward_hidden", "image_features",
           "embed_image_tokens", "merge_image_features", "stack_layers", "unstack_layers", "check_image_tokens",
           "abstract_mllm", "init_mllm", "partition", "combine", "trainable_names"]
