"""Requests: a prompt (text or chat turns) and its images -> token ids and image tiles,
exactly as the data pipeline renders a training sample, so the model sees at inference
what it saw in training: the model's own chat template, or ChatML for a tokenizer without
one (`data_pipelines.chat`); a template's default system turn and options included, the
date it reads today's (as transformers and vLLM render it).

    >>> from genieblue_jax.inference.requests import RequestEncoder
    >>> enc = RequestEncoder(tokenizer, tile_size=56, tokens_per_tile=16,
    ...                      image_mode="dynamic", max_tiles=4)           # doctest: +SKIP
    >>> req = enc.encode("What colour is the circle?", images=["circle.png"])  # doctest: +SKIP
    >>> req.tokens[:3], req.tiles.shape                                    # doctest: +SKIP
    ([3, 1076, 263], (1, 56, 56, 3))

A text prompt becomes one user turn; a prompt without `<image>` tags but with images gets
one `<image>\\n` per image in front of it (LLaVA's convention). The chat ends with the
assistant header (`add_generation_prompt`), so the model's next token starts its answer.
A plain-text prompt (`chat=False`) gets what the tokenizer adds around a text (Llama 3's and
Gemma's BOS), as transformers' `tokenizer(text)` does. `stop_tokens`: where answers end
(`data_pipelines.chat`: generation_config.json's eos ids, the tokenizer's eos token, the
template's end of turn).
Images may be file paths, encoded bytes, PIL images or uint8 (H, W, 3) arrays; each one is
cut into tiles with the training recipe's `image_mode` / `max_tiles` and takes
`tiles * tokens_per_tile` image tokens.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from data_pipelines import images as image_lib
from data_pipelines.chat import chat_renderer, stop_token_ids
from data_pipelines.records import IMAGE_TAG


@dataclasses.dataclass
class Request:
    """One encoded request: its prompt's token ids (image tokens in place) and its tiles."""
    tokens: list[int]
    tiles: np.ndarray  # uint8 (k, S, S, 3) (normalised on device); k = 0 without images


