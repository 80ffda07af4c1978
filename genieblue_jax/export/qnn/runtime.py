"""The host side of the exported graphs: a small prefill + decode loop with the KV cache,
over onnxruntime sessions (or AIMET's quantization-simulation sessions, or the PyTorch
graphs themselves: anything with `run(output_names, feeds) -> list of arrays`).

Cache and mask layout (what the host does on the phone too). The host owns a cache of C
slots per layer; its first `n_past` slots hold the keys / values written so far (after
RoPE; keys transposed, see `graphs`). A call with AR tokens feeds the first C - AR slots
as `past_*` (slots >= n_past are stale or zero and masked), and the graph appends its AR
new tokens as slots C - AR .. C - 1 of its own attention window. The host then copies the
valid new keys / values to cache slots [n_past, n_past + valid). RoPE positions are
n_past + j. Query j sees every written past slot and the new slots up to itself:

    C = 8, AR = 3, n_past = 2 (two tokens already cached, then a call with three new ones):

    slot        0  1  2  3  4 | 5  6  7       (0-4: past window, 5-7: the new tokens)
    query 0     0  0  M  M  M | 0  M  M       0 = visible, M = MASK_VALUE
    query 1     0  0  M  M  M | 0  0  M
    query 2     0  0  M  M  M | 0  0  0

Sliding-window layers (Gemma 3, SmolLM3) read a second mask, `sliding_attention_mask`:
the same slots, less those a query's window no longer reaches (token q sees token k iff
q - window < k, `models.masks.sliding_window_mask`). Their caches keep every slot like the
others' (static shapes; the JAX generator keeps a ring of the window instead).

A prompt longer than AR runs in chunks of AR (the last one right-padded with token 0; the
padding's keys are never copied to the cache, its logits never read); generation then
runs the decode graph (AR = 1) a token at a time. `n_past + AR <= C` always: a prompt plus
answer must fit the context.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

from data_pipelines import images as image_lib
from genieblue_jax.export.qnn.graphs import MASK_VALUE, sliding_window
from genieblue_jax.inference.requests import checked_tiles
from genieblue_jax.models.masks import sliding_window_mask


class Session(Protocol):
    """What the runtime needs of an inference session (onnxruntime's, AIMET's sim, torch)."""

    def run(self, output_names, feeds: dict) -> list:
        """Outputs `output_names` (None: all) for the input arrays `feeds` {name: array}."""
        ...


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Shapes of one decoder's graphs (from the export manifest)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context: int
    prefill_len: int
    multimodal: bool
    sliding_window: int = 0  # > 0: the graphs take `sliding_attention_mask` for that window

    @classmethod
    def from_config(cls, llm_cfg, *, context: int, prefill_len: int, multimodal: bool) -> "DecoderSpec":
        """The spec of a decoder graph exported from `llm_cfg` (an LLMConfig)."""
        return cls(llm_cfg.num_layers, llm_cfg.num_kv_heads, llm_cfg.head_dim, llm_cfg.hidden_size,
                   llm_cfg.vocab_size, context, prefill_len, multimodal, sliding_window(llm_cfg))

    def to_dict(self) -> dict:
        """JSON-able fields (the export manifest)."""
        return dataclasses.asdict(self)


def attention_mask(n_past: int, ar: int, context: int, window: int | None = None) -> np.ndarray:
    """Additive mask (1, 1, AR, C) for AR new tokens after `n_past` cached ones (module
    docstring): past slots [0, n_past) and the causal part of the new slots are visible; with
    a `window` (a sliding layer's), only the keys within it (`masks.sliding_window_mask` over
    the token each slot holds). ValueError when the tokens do not fit the context.

        >>> (attention_mask(2, 3, 8)[0, 0] == 0).astype(int)
        array([[1, 1, 0, 0, 0, 1, 0, 0],
               [1, 1, 0, 0, 0, 1, 1, 0],
               [1, 1, 0, 0, 0, 1, 1, 1]])
        >>> (attention_mask(2, 3, 8, window=2)[0, 0] == 0).astype(int)   # tokens 2, 3, 4: 2 keys each
        array([[0, 1, 0, 0, 0, 1, 0, 0],
               [0, 0, 0, 0, 0, 1, 1, 0],
               [0, 0, 0, 0, 0, 0, 1, 1]])
    """
    if n_past + ar > context:
        raise ValueError(f"{n_past} cached + {ar} new tokens exceed the context of {context} slots")
    visible = np.zeros((ar, context), bool)
    visible[:, :n_past] = True
    visible[:, context - ar:] = np.tril(np.ones((ar, ar), bool))
    if window is not None:
        held = np.arange(context)                       # the token each slot holds: past slots their own,
        held[context - ar:] = n_past + np.arange(ar)    # the new slots the AR new tokens
        visible &= np.asarray(sliding_window_mask(n_past + np.arange(ar), held, window))
    return np.where(visible, np.float32(0), np.float32(MASK_VALUE))[None, None]


def place_image_features(tokens: np.ndarray, image_token_id: int, features: np.ndarray | None):
    """Per-position image inputs of the multimodal prefill: (embeds (n, hidden), mask (n,)).

    The i-th image token gets features[i] (tile order, as `structure.merge_image_features`);
    every other position gets zeros and mask 0. The counts must agree.

        >>> e, m = place_image_features(np.array([5, 9, 9, 6]), 9, np.ones((2, 3), np.float32))
        >>> m.tolist(), e.sum(axis=1).tolist()
        ([0.0, 1.0, 1.0, 0.0], [0.0, 3.0, 3.0, 0.0])
    """
    tokens = np.asarray(tokens)
    is_image = tokens == image_token_id
    n_image = int(is_image.sum())
    n_features = 0 if features is None else len(features)
    if n_image != n_features:
        raise ValueError(f"the prompt has {n_image} image tokens (id {image_token_id}) but the images give "
                         f"{n_features} features")
    hidden = features.shape[-1] if features is not None else 0
    embeds = np.zeros((len(tokens), hidden), np.float32)
    if n_image:
        embeds[is_image] = features
    return embeds, is_image.astype(np.float32)


class Decoder:
    """Prefill + decode over one decoder's two graphs, with the host-side KV cache.

        >>> dec = Decoder(spec, ort.InferenceSession("llm_base_prefill.onnx"),
        ...               ort.InferenceSession("llm_base_decode.onnx"))           # doctest: +SKIP
        >>> logits = dec.score(prompt_and_answer, split=len(prompt))   # doctest: +SKIP
        >>> dec.generate(prompt, max_new_tokens=32, stop_tokens=(2,))  # doctest: +SKIP

    `score` gives teacher-forced logits (n, vocab); `generate` greedy token ids.
    """

    def __init__(self, spec: DecoderSpec, prefill: Session, decode: Session):
        self.spec, self.prefill_session, self.decode_session = spec, prefill, decode
        self.outputs = ["logits"] + [f"present_{kv}_{i}" for i in range(spec.num_layers) for kv in ("key", "value")]
        self.reset()

    def reset(self) -> None:
        """Empties the KV cache (a new sequence)."""
        s = self.spec
        self.keys = np.zeros((s.num_layers, s.num_kv_heads, s.head_dim, s.context), np.float32)
        self.values = np.zeros((s.num_layers, s.num_kv_heads, s.context, s.head_dim), np.float32)
        self.n_past = 0

    def _feeds(self, ids, ar: int, image_embeds=None, image_mask=None) -> dict:
        s = self.spec
        valid = len(ids)
        feeds = {"input_ids": np.zeros((1, ar), np.int32),
                 "position_ids": (self.n_past + np.arange(ar, dtype=np.int32))[None],
                 "attention_mask": attention_mask(self.n_past, ar, s.context)}
        if s.sliding_window:
            feeds["sliding_attention_mask"] = attention_mask(self.n_past, ar, s.context, s.sliding_window)
        feeds["input_ids"][0, :valid] = ids
        if image_embeds is not None:
            embeds = np.zeros((1, ar, s.hidden_size), np.float32)
            mask = np.zeros((1, ar), np.float32)
            embeds[0, :valid], mask[0, :valid] = image_embeds, image_mask
            feeds["image_embeds"], feeds["image_mask"] = embeds, mask
        past = s.context - ar
        for i in range(s.num_layers):
            feeds[f"past_key_{i}"] = np.ascontiguousarray(self.keys[i, :, :, :past][None])
            feeds[f"past_value_{i}"] = np.ascontiguousarray(self.values[i, :, :past][None])
        return feeds

    def _call(self, session: Session, ids, ar: int, image_embeds=None, image_mask=None) -> np.ndarray:
        valid = len(ids)
        if self.n_past + ar > self.spec.context:
            raise ValueError(f"context full: {self.n_past} cached tokens + a call of {ar} exceed the context of "
                             f"{self.spec.context} (export with a longer --context)")
        out = session.run(self.outputs, self._feeds(ids, ar, image_embeds, image_mask))
        n = self.n_past
        for i in range(self.spec.num_layers):
            self.keys[i, :, :, n:n + valid] = out[1 + 2 * i][0, :, :, :valid]
            self.values[i, :, n:n + valid] = out[2 + 2 * i][0, :, :valid]
        self.n_past += valid
        return np.asarray(out[0][0, :valid], np.float32)

    def prefill(self, tokens, image_embeds=None, image_mask=None) -> np.ndarray:
        """Runs `tokens` (n,) through the prefill graph in chunks of AR; returns their logits
        (n, vocab). A multimodal decoder takes per-position `image_embeds` (n, hidden) and
        `image_mask` (n,) (`place_image_features`); without them, zeros (a text prompt)."""
        s = self.spec
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if s.multimodal and image_embeds is None:
            image_embeds = np.zeros((len(tokens), s.hidden_size), np.float32)
            image_mask = np.zeros((len(tokens),), np.float32)
        elif not s.multimodal and image_embeds is not None:
            raise ValueError("the base decoder takes no image inputs; use the multimodal decoder")
        out = []
        for lo in range(0, len(tokens), s.prefill_len):
            hi = min(lo + s.prefill_len, len(tokens))
            ie = None if image_embeds is None else (image_embeds[lo:hi], image_mask[lo:hi])
            out.append(self._call(self.prefill_session, tokens[lo:hi], s.prefill_len, *(ie or ())))
        return np.concatenate(out, axis=0) if out else np.zeros((0, s.vocab_size), np.float32)

    def step(self, token: int) -> np.ndarray:
        """One decode-graph call for `token`; its logits (vocab,)."""
        return self._call(self.decode_session, np.asarray([token], np.int32), 1)[0]

    def score(self, tokens, *, split: int | None = None, image_embeds=None, image_mask=None) -> np.ndarray:
        """Teacher-forced logits (n, vocab) of `tokens`: the first `split` (default all) run
        through prefill, the rest one decode step each (image tokens must lie before `split`)."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        split = len(tokens) if split is None else split
        if not 1 <= split <= len(tokens):
            raise ValueError(f"split={split} outside [1, {len(tokens)}]")
        if image_mask is not None and np.asarray(image_mask)[split:].any():
            raise ValueError(f"image tokens after split={split}: the decode graph takes no images")
        self.reset()
        ie = None if image_embeds is None else (image_embeds[:split], image_mask[:split])
        logits = [self.prefill(tokens[:split], *(ie or ()))]
        logits += [self.step(int(t))[None] for t in tokens[split:]]
        return np.concatenate(logits, axis=0)

    def generate(self, tokens, *, max_new_tokens: int, stop_tokens: Sequence[int] = (), image_embeds=None,
                 image_mask=None) -> list[int]:
        """Greedy generation after the prompt `tokens`; returns the new token ids (a stop
        token, if one came, included)."""
        self.reset()
        next_logits = self.prefill(tokens, image_embeds, image_mask)[-1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(next_logits))
            out.append(token)
            if token in stop_tokens or self.n_past >= self.spec.context:
                break
            next_logits = self.step(token)
        return out


