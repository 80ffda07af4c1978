"""ChatML rendering (as Qwen uses it) with training labels and image placeholders.

A conversation renders to

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{text, with each <image> replaced by N image tokens}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n ...

and `loss_mask[t]` is True exactly for the tokens of assistant contents and the
`<|im_end|>` that closes each assistant turn (the model learns to stop), for assistant
turns that follow a user turn: an answer before any question is context only (as LLaVA's
preprocessing drops a leading non-human turn; data_pipelines.convert drops and counts them).
Everything else (role headers, user text, image tokens, the newline after `<|im_end|>`) is context only.
A sequence always starts with `<|im_start|>`, which is never a target, so in a packed
row no token is ever trained to be predicted from the previous sample.

Example (one image of 2 tokens, `T(...)` = the tokenizer's ids for that text, `I` = image token):

    turns = [{"role": "user", "content": "<image>\\nWhat colour?"}, {"role": "assistant", "content": "red"}]
    tokens    = [S] T("user\\n") [I I] T("\\nWhat colour?") [E] T("\\n") [S] T("assistant\\n") T("red") [E] T("\\n")
    loss_mask =  0      0..0    0 0        0...0           0      0     0        0..0          1..1   1     0
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from data_pipelines.records import IMAGE_TAG, ROLES
from data_pipelines.tokenizer import IM_END, IM_START, IMAGE_PAD, Tokenizer


@dataclasses.dataclass
class RenderedChat:
    """A conversation rendered by `ChatTemplate.render`."""
    tokens: np.ndarray            # int32 (L,)
    loss_mask: np.ndarray         # bool (L,): tokens trained as targets
    image_spans: list[tuple[int, int]]  # (start, length) of each image's token run, in order


class ChatTemplate:
    """ChatML rendering (Qwen2 / LLaVA-OneVision style `<|im_start|>role\n...<|im_end|>\n`):
    image tags expanded to runs of the image token, answers (and their end tokens) trained."""

    def __init__(self, tokenizer: Tokenizer, *, default_system: str | None = None,
                 image_token: str = IMAGE_PAD):
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.im_start = tokenizer.token_id(IM_START)
        self.im_end = tokenizer.token_id(IM_END)
        self.image_token_id = tokenizer.token_id(image_token)
        self._newline = tokenizer.encode("\n")
        self._headers = {r: tokenizer.encode(f"{r}\n") for r in ROLES}

    def render(self, turns: Sequence[dict], image_token_counts: Sequence[int] = (), *,
               add_generation_prompt: bool = False, example_id: str = "?") -> RenderedChat:
        """Tokens, loss mask and image spans of a conversation.

        `image_token_counts[i]` is how many LLM tokens the i-th image becomes (it depends
        on its tile grid); their number must equal the number of `<image>` tags.
        """
        tokens: list[int] = []
        mask: list[bool] = []
        spans: list[tuple[int, int]] = []

        def add(ids, trained=False):
            tokens.extend(ids)
            mask.extend([trained] * len(ids))

        if self.default_system is not None and (not turns or turns[0].get("role") != "system"):
            turns = [{"role": "system", "content": self.default_system}, *turns]
        n_images, asked = 0, False
        for i, turn in enumerate(turns):
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"example {example_id}: turn {i} has role {role!r} / content of type "
                                 f"{type(content).__name__}; roles are {ROLES}, content a string")
            if IMAGE_TAG in content and role != "user":
                raise ValueError(f"example {example_id}: turn {i} ({role}) contains {IMAGE_TAG}; "
                                 "images belong in user turns")
            asked = asked or role == "user"
            trained = role == "assistant" and asked
            add([self.im_start])
            add(self._headers[role])
            for j, piece in enumerate(content.split(IMAGE_TAG)):
                if j:
                    if n_images >= len(image_token_counts):
                        raise ValueError(f"example {example_id}: more {IMAGE_TAG} tags than images "
                                         f"({len(image_token_counts)})")
                    spans.append((len(tokens), image_token_counts[n_images]))
                    add([self.image_token_id] * image_token_counts[n_images])
                    n_images += 1
                if piece:
                    add(self.tokenizer.encode(piece), trained)
            add([self.im_end], trained)
            add(self._newline)
        if n_images != len(image_token_counts):
            raise ValueError(f"example {example_id}: {n_images} {IMAGE_TAG} tags but "
                             f"{len(image_token_counts)} images")
        if add_generation_prompt:
            add([self.im_start])
            add(self._headers["assistant"])
        ids = np.asarray(tokens, np.int32)
        # Text never yields a structural id (Tokenizer.encode splits them); a tokenizer that maps
        # text to one anyway would give an image slot no image or end a turn: refused, by name.
        image_slots = sum(length for _, length in spans)
        placed = int(np.count_nonzero(ids == self.image_token_id))
        if placed != image_slots:
            raise ValueError(f"example {example_id}: {placed} image tokens but its images "
                             f"fill {image_slots}: its text encodes to the image token (id {self.image_token_id})")
        for token_id, name, count in ((self.im_start, IM_START, len(turns) + add_generation_prompt),
                                      (self.im_end, IM_END, len(turns))):
            placed = int(np.count_nonzero(ids == token_id))
            if placed != count:
                raise ValueError(f"example {example_id}: its text encodes to {name} (id {token_id}) "
                                 f"{placed - count} time(s)")
        return RenderedChat(ids, np.asarray(mask, bool), spans)


def truncate(chat: RenderedChat, max_len: int) -> tuple[RenderedChat, int]:
    """Cuts to at most `max_len` tokens without ever splitting an image's tokens: if the
    cut falls inside an image span, it moves to just before that image. Returns the
    truncated chat and how many images it still contains (their tiles are kept, the
    rest dropped by the caller).

    Example: spans [(3, 4)] (tokens 3..6 are one image), max_len 5 -> cut at 3, 0 images.
    """
    if len(chat.tokens) <= max_len:
        return chat, len(chat.image_spans)
    cut = max_len
    kept = []
    for start, length in chat.image_spans:
        if start + length <= cut:
            kept.append((start, length))
        else:
            cut = min(cut, start)
            break
    return RenderedChat(chat.tokens[:cut], chat.loss_mask[:cut], kept), len(kept)
