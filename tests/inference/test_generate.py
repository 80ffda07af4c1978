"""KV-cache generation (`genieblue_jax.inference`): the cache gives what recomputing the
whole sequence gives, in every mode, with left-padded batches; stop tokens, sampling and
bucketed compilation.

The tiny MLLM of tests/structure with a perturbed branch. For the decoding tests its base
LLM is perturbed too (scale 0.2): at the init scale (std 0.02) greedy decoding of the tiny
model repeats a single token, which would make a token-by-token comparison nearly vacuous.
The logit comparisons use the init-scale base (logits of order 1, so an absolute 1e-5 is
a meaningful bound; the perturbed base has logits of order 10).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genieblue_jax import inference, models, structure
from genieblue_jax.models.llm import init_kv_cache
from genieblue_jax.models.masks import positions_from_segments
from tests.structure.conftest import build, image_batch, make_mcfg, perturb, text_batch

NEW = 32
_forward = jax.jit(structure.forward, static_argnums=0, static_argnames="mode")
_perturb = jax.jit(perturb, static_argnums=(1, 2))  # one program, not one eager op per leaf


def _base(scale):
    mcfg = make_mcfg()
    llm = models.init_params(mcfg.llm, jax.random.key(1))
    return {"llm": _perturb(llm, 3, scale) if scale else llm,
            "vision": models.init_params(mcfg.vision, jax.random.key(2))}


@pytest.fixture(scope="module")
def base():
    return _base(0.2)


def _models(base):
    cache = {}

    def get(variant):
        if variant not in cache:
            mcfg, params = build(variant, "skip", base)
            cache[variant] = mcfg, dict(params, branch=_perturb(params["branch"], 7, 0.05))
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def model(base):
    """variant -> (mcfg, params) with a perturbed branch (so text and multimodal differ)."""
    return _models(base)


@pytest.fixture(scope="module")
def init_scale_model():
    """As `model`, around the init-scale base (tests/structure's)."""
    return _models(_base(0.0))


def _text_prompts():
    tokens, segments = text_batch(seed=5)
    return [tokens[0], tokens[1][: segments[1].sum()]]  # 24 and 18 tokens


def _image_prompts(mcfg):
    """40 and 30 tokens, one 16-token image each; the tiles uint8, as the pipeline and
    `requests.encode` deliver them (normalised on device by every path)."""
    tokens, _, images = image_batch(mcfg)
    pixels = np.round((images + 1) * 127.5).astype(np.uint8)
    return [tokens[0], tokens[1][:30]], pixels


def greedy_by_recompute(mcfg, params, prompts, images, mode, n=NEW):
    """The reference: `structure.forward` over the whole sequence at every step, argmax of
    each row's last valid position. Rows are right-padded to one fixed length (one
    compile); the causal mask keeps the padding out of the real positions."""
    lengths = np.array([len(p) for p in prompts])
    seq = np.zeros((len(prompts), lengths.max() + n), np.int32)
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = p
    out = np.zeros((len(prompts), n), np.int32)
    rows = np.arange(len(prompts))
    for step in range(n):
        cur = lengths + step
        segments = (np.arange(seq.shape[1])[None] < cur[:, None]).astype(np.int32)
        logits = np.asarray(_forward(mcfg, params, seq, positions_from_segments(segments), segments, images,
                                     mode=mode))
        out[:, step] = seq[rows, cur] = logits[rows, cur - 1].argmax(-1)
    return out


CASES = {  # name: (variant, mode, batch rows, with images)
    "text": ("genieblue", "text", 2, False),
    "multimodal-image": ("genieblue", "multimodal", 1, True),
    "cogvlm-image": ("cogvlm", "multimodal", 2, True),
    "shared-batch2": ("genieblue", "shared", 2, False),
}


def _case(model, name):
    variant, mode, rows, with_images = CASES[name]
    mcfg, params = model(variant)
    if with_images:
        prompts, images = _image_prompts(mcfg)
    else:
        prompts, images = _text_prompts(), None
    return mcfg, params, mode, prompts[:rows], None if images is None else images[:rows]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow
def test_greedy_with_cache_equals_recomputing_the_sequence(model, name):
    mcfg, params, mode, prompts, images = _case(model, name)
    got = inference.generate(mcfg, params, prompts, mode=mode, images=images, max_new_tokens=NEW)
    want = greedy_by_recompute(mcfg, params, prompts, images, mode)
    assert got.prompt_bucket == 64 and got.cache_len == 128
    np.testing.assert_array_equal(got.tokens, want)
    assert all(len(set(row)) > 8 for row in want), want  # a real sequence, not one repeated token
    np.testing.assert_array_equal(got.lengths, NEW)
    assert not got.finished.any()


@pytest.mark.parametrize("name", ["text", "cogvlm-image"])
@pytest.mark.slow
def test_prefill_logits_equal_forward_on_the_unpadded_prompt(init_scale_model, name):
    mcfg, params, mode, prompts, images = _case(init_scale_model, name)
    tokens, positions, segments = inference.pad_prompts(prompts)
    cache, state, logits = inference.prefill(mcfg, params, tokens, positions, segments, images,
                                             inference.Sampling.make(), jax.random.key(0), mode=mode,
                                             cache_len=128, all_logits=True)
    # on the same left-padded input, the cached prefill is the no-cache forward (to float
    # rounding: the two programs fuse differently)
    valid = segments.astype(bool)
    same_input = np.abs(np.asarray(logits)[valid] - np.asarray(
        _forward(mcfg, params, tokens, positions, segments, images, mode=mode))[valid]).max()
    print(f"{name}: prefill vs forward on the padded input max |diff| {same_input:.1e}")
    assert same_input <= 1e-5
    assert int(cache["index"]) == 64
    np.testing.assert_array_equal(np.asarray(cache["segment_ids"]), np.pad(segments, ((0, 0), (0, 64))))
    for i, p in enumerate(prompts):
        ones = np.ones((1, len(p)), np.int32)
        want = np.asarray(_forward(mcfg, params, np.asarray(p)[None], positions_from_segments(ones), ones,
                                   None if images is None else images[i:i + 1], mode=mode))[0]
        diff = np.abs(np.asarray(logits)[i, 64 - len(p):] - want).max()
        print(f"{name} row {i}: prefill vs forward max |diff| {diff:.1e}")
        assert diff <= 1e-5
    np.testing.assert_array_equal(np.asarray(state.tokens), np.asarray(logits)[:, -1].argmax(-1))
    np.testing.assert_array_equal(np.asarray(state.positions), [len(p) for p in prompts])


def test_text_mode_is_exactly_the_base_model_and_shared_is_not(model, base):
    mcfg, params = model("genieblue")
    prompts = _text_prompts()
    text = inference.generate(mcfg, params, prompts, mode="text", max_new_tokens=NEW)
    base_alone = inference.generate(mcfg.llm, {"llm": base["llm"]}, prompts, mode="text", max_new_tokens=NEW)
    np.testing.assert_array_equal(text.tokens, base_alone.tokens)
    args = (*inference.pad_prompts(prompts), None, inference.Sampling.make(), jax.random.key(0))
    logits_text = inference.prefill(mcfg, params, *args, mode="text", cache_len=128, all_logits=True)[2]
    logits_base = inference.prefill(mcfg.llm, {"llm": base["llm"]}, *args, mode="text", cache_len=128,
                                    all_logits=True)[2]
    np.testing.assert_array_equal(np.asarray(logits_text), np.asarray(logits_base))
    shared = inference.generate(mcfg, params, prompts, mode="shared", max_new_tokens=NEW)
    assert (shared.tokens != text.tokens).any()
    with pytest.raises(ValueError, match="takes no images"):
        inference.generate(mcfg, params, prompts, mode="text", images=np.zeros((2, 1, 56, 56, 3), np.float32))
    with pytest.raises(ValueError, match="image tokens"):
        inference.generate(mcfg, params, _image_prompts(mcfg)[0], mode="multimodal")
    # uint8 pixels cast to float (0 .. 255) would run as if normalised: refused, named.
    prompts, pixels = _image_prompts(mcfg)
    with pytest.raises(ValueError, match=r"images: float tiles must be normalised to \[-1, 1\]"):
        inference.generate(mcfg, params, prompts, mode="multimodal", images=pixels.astype(np.float32))


def test_stop_tokens_end_rows_early(model):
    mcfg, params = model("genieblue")
    prompts = _text_prompts()
    free = inference.generate(mcfg, params, prompts, mode="shared", max_new_tokens=NEW).tokens
    # a token that row 0 first emits at step k >= 3 and row 1 never emits
    k = next(k for k in range(3, NEW) if free[0, k] not in free[0, :k] and free[0, k] not in free[1])
    stop = int(free[0, k])
    pad = 509
    got = inference.generate(mcfg, params, prompts, mode="shared", max_new_tokens=NEW, stop_tokens=(stop, 1),
                             pad_id=pad)
    np.testing.assert_array_equal(got.tokens[0, : k + 1], free[0, : k + 1])
    assert (got.tokens[0, k + 1:] == pad).all()
    np.testing.assert_array_equal(got.tokens[1], free[1])
    np.testing.assert_array_equal(got.lengths, [k + 1, NEW])
    np.testing.assert_array_equal(got.finished, [True, False])
    np.testing.assert_array_equal(got.row(0), free[0, : k + 1])
    # both rows stopped: the loop ends early, the rest is padding
    stop1 = int(free[1, 2])
    both = inference.generate(mcfg, params, prompts, mode="shared", max_new_tokens=NEW, stop_tokens=(stop, stop1),
                              pad_id=pad)
    assert both.finished.all() and (both.lengths <= k + 1).all()
    assert all((both.tokens[i, both.lengths[i]:] == pad).all() for i in range(2))


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(model):
    mcfg, params = model("genieblue")
    prompts = _text_prompts()
    run = lambda **kw: inference.generate(mcfg, params, prompts, mode="text", max_new_tokens=NEW, **kw).tokens
    greedy = run()
    a = run(temperature=1.0, top_p=0.9, key=jax.random.key(3))
    np.testing.assert_array_equal(a, run(temperature=1.0, top_p=0.9, key=jax.random.key(3)))
    assert (a != run(temperature=1.0, top_p=0.9, key=jax.random.key(4))).any()
    assert (a != greedy).any()
    np.testing.assert_array_equal(run(temperature=1.0, top_p=1e-6, key=jax.random.key(3)), greedy)
    with pytest.raises(ValueError, match="top_p"):
        run(temperature=1.0, top_p=0.0)


def test_a_second_request_of_the_same_bucket_does_not_recompile(model):
    mcfg, params = model("genieblue")
    inference.generate(mcfg, params, _text_prompts(), mode="shared", max_new_tokens=NEW)
    traces, sizes = dict(inference.TRACES), (inference.prefill._cache_size(), inference.decode_step._cache_size())
    rng = np.random.default_rng(0)
    out = inference.generate(mcfg, params, [rng.integers(0, 500, 10), rng.integers(0, 500, 61)], mode="shared",
                             max_new_tokens=20, temperature=0.7, top_p=0.5, stop_tokens=(3, 4, 5), pad_id=1)
    assert out.prompt_bucket == 64 and out.cache_len == 128
    assert dict(inference.TRACES) == traces
    assert (inference.prefill._cache_size(), inference.decode_step._cache_size()) == sizes
    # a longer prompt is a new bucket: a new prefill program
    out = inference.generate(mcfg, params, [rng.integers(0, 500, 65)] * 2, mode="shared", max_new_tokens=1)
    assert out.prompt_bucket == 128 and inference.TRACES["prefill"] == traces["prefill"] + 1


def assert_cache_in_pieces_equals_one_forward(cfg, params, pieces, cache_len):
    """Two rows (row 0 left-padded) fed through a KV cache of `cache_len` slots in `pieces`
    ((start, end) token ranges, in order) give the logits of one forward pass without a cache;
    returns the final cache."""
    model = models.build(cfg)
    t = pieces[-1][1]
    tokens = jax.random.randint(jax.random.key(1), (2, t), 0, cfg.vocab_size)
    segments = jnp.array([[0] * 3 + [1] * (t - 3), [1] * t])
    positions = jnp.asarray(positions_from_segments(segments))
    want = jax.jit(model.apply)({"params": params}, tokens, positions, segments)
    apply = jax.jit(lambda p, c, *inputs: model.apply({"params": p}, *inputs, cache=c))
    cache, got = init_kv_cache(cfg, 2, cache_len), []
    for lo, hi in pieces:
        logits, cache = apply(params, cache, tokens[:, lo:hi], positions[:, lo:hi], segments[:, lo:hi])
        got.append(logits)
    got = jnp.concatenate(got, axis=1)
    assert int(cache["index"]) == t
    valid = np.asarray(segments, bool)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)
    return cache


@pytest.mark.slow
def test_decoder_cache_in_pieces_equals_one_forward_with_scan_and_chunks():
    """The decoder alone: a prompt written in two pieces, then single tokens, gives the
    no-cache logits; `scan_layers` / `attention_chunk` configs fall back to the plain path."""
    cfg = models.get_preset("tiny-llama").replace(scan_layers=True, attention_chunk=4)
    params = perturb(models.init_params(cfg, jax.random.key(0)), scale=0.1)
    assert_cache_in_pieces_equals_one_forward(cfg, params, [(0, 6), (6, 10)] + [(i, i + 1) for i in range(10, 14)],
                                              cache_len=20)
