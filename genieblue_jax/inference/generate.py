"""KV-cache generation: jitted `prefill` and `decode_step`, and the host loop `generate`.

    >>> from genieblue_jax import inference
    >>> out = inference.generate(mcfg, params, [[5, 6, 7], [8, 9]], mode="text",
    ...                          max_new_tokens=32, stop_tokens=(2,))          # doctest: +SKIP
    >>> out.tokens.shape, out.lengths                                         # doctest: +SKIP
    ((2, 32), array([32, 7]))

Modes (as `structure.forward`):

    text        the base LLM alone: `models.build(mcfg.llm)` on `params["llm"]` (the
                untouched base, GenieBlue's non-shared deployment); no images
    multimodal  `structure.multimodal_decoder(mcfg)` on the base with the branch merged in;
                `images` (b, P, H, W, 3) fill each row's image-token slots at prefill
    shared      the multimodal weights on a text-only prompt (same computation)

`mcfg` is an `MLLMConfig` with params {"llm", "vision", "projector", "branch"}, or for
"text" mode alone an `LLMConfig` with params {"llm": ...}.

Cache layout. Prompts are left-padded to a length bucket P (a power of two, at least
`min_bucket`), and the cache has S = P + bucket(max_new_tokens) slots, so a request of the
same bucket reuses the compiled programs. All rows advance together: prefill writes slots
[0, P), decode step i writes slot P + i - 1 for every row. Slot validity is the cache's
`segment_ids` (0 = left padding, 1 = the row's tokens); each row's RoPE positions start at
0 at its first real token. Worked example, prompts "a b c d e" and "f g", min_bucket = 4,
max_new_tokens = 3 (P = 8, S = 8 + 4 = 12):

    slot         0  1  2  3  4  5  6  7 |  8  9 10 11
    row 0 token  .  .  .  a  b  c  d  e | n0 n1 n2  -
          seg    0  0  0  1  1  1  1  1 |  1  1  1  0
          pos    0  0  0  0  1  2  3  4 |  5  6  7
    row 1 token  .  .  .  .  .  .  f  g | m0 m1 m2  -
          seg    0  0  0  0  0  0  1  1 |  1  1  1  0
          pos    0  0  0  0  0  0  0  1 |  2  3  4

Prefill runs the 8 prompt slots (index 0 -> 8) and samples n0 / m0 from the logits of
slot 7, the last real token of every row. Decode step 1 feeds n0 / m0 at slot 8
(positions 5 and 2), samples n1 / m1, and so on. A query at slot q sees slot s iff s <= q
and the segments agree (`models.masks.cached_causal_segment_mask`): row 1's token m0
attends slots 6, 7, 8 and never the padding; unwritten slots (9-11) lie in the future.
Logits of the pad slots are meaningless and never read.

Stopping: a row that samples one of `stop_tokens` is finished (the stop token is part of
its output); from then on it emits `pad_id` (it still runs, shapes are static). The loop
ends at `max_new_tokens` or once every row has finished (checked every `check_every`
steps, the only host syncs).

Sampling: temperature <= 0 is greedy (argmax); otherwise softmax(logits / temperature)
restricted to the smallest set of most likely tokens whose probability reaches `top_p`
(nucleus), drawn with `fold_in(key, step)`: a fixed key reproduces the output, and a tiny
top_p keeps only the most likely token (= greedy).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genieblue_jax import models
from genieblue_jax.inference.requests import checked_tiles
from genieblue_jax.models.configs import LLMConfig
from genieblue_jax.models.llm import init_kv_cache
from genieblue_jax.structure.branch import multimodal_decoder, multimodal_llm_params
from genieblue_jax.structure.config import MODES, MLLMConfig
from genieblue_jax.structure.mllm import embed_image_tokens

# How often each jitted function has been traced (a Python side effect: it runs at trace
# time only), e.g. to check that a second request of the same bucket does not recompile.
TRACES: collections.Counter = collections.Counter()


class DecodeState(NamedTuple):
    """Per-row generation state between steps (the cache travels separately, donated)."""

    tokens: jax.Array     # (b,) int32: each row's last emitted token, the next step's input
    positions: jax.Array  # (b,) int32: its RoPE position
    finished: jax.Array   # (b,) bool: the row has emitted a stop token
    key: jax.Array        # PRNG key; emitted token number s is drawn with fold_in(key, s)
    step: jax.Array       # () int32: tokens emitted so far


class Sampling(NamedTuple):
    """Traced sampling settings (changing them does not recompile)."""

    temperature: jax.Array  # () float32; <= 0: greedy
    top_p: jax.Array        # () float32 in (0, 1]
    stop_ids: jax.Array     # (n,) int32, padded with -1 (never a token) to a power of two >= 8
    pad_id: jax.Array       # () int32: what finished rows emit

    @staticmethod
    def make(temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             pad_id: int = 0) -> "Sampling":
        """From Python values; up to 8 stop tokens share one shape (no recompile).

        >>> Sampling.make(stop_tokens=(2, 7)).stop_ids.tolist()
        [2, 7, -1, -1, -1, -1, -1, -1]
        """
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        stops = np.asarray(stop_tokens, np.int32).reshape(-1)
        if (stops < 0).any():
            raise ValueError(f"stop tokens must be token ids >= 0, got {stops.tolist()}")
        padded = np.full(bucket_length(max(stops.size, 1), 8), -1, np.int32)
        padded[: stops.size] = stops
        return Sampling(jnp.float32(temperature), jnp.float32(top_p), jnp.asarray(padded), jnp.int32(pad_id))


def bucket_length(n: int, minimum: int = 64) -> int:
    """The smallest power of two >= n and >= `minimum`.

    >>> bucket_length(1), bucket_length(64), bucket_length(65), bucket_length(5, minimum=4)
    (64, 64, 128, 8)
    """
    if n < 1 or minimum < 1:
        raise ValueError(f"bucket_length needs n >= 1 and minimum >= 1, got n={n}, minimum={minimum}")
    b = 1 << (max(n, minimum) - 1).bit_length()
    return b


def sample(logits, key, temperature, top_p):
    """Next tokens (b,) int32 from logits (b, V): greedy when temperature <= 0 (`lax.cond`,
    so the greedy path never sorts), else nucleus sampling (module docstring)."""

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def nucleus():
        scaled = logits.astype(jnp.float32) / temperature
        order = jnp.argsort(scaled, axis=-1, descending=True, stable=True)  # ties: lowest id first, as argmax
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # 0 for the most likely token: always kept
        ranked = jnp.where(mass_before < top_p, ranked, -jnp.inf)
        choice = jax.random.categorical(key, ranked, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, nucleus, greedy)


def _choose(logits, state_key, step, finished, sampling: Sampling):
    """Samples the next token of every row; finished rows emit pad; stop tokens finish rows."""
    tokens = sample(logits, jax.random.fold_in(state_key, step), sampling.temperature, sampling.top_p)
    tokens = jnp.where(finished, sampling.pad_id, tokens)
    return tokens, finished | jnp.isin(tokens, sampling.stop_ids)


def _llm_config(mcfg) -> LLMConfig:
    return mcfg if isinstance(mcfg, LLMConfig) else mcfg.llm


def _decoder(mcfg, params: dict, mode: str):
    """(decoder module, its params) for a mode."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if mode == "text":
        return models.build(_llm_config(mcfg)), params["llm"]
    if not isinstance(mcfg, MLLMConfig):
        raise ValueError(f"mode={mode!r} needs an MLLMConfig (got {type(mcfg).__name__}); "
                         "an LLMConfig runs mode='text' only")
    return multimodal_decoder(mcfg), multimodal_llm_params(params["llm"], params.get("branch", {}))


