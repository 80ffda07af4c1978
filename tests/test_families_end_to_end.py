"""Every LLM family through the path the Qwen2 family has: a random transformers model
(tests/families.py) imported by `tools.from_hf`'s function, trained by the real engine for
two GenieBlue stage-2 steps (packed rows of the demo data, Skip placement every 2nd block:
replicated blocks on sliding and global layers alike for Gemma 3), loaded, and exported by
`tools.to_torch` to its own transformers class + a PEFT adapter:

- the trained model's text mode is bitwise the imported base (frozen means frozen);
- the exported base_llm/ gives the original transformers model's logits within 1e-4;
- transformers + PEFT (multimodal_llm/ + lora_adapter/ + SigLIP + projector, assembled by
  `load_torch_mllm`) give our multimodal logits within 1e-4, on image requests longer than
  the sliding windows.
"""
import json
import os

import numpy as np
import pytest
import torch

import genieblue_jax
from genieblue_jax import models
from genieblue_jax.export.to_torch import export_torch
from genieblue_jax.export.torch_modules import load_torch_mllm
from genieblue_jax.hf import import_hf
from genieblue_jax.train import trainer
from tests import families
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it

TOL = 1e-4
ARCHITECTURES = {"llama3": "LlamaForCausalLM", "llama3-hub": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM", "gemma3-vlm": "Gemma3ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = {}

    def make(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            hf_dir = families.save(name, str(root / "hf"))
            import_hf(hf_dir, out=str(root / "llm_ckpt"))
            workdir = str(root / "run")
            trainer.train(tiny_config(**{"train.steps": 2, "model.interval": 2,
                                         "init.llm_checkpoint": str(root / "llm_ckpt")}), workdir)
            model = genieblue_jax.load(workdir)
            export = export_torch(model, str(root / "torch"))
            cache[name] = {"hf": hf_dir, "model": model, "export": export}
        return cache[name]

    return make


def _requests(model, seed=0):
    """Two left/right-padded rows of 40 tokens, one image tile (its image tokens) each."""
    mcfg = model.mcfg
    rng = np.random.default_rng(seed)
    k = mcfg.tokens_per_tile
    ids = rng.integers(3, 500, size=(2, 40)).astype(np.int64)
    ids[ids == mcfg.image_token_id] += 1
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[1, 36:] = 0
    ids[0, 8:8 + k] = ids[1, 2:2 + k] = mcfg.image_token_id
    s = mcfg.vision.image_size
    return ids, mask, rng.integers(0, 256, size=(2, 1, s, s, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", families.NAMES)
def test_trained_and_exported_family(name, trained):
    run = trained(name)
    model, base = run["model"], genieblue_jax.load(run["hf"])
    cfg = model.mcfg.llm
    assert cfg.family == base.configs["llm"].family
    ids, mask, images = _requests(model)
    assert ids.shape[1] > cfg.sliding_window
    # text mode: bitwise the imported base
    np.testing.assert_array_equal(model.logits(ids, mask, mode="text"), base.logits(ids, mask))
    for path, leaf in models.flatten(model.params["llm"]).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(models.flatten(base.params["llm"])[path]))
    # the export: the family's own class, a PEFT adapter on the LoRA blocks
    out = run["export"].out_dir
    for part in ("base_llm", "multimodal_llm"):
        with open(os.path.join(out, part, "config.json")) as f:
            assert json.load(f)["architectures"] == [ARCHITECTURES[name]]
    assert run["export"].parts["lora_adapter"]
    torch_model = load_torch_mllm(out)
    valid = mask.astype(bool)
    # base_llm/ against the original transformers model
    reference = families.build(name)
    if name == "gemma3-vlm":
        decoder, head = reference.model.language_model, reference.lm_head
    else:
        decoder, head = reference.model, reference.lm_head
    positions = torch.from_numpy(np.clip(np.cumsum(mask, 1) - 1, 0, None))
    with torch.no_grad():
        original = head(decoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                position_ids=positions).last_hidden_state).numpy()
        exported_text = torch_model.logits(ids, mask, mode="text").numpy()
        exported_mm = torch_model.logits(ids, mask, images=torch.from_numpy(images)).numpy()
        text_ids = np.where(ids == model.mcfg.image_token_id, model.mcfg.image_token_id + 1, ids)
        exported_shared = torch_model.logits(text_ids, mask, mode="shared").numpy()
    text_diff = np.abs(exported_text - original)[valid].max()
    mm_diff = np.abs(exported_mm - model.logits(ids, mask, images=images))[valid].max()
    ours_shared = model.logits(text_ids, mask, mode="shared")
    shared_diff = np.abs(exported_shared - ours_shared)[valid].max()
    branch_gap = np.abs(ours_shared - model.logits(text_ids, mask, mode="text"))[valid].max()
    print(f"{name}: exported base vs transformers {text_diff:.2e}; transformers + PEFT vs ours: multimodal "
          f"{mm_diff:.2e}, shared {shared_diff:.2e} (the trained branch moves text logits by {branch_gap:.2e})")
    assert text_diff <= TOL and mm_diff <= TOL and shared_diff <= TOL
    assert branch_gap > 1e-3  # the multimodal LLM is not the base: the comparisons have teeth
