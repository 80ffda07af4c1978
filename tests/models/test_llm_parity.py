"""Logit parity of our decoder with `transformers` on tiny random Qwen2 and Llama models."""
import numpy as np
import pytest
import torch

import genieblue_jax
from genieblue_jax.hf import import_hf
from tests.conftest import LLAMA_CONFIGS, QWEN2_CONFIGS, build_hf_decoder

ALL = sorted(QWEN2_CONFIGS) + sorted(LLAMA_CONFIGS)


def _padded_batch(vocab: int, seed: int = 1):
    """Three rows: full length, right-padded, left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0   # right padding
    mask[2, :4] = 0   # left padding
    return ids, mask


def _hf_logits(model, ids, mask):
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions))
    return out.logits.float().numpy()


@pytest.mark.parametrize("name", ALL)
def test_logits_match_transformers(name, hf_decoder_dir):
    hf_dir = hf_decoder_dir(name)
    model = genieblue_jax.load(hf_dir)
    vocab = model.configs["llm"].vocab_size
    ids, mask = _padded_batch(vocab)
    ours = model.logits(ids, attention_mask=mask)
    ref = _hf_logits(build_hf_decoder(name), ids, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    valid = mask.astype(bool)
    diff = np.abs(ours - ref)[valid].max()
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["qwen2-a", "llama-a"])
def test_checkpoint_round_trip_is_bitwise(name, hf_decoder_dir, tmp_path):
    hf_dir = hf_decoder_dir(name)
    import_hf(hf_dir, out=str(tmp_path / "ckpt"))
    ids, mask = _padded_batch(300)
    direct = genieblue_jax.load(hf_dir).logits(ids, attention_mask=mask)
    restored = genieblue_jax.load(str(tmp_path / "ckpt")).logits(ids, attention_mask=mask)
    np.testing.assert_array_equal(direct, restored)


def test_family_specific_structure(hf_decoder_dir):
    qwen = genieblue_jax.load(hf_decoder_dir("qwen2-a"))
    llama = genieblue_jax.load(hf_decoder_dir("llama-a"))
    qcfg, lcfg = qwen.configs["llm"], llama.configs["llm"]
    assert (qcfg.family, qcfg.qkv_bias, qcfg.out_bias, qcfg.tie_embeddings) == ("qwen2", True, False, True)
    assert (lcfg.family, lcfg.qkv_bias, lcfg.out_bias, lcfg.tie_embeddings) == ("llama", False, False, False)
    assert "lm_head" not in qwen.params["llm"] and "lm_head" in llama.params["llm"]
    assert "bias" in qwen.params["llm"]["layers_0"]["self_attn"]["q_proj"]
    assert "bias" not in qwen.params["llm"]["layers_0"]["self_attn"]["o_proj"]
