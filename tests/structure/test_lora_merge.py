"""Folding LoRA into the weights gives the same model."""
import jax
import numpy as np
import pytest

from genieblue_jax import models, structure
from genieblue_jax.models.masks import positions_from_segments
from tests.structure.conftest import build, image_batch, perturb, run


@pytest.mark.parametrize("variant", ["genieblue", "lora", "cogvlm"])
@pytest.mark.slow
def test_folded_weights_give_the_unmerged_logits(variant, base_params):
    mcfg, params = build(variant, "skip", base_params)
    params = dict(params, branch=perturb(params["branch"], scale=0.1))
    folded, kinds = structure.fold_lora(mcfg, params["llm"], params["branch"])
    assert not any(n.endswith(("lora_a", "lora_b")) for n in models.flatten(folded))
    assert "lora" not in kinds and (variant != "cogvlm") == (set(kinds) == {"base"})
    tokens, segments, images = image_batch(mcfg)
    unmerged = run(mcfg, params, tokens, segments, images)
    decode = jax.jit(structure.decode, static_argnums=(0, 1))
    merged = np.asarray(decode(mcfg, models.DecoderLM(mcfg.llm, kinds), folded, params, tokens,
                               positions_from_segments(segments), segments, images))
    diff = np.abs(merged - unmerged).max()
    # The same model with every LoRA B set to zero: what the fold would give if it (and the
    # unmerged forward) dropped the adapters or their alpha / r scale. The adapters must move
    # the logits far more than the fold tolerance, or the comparison above proves nothing.
    no_adapter = dict(params, branch=jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if path[-1].key == "lora_b" else x, params["branch"]))
    lora_effect = np.abs(unmerged - run(mcfg, no_adapter, tokens, segments, images)).max()
    print(f"{variant}: folded vs unmerged max diff {diff:.2e}; LoRA's own effect on the logits {lora_effect:.2e}")
    assert diff <= 1e-5
    assert lora_effect > 1e-2