def read_image(image: Any, where: str = "image") -> np.ndarray:
    """Any supported image form -> uint8 (H, W, 3) RGB; errors name `where` (e.g. the path)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: image file {path} not found")
        with open(path, "rb") as f:
            data = f.read()
        try:
            return image_lib.decode_image(data)
        except image_lib.ImageDecodeError as e:
            raise ValueError(f"{where}: {path} is not a readable image: {e}") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return image_lib.decode_image(bytes(image))
        except image_lib.ImageDecodeError as e:
            raise ValueError(f"{where}: {e}") from None
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"), np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise ValueError(f"{where}: expected a path, bytes, a PIL image or a uint8 (H, W, 3) array; "
                         f"got {type(image).__name__} {getattr(arr, 'dtype', '')} {getattr(arr, 'shape', '')}")
    return arr


class RequestEncoder:
    """Prompt + images -> `Request`, with the chat rendering and tiling of training.

    `image_token_id`: the model's image placeholder (`MLLMConfig.image_token_id`; None for an
    LLM alone); `chat_template` / `template_kwargs`: as the model was trained (a workdir's
    `data.chat_template` / `data.chat_template_kwargs`; "auto" and none for an imported LLM).
    A tokenizer with neither a template nor ChatML's tokens takes plain text only (`chat=False`).
    """

    def __init__(self, tokenizer, *, tile_size: int, tokens_per_tile: int, image_mode: str = "dynamic",
                 max_tiles: int = 16, system: str | None = None, image_token_id: int | None = None,
                 chat_template: str = "auto", template_kwargs: dict | None = None):
        if image_mode not in image_lib.MODES:
            raise ValueError(f"image_mode={image_mode!r}; choose one of {image_lib.MODES}")
        self.tokenizer = tokenizer
        self.tile_size, self.tokens_per_tile = tile_size, tokens_per_tile
        self.image_mode, self.max_tiles = image_mode, max_tiles
        try:
            image_token = None if image_token_id is None else tokenizer.piece(image_token_id)
            self.template = chat_renderer(tokenizer, chat_template=chat_template, image_token=image_token,
                                          template_kwargs=template_kwargs, default_system=system)
        except (KeyError, ValueError) as e:  # e.g. ChatML's tokens not in the vocabulary: plain text only
            self.template = None
            self._no_chat = str(e.args[0])

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """Where an answer ends: the chat renderer's stop tokens (generation_config.json's eos ids,
        the tokenizer's eos token, the template's end of turn; ChatML's `<|im_end|>` /
        `<|endoftext|>`), or for a tokenizer without chat the declared ones (`chat.stop_token_ids`)."""
        if self.template is not None:
            return self.template.stop_token_ids
        return stop_token_ids(self.tokenizer)

    def tiles(self, images: Sequence[Any], where: str = "request") -> list[np.ndarray]:
        """Each image (path, bytes, PIL or array) cut as training cut it: uint8 (k, S, S, 3)."""
        return [image_lib.to_tiles(read_image(im, f"{where}, image {i}"), tile=self.tile_size,
                                     mode=self.image_mode, max_tiles=self.max_tiles)
                for i, im in enumerate(images)]

    def encode(self, prompt: str | Sequence[dict], images: Sequence[Any] = (), *, chat: bool = True,
               where: str = "request", template_kwargs: dict | None = None) -> Request:
        """`prompt`: text (one user turn) or chat turns [{"role", "content"}, ...]; with
        `chat=False` the text is tokenised as it is, with the tokenizer's BOS where it adds one
        (no template; no images). `template_kwargs`: the template's options for this request
        (over the encoder's own), e.g. {"enable_thinking": False}."""
        if isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "shape") or hasattr(images, "convert"):
            images = [images]  # a single image
        images = list(images or ())
        if not chat:
            if images:
                raise ValueError(f"{where}: images need the chat template (chat=True) for their <image> slots")
            if not isinstance(prompt, str):
                raise ValueError(f"{where}: chat=False takes a text prompt, got {type(prompt).__name__}")
            return Request(list(self.tokenizer.encode(prompt, add_special_tokens=True)), self._no_tiles())
        if self.template is None:
            raise ValueError(f"{where}: this model's tokenizer cannot render chats ({self._no_chat}); "
                             "use chat=False for plain text completion")
        if isinstance(prompt, str):
            turns = [{"role": "user", "content": prompt}]
        else:
            turns = [dict(t) for t in prompt]
        tags = sum(str(t.get("content", "")).count(IMAGE_TAG) for t in turns)
        if images and tags == 0:
            user = next((t for t in turns if t.get("role") == "user"), None)
            if user is None:
                raise ValueError(f"{where}: images given but no user turn to attach them to")
            user["content"] = f"{IMAGE_TAG}\n" * len(images) + user["content"]
        elif tags != len(images):
            raise ValueError(f"{where}: {tags} {IMAGE_TAG} tag(s) in the prompt but {len(images)} image(s)")
        tiles = self.tiles(images, where)
        chat_out = self.template.render(turns, [len(p) * self.tokens_per_tile for p in tiles],
                                        add_generation_prompt=True, example_id=where, template_kwargs=template_kwargs)
        stacked = np.concatenate(tiles) if tiles else self._no_tiles()
        return Request(chat_out.tokens.tolist(), stacked)

    def _no_tiles(self) -> np.ndarray:
        return np.zeros((0, self.tile_size, self.tile_size, 3), np.uint8)


def checked_tiles(images, where: str = "images") -> np.ndarray:
    """Image tiles as the vision tower takes them (`models.siglip.normalize_pixels`): uint8
    pixels stay uint8 (normalised on device); float tiles become float32 and must already be
    normalised to [-1, 1] (HF `pixel_values`). ValueError naming `where` for a float array
    outside that range: uint8 pixels cast to float (0 .. 255) would otherwise run as if they
    were normalised values, silently wrong.

        >>> checked_tiles(np.full((1, 2, 2, 3), 255, np.uint8)).dtype
        dtype('uint8')
        >>> checked_tiles(np.full((1, 2, 2, 3), 255.0))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ValueError: images: float tiles must be normalised to [-1, 1] ...
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    images = images.astype(np.float32)
    if images.size and not np.abs(images).max() <= 1.0 + 1e-6:  # NaN fails too
        raise ValueError(f"{where}: float tiles must be normalised to [-1, 1] (HF pixel_values), got values in "
                         f"[{np.nanmin(images):.3g}, {np.nanmax(images):.3g}]; pass raw pixels as uint8")
    return images


def stack_tiles(tile_lists: Sequence[np.ndarray]) -> np.ndarray | None:
    """Per-request tiles (k_i, S, S, 3) -> (b, max k_i, S, S, 3), zero-padded (padding
    tiles are never referenced by an image token); None when no request has images."""
    most = max((len(p) for p in tile_lists), default=0)
    if most == 0:
        return None
    s = next(p.shape[1:] for p in tile_lists if len(p))
    dtypes = {p.dtype for p in tile_lists if len(p)}
    if len(dtypes) > 1:  # uint8 tiles and normalised floats mean different pixels
        raise ValueError(f"tiles of one batch must share a dtype, got {sorted(map(str, dtypes))}")
    out = np.zeros((len(tile_lists), most, *s), dtypes.pop())
    for i, p in enumerate(tile_lists):
        out[i, : len(p)] = p
    return out
