"""A random GenieBlue MLLM checkpoint without training: what `tools.serve --random` serves and
what tests use when only the plumbing matters (no training, no compile)."""
import os
import random

import jax
import numpy as np

from data_pipelines.tokenizer import IMAGE_PAD, train_sentencepiece
from genieblue_jax import checkpoint, models, structure

WORDS = ("the a red blue green circle square triangle how many what is colour shape left right of "
         "there are one two three four plus minus image describe picture answer question yes no").split()


def random_model(out: str, *, llm: str = "tiny-qwen2", vit: str = "tiny-siglip", context: int | None = None,
                 seed: int = 0, scale: float = 0.2) -> str:
    """Writes a random MLLM (presets `llm` / `vit`, `context` positions, the tokenizer's
    vocabulary) to OUT/model with a SentencePiece tokenizer trained on a few synthetic
    sentences (OUT/tokenizer.model); returns the checkpoint's path. An unknown preset raises
    `KeyError` naming the presets (`models.get_preset`)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice("?.!") for _ in range(400)]
    texts += [f"What is {a} plus {b}? {a + b}." for a in range(10) for b in range(10)]
    texts += ["system\n", "user\n", "assistant\n", "é ü ñ 中文 ✓"]  # a few multi-byte characters
    tok_path = os.path.join(out, "tokenizer.model")
    tok = train_sentencepiece(texts, tok_path, vocab_size=400)
    llm_cfg, vit_cfg = models.get_preset(llm), models.get_preset(vit)
    llm_cfg = llm_cfg.replace(vocab_size=tok.vocab_size)  # every id the model can emit decodes
    if context:
        llm_cfg = llm_cfg.replace(max_position_embeddings=context)
    mcfg = structure.MLLMConfig(llm_cfg, vit_cfg, models.ProjectorConfig.between(vit_cfg, llm_cfg),
                                structure.StructureConfig(), image_token_id=tok.token_id(IMAGE_PAD))
    # Weights drawn in numpy from the abstract shapes: no XLA compile (an init compiles
    # a program per component: most of a minute on 2 busy cores, the tiny model's whole budget).
    # Norm scales 1 + noise, everything else noise of std `scale`: logits of order 10, so greedy
    # decoding does not repeat one token.
    rng_np = np.random.default_rng(seed)

    def draw(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: ((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
                             + scale * rng_np.standard_normal(x.shape)).astype(x.dtype), tree)

    params = {name: draw(models.abstract_params(cfg))
              for name, cfg in (("llm", mcfg.llm), ("vision", mcfg.vision), ("projector", mcfg.projector))}
    params["branch"] = draw(structure.abstract_branch(mcfg))  # nonzero LoRA B too: another model on images
    return checkpoint.save_mllm(os.path.join(out, "model"), mcfg, params, tokenizer=tok_path,
                                preprocessing={"image_mode": "dynamic", "max_tiles": 4}, overwrite=True)
