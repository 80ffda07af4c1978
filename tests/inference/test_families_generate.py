"""KV-cache generation of every family against transformers' own `generate` (greedy, left-
padded batches), with prompts and answers longer than the sliding windows of Gemma 3 and
SmolLM3, whose sliding layers keep only their window (a ring cache); and the cache fed in
pieces (prefills that wrap around the ring, then single tokens) against one forward pass."""
import numpy as np
import pytest
import torch

from genieblue_jax import inference
from genieblue_jax.hf import import_hf
from tests import families
from tests.inference.test_generate import assert_cache_in_pieces_equals_one_forward

NEW = 14
# Weight noise (tests/families.build) at which greedy continuations are varied, not one repeated
# token (measured: Gemma 3's scaled embeddings repeat from 0.3 up, the others below 0.1).
SCALE = {"gemma3": 0.05, "gemma3-vlm": 0.05}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    cache = {}

    def make(name):
        if name not in cache:
            path = families.save(name, str(tmp_path_factory.mktemp(name)), scale=SCALE.get(name, 0.2))
            cache[name] = import_hf(path)[1:]
        return cache[name]

    return make


def _prompts(vocab):
    rng = np.random.default_rng(5)
    return [rng.integers(3, vocab, 13), rng.integers(3, vocab, 9)]


def _hf_generate(model, prompts, new):
    """transformers' greedy generate on the left-padded batch (its positions from the mask)."""
    longest = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), longest), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):], mask[i, longest - len(p):] = p, 1
    if hasattr(model, "model") and hasattr(model.model, "language_model"):  # a Gemma 3 VLM: its text model
        import transformers
        text = transformers.Gemma3ForCausalLM(model.config.text_config).eval()
        text.model = model.model.language_model
        text.lm_head = model.lm_head
        model = text
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, longest:].numpy()


@pytest.mark.parametrize("name", families.NAMES)
def test_greedy_generation_equals_transformers_generate(name, imported):
    cfg, params = imported(name)
    prompts = _prompts(cfg.vocab_size)
    ours = inference.generate(cfg, {"llm": params}, prompts, mode="text", max_new_tokens=NEW, min_bucket=8)
    if cfg.sliding_window:
        assert ours.cache_len > cfg.sliding_window and len(prompts[0]) > cfg.sliding_window  # the ring wraps
    theirs = _hf_generate(families.build(name, scale=SCALE.get(name, 0.2)), prompts, NEW)
    np.testing.assert_array_equal(ours.tokens, theirs)
    assert len(set(ours.tokens[0].tolist())) > 3, ours.tokens  # a real continuation


@pytest.mark.parametrize("name", ["gemma3", "smollm3"])
def test_the_ring_cache_in_pieces_equals_one_forward(name, imported):
    """Pieces of 7 and 5 tokens (longer than the window: written around the ring) and then
    single tokens through a cache of 24 slots give the no-cache logits; the sliding layers'
    arrays hold only the window."""
    cfg, params = imported(name)
    pieces = [(0, 7), (7, 12)] + [(i, i + 1) for i in range(12, 20)]
    cache = assert_cache_in_pieces_equals_one_forward(cfg, params, pieces, cache_len=24)
    sliding = [i for i in range(cfg.num_layers) if cfg.window(i)]
    assert sliding and {cache["k"][i].shape[-1] for i in sliding} == {cfg.sliding_window}