class Vision:
    """The vision graph over any number of tiles, `batch` at a time (the graph's fixed n;
    the last call is zero-padded)."""

    def __init__(self, session: Session, batch: int, image_size: int):
        self.session, self.batch, self.image_size = session, batch, image_size

    def features(self, tiles) -> np.ndarray:
        """tiles (P, S, S, 3) -> (P * tokens_per_tile, llm_hidden), tile order. The graph takes
        HF `pixel_values`: uint8 tiles are normalised here (`images.normalize`), float tiles
        are taken as normalised."""
        tiles = checked_tiles(tiles, "tiles")
        tiles = image_lib.normalize(tiles) if tiles.dtype == np.uint8 else tiles
        s = self.image_size
        if tiles.ndim != 4 or tiles.shape[1:] != (s, s, 3):
            raise ValueError(f"tiles must be (P, {s}, {s}, 3), got {tiles.shape}")
        out = []
        for lo in range(0, len(tiles), self.batch):
            chunk = tiles[lo:lo + self.batch]
            padded = np.zeros((self.batch, s, s, 3), np.float32)
            padded[:len(chunk)] = chunk
            feats = self.session.run(["image_features"], {"pixel_values": padded})[0]
            out.append(feats[:len(chunk)])
        if not out:
            return np.zeros((0, 0), np.float32)
        feats = np.concatenate(out, axis=0)
        return feats.reshape(-1, feats.shape[-1])


class TorchSession:
    """A PyTorch graph behind the session interface (debugging; the tests run onnxruntime)."""

    def __init__(self, module, input_names: Sequence[str], output_names: Sequence[str]):
        self.module, self.input_names, self.output_names = module, list(input_names), list(output_names)

    def run(self, output_names, feeds: dict) -> list[Any]:
        """`Session.run` through the torch module."""
        import torch
        with torch.no_grad():
            outs = self.module(*(torch.from_numpy(np.asarray(feeds[n])) for n in self.input_names))
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        by_name = dict(zip(self.output_names, (o.numpy() for o in outs)))
        return [by_name[n] for n in (output_names or self.output_names)]