def _prefill(mcfg, params, tokens, positions, segment_ids, images, sampling, key, *, mode: str,
             cache_len: int, all_logits: bool = False):
    TRACES["prefill"] += 1
    b, t = tokens.shape
    if cache_len <= t:
        raise ValueError(f"cache_len={cache_len} leaves no slot after the {t} prompt slots")
    decoder, llm_params = _decoder(mcfg, params, mode)
    variables = {"params": llm_params}
    cache = init_kv_cache(_llm_config(mcfg), b, cache_len)
    if mode == "text":
        if images is not None:
            raise ValueError("mode='text' runs the base LLM alone and takes no images")
        hidden, cache = decoder.apply(variables, tokens, positions, segment_ids, return_hidden=True, cache=cache,
                                      fresh_cache=True)
    else:  # as structure.mllm.decode: image features into the image-token slots, types route experts
        embeds = decoder.apply(variables, tokens, method="embed")
        is_image = (tokens == mcfg.image_token_id) & (segment_ids > 0)
        if images is not None:
            embeds = embed_image_tokens(mcfg, params, embeds, is_image, images)
        hidden, cache = decoder.apply(variables, tokens, positions, segment_ids, inputs_embeds=embeds,
                                      token_types=is_image.astype(jnp.int32), return_hidden=True, cache=cache,
                                      fresh_cache=True)
    last = decoder.apply(variables, hidden[:, -1], method="unembed")  # left padding: every row's last token
    first, finished = _choose(last, key, jnp.int32(0), jnp.zeros((b,), bool), sampling)
    state = DecodeState(first, positions[:, -1].astype(jnp.int32) + 1, finished, key, jnp.int32(1))
    logits = decoder.apply(variables, hidden, method="unembed") if all_logits else last
    return cache, state, logits


