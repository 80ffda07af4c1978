"""Inference: KV-cache generation (prefill + decode) for the base LLM and the multimodal
decoder. See `generate` for the cache layout and the modes."""
from genieblue_jax.inference.generate import (
                                              TRACES,
                                              DecodeState,
                                              GenerationResult,
                                              Sampling,
                                              bucket_length,
                                              decode_step,
                                              generate,
                                              pad_prompts,
                                              prefill,
                                              sample,
)
from genieblue_jax.inference.requests import checked_tiles

__all__ = ["TRACES", "DecodeState", "GenerationResult", "Sampling", "bucket_length", "decode_step", "generate",
           "pad_prompts", "prefill", "sample", "checked_tiles"]