prefill = jax.jit(_prefill, static_argnames=("mcfg", "mode", "cache_len", "all_logits"))
prefill.__doc__ = """prefill(mcfg, params, tokens, positions, segment_ids, images, sampling, key, *, mode,
        cache_len, all_logits=False) -> (cache, DecodeState, logits)

Runs a left-padded prompt batch (tokens / positions / segment_ids (b, P); padding =
segment 0) through the decoder of `mode` into a fresh cache of `cache_len` slots (prompt
at slots [0, P)), and samples each row's first new token from its last slot. `images`
(b, P_img, H, W, 3) or None. Returns the cache, the state for `decode_step` (its `tokens`
are the first new tokens) and float32 logits of the last slot (b, V), or with
`all_logits` of every slot (b, P, V). Jitted; `mcfg`, `mode`, `cache_len`, `all_logits`
static, so one compile per (batch, bucket)."""


def _decode_step(mcfg, params, cache, state: DecodeState, sampling: Sampling, *, mode: str):
    TRACES["decode_step"] += 1
    b = state.tokens.shape[0]
    decoder, llm_params = _decoder(mcfg, params, mode)
    tokens, positions = state.tokens[:, None], state.positions[:, None]
    ones = jnp.ones((b, 1), jnp.int32)
    types = None if mode == "text" else jnp.zeros((b, 1), jnp.int32)  # new tokens are text
    logits, cache = decoder.apply({"params": llm_params}, tokens, positions, ones, token_types=types, cache=cache)
    logits = logits[:, 0]
    nxt, finished = _choose(logits, state.key, state.step, state.finished, sampling)
    return cache, DecodeState(nxt, state.positions + 1, finished, state.key, state.step + 1), logits


decode_step = jax.jit(_decode_step, static_argnames=("mcfg", "mode"), donate_argnames=("cache",))
decode_step.__doc__ = """decode_step(mcfg, params, cache, state, sampling, *, mode) -> (cache, DecodeState, logits)

Feeds every row's `state.tokens` at `state.positions` into the next cache slot
(`cache["index"]`), and samples the next token from its logits (b, V) (returned too).
Finished rows emit `sampling.pad_id`. The cache is donated (updated in place where the
backend allows): do not reuse the one passed in. Jitted, `mcfg` and `mode` static: one
compile per (batch, cache length)."""


@dataclasses.dataclass
class GenerationResult:
    """What `generate` returns for a batch (numpy, on the host)."""
    tokens: np.ndarray    # (b, max_new_tokens) int32; pad_id after a row's stop token (and after an early end)
    lengths: np.ndarray   # (b,) new tokens per row, its stop token included
    finished: np.ndarray  # (b,) bool: the row emitted a stop token
    prompt_bucket: int    # P: padded prompt length
    cache_len: int        # S: cache slots

    def row(self, i: int) -> np.ndarray:
        """Row i's new tokens, up to and including its stop token."""
        return self.tokens[i, : self.lengths[i]]


def pad_prompts(prompts: Sequence[Sequence[int]], min_bucket: int = 64, pad_id: int = 0):
    """Left-pads prompts to their bucket: (tokens, positions, segment_ids), each (b, P)
    int32 numpy; each row's positions start at 0 at its first real token.

    >>> t, p, s = pad_prompts([[5, 6, 7], [8]], min_bucket=4)
    >>> t.tolist(), p.tolist(), s.tolist()
    ([[0, 5, 6, 7], [0, 0, 0, 8]], [[0, 0, 1, 2], [0, 0, 0, 0]], [[0, 1, 1, 1], [0, 0, 0, 1]])
    """
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    if not rows or any(r.size == 0 for r in rows):
        raise ValueError(f"every prompt needs at least one token (got lengths {[r.size for r in rows]})")
    bucket = bucket_length(max(r.size for r in rows), min_bucket)
    tokens = np.full((len(rows), bucket), pad_id, np.int32)
    positions = np.zeros((len(rows), bucket), np.int32)
    segments = np.zeros((len(rows), bucket), np.int32)
    for i, r in enumerate(rows):
        tokens[i, bucket - r.size:] = r
        positions[i, bucket - r.size:] = np.arange(r.size)
        segments[i, bucket - r.size:] = 1
    return tokens, positions, segments


def _check_inputs(mcfg, mode, prompts, images, vocab):
    for i, r in enumerate(prompts):
        r = np.asarray(r)
        if r.size and (r.min() < 0 or r.max() >= vocab):
            raise ValueError(f"prompt {i}: token ids outside [0, {vocab}): min {r.min()}, max {r.max()}")
    if mode == "text":
        if images is not None:
            raise ValueError("mode='text' runs the base LLM alone and takes no images")
        return
    counts = [int((np.asarray(r) == mcfg.image_token_id).sum()) for r in prompts]
    if images is None:
        if any(counts):
            raise ValueError(f"prompts have image tokens (id {mcfg.image_token_id}, counts {counts}) but no images")
        return
    if images.ndim != 5 or images.shape[0] != len(prompts):
        raise ValueError(f"images must be (b={len(prompts)}, P, H, W, C) per row, got shape {images.shape}")
    available = images.shape[1] * mcfg.tokens_per_tile
    for i, n in enumerate(counts):
        if n > available:
            raise ValueError(f"row {i}: {n} image tokens (id {mcfg.image_token_id}) but its images give "
                             f"{available} features ({images.shape[1]} tiles x {mcfg.tokens_per_tile} tokens)")


def generate(mcfg, params: dict, prompts: Sequence[Sequence[int]], *, mode: str = "text", images=None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, key=None,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, min_bucket: int = 64,
             check_every: int = 8, on_step: Callable[[int, np.ndarray], bool | None] | None = None
             ) -> GenerationResult:
    """Generates up to `max_new_tokens` per prompt (host loop over `prefill` / `decode_step`).

    prompts: b token-id sequences of any lengths (left-padded to a common bucket);
    images: (b, P, H, W, 3) NHWC tiles (uint8, or float normalised: `checked_tiles`), each
    row's in the order of its image tokens (modes "multimodal" / "shared"); key: PRNG key for sampling (temperature > 0;
    default `jax.random.key(0)`). See the module docstring for the cache layout.

    on_step(s, tokens): called with every emitted token number s (0: prefill's) and the
    (b,) int32 numpy tokens as they are decoded (for streaming; a host sync per step, so
    only when given). Returning True ends generation there: rows without a stop token then
    have `lengths` = the tokens emitted so far.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    _decoder(mcfg, params, mode)  # validates the mode / config pairing
    images = None if images is None else checked_tiles(images)
    _check_inputs(mcfg, mode, prompts, images, _llm_config(mcfg).vocab_size)
    tokens, positions, segments = pad_prompts(prompts, min_bucket, pad_id)
    cache_len = tokens.shape[1] + bucket_length(max_new_tokens, min_bucket)
    sampling = Sampling.make(temperature, top_p, stop_tokens, pad_id)
    key = jax.random.key(0) if key is None else key
    cache, state, _ = prefill(mcfg, params, tokens, positions, segments, images, sampling, key, mode=mode,
                              cache_len=cache_len)
    emitted = [state.tokens]
    stopped = on_step is not None and bool(on_step(0, np.asarray(state.tokens)))
    for step in range(1, max_new_tokens):
        if stopped or (step % check_every == 0 and bool(np.all(np.asarray(state.finished)))):
            break
        cache, state, _ = decode_step(mcfg, params, cache, state, sampling, mode=mode)
        emitted.append(state.tokens)
        stopped = on_step is not None and bool(on_step(step, np.asarray(state.tokens)))
    out = np.full((tokens.shape[0], max_new_tokens), pad_id, np.int32)
    out[:, : len(emitted)] = np.stack([np.asarray(t) for t in emitted], axis=1)
    finished = np.asarray(state.finished)
    stops = np.isin(out, np.asarray(stop_tokens, np.int32))
    # len(emitted) is max_new_tokens unless the loop ended early (every row stopped, or on_step)
    lengths = np.where(stops.any(axis=1), stops.argmax(axis=1) + 1, len(emitted))
    return GenerationResult(out, lengths.astype(np.int32), finished, tokens.shape[1], cache_len)
