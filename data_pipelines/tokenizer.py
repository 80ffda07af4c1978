"""One tokenizer interface over SentencePiece `.model` files and Hugging Face `tokenizer.json`.

Special tokens (ChatML's `<|im_start|>`, `<|im_end|>`, the image placeholder) are looked up
by `token_id(piece)` and inserted as ids by the chat renderer; `encode` never turns text
into special tokens, so user text cannot inject a turn boundary or an image slot: the chat
tokens count as special whatever the tokenizer's flag says (Llama-family bases often add
them with `add_tokens`, as non-special), and every character of the text is kept (NUL too).

    >>> tok = load_tokenizer("/ckpt/qwen2.5-3b/hf_assets")         # tokenizer.json inside
    >>> tok.token_id("<|im_end|>")
    151645
"""
from __future__ import annotations

import io
import os
import re
from typing import Iterable, Protocol, Sequence

from etils import epath

IM_START, IM_END, IMAGE_PAD, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|endoftext|>"
CHAT_SPECIAL_TOKENS = (IM_START, IM_END, IMAGE_PAD, END_OF_TEXT)


class Tokenizer(Protocol):
    """What the pipeline, the chat renderer and inference need of a tokenizer."""
    vocab_size: int  # ids are in [0, vocab_size), added tokens included

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS / EOS added; never a special token's id (see the module)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens written out."""
        ...

    def token_id(self, piece: str) -> int:
        """The id of one vocabulary entry (e.g. "<|im_end|>"); KeyError naming it if absent."""
        ...


class SentencePieceTokenizer:
    """A SentencePiece `.model` (a local path or gs://, or `model_proto` bytes) as a `Tokenizer`;
    its user-defined pieces (our chat specials) are never produced by `encode`."""

    def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
        import sentencepiece as spm
        self.path = model_path
        self._sp = spm.SentencePieceProcessor()
        if model_proto is None:  # read through etils.epath: a local file or gs://
            if not epath.Path(model_path).is_file():
                raise FileNotFoundError(f"SentencePiece model {model_path} not found")
            model_proto = epath.Path(model_path).read_bytes()
        self._sp.LoadFromSerializedProto(model_proto)
        self.vocab_size = self._sp.GetPieceSize()
        # User-defined pieces (our chat specials) are matched inside any text by SentencePiece.
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        self._specials = [p.piece for p in proto.pieces if p.type == user_defined]

    def encode(self, text: str) -> list[int]:
        """`Tokenizer.encode`."""
        ids: list[int] = []
        for part in _split_specials(text, self._specials):
            ids += self._sp.EncodeAsIds(part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """`Tokenizer.decode`."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        """`Tokenizer.token_id`."""
        i = self._sp.PieceToId(piece)
        if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i):
            raise KeyError(f"token {piece!r} is not in the vocabulary of {self.path or 'this tokenizer'}")
        return i


class HFTokenizer:
    """A `tokenizers` (Rust) tokenizer from `tokenizer.json`; no transformers needed."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found")
        self.path = path
        self._tok = _Tok.from_str(epath.Path(path).read_text())  # local or gs:// (etils.epath)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # Added tokens match inside any text: the special ones and the chat ones (flag or not) are split.
        self._specials = [t.content for t in self._tok.get_added_tokens_decoder().values()
                          if t.special or t.content in CHAT_SPECIAL_TOKENS]

    def encode(self, text: str) -> list[int]:
        """`Tokenizer.encode`."""
        ids: list[int] = []
        for part in _split_specials(text, self._specials):
            ids += self._tok.encode(part, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """`Tokenizer.decode`."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, piece: str) -> int:
        """`Tokenizer.token_id`."""
        i = self._tok.token_to_id(piece)
        if i is None:
            raise KeyError(f"token {piece!r} is not in the vocabulary of {self.path}")
        return i


def _split_specials(text: str, specials: list[str]) -> list[str]:
    """Splits text after the first character of each special-token string in it, so that no
    part holds a whole one and the tokenizer encodes it as plain text; every character is kept.

        >>> _split_specials("a<|im_end|>b\0c", ["<|im_end|>"])
        ['a<', '|im_end|>b\x00c']
    """
    if not specials:
        return [text] if text else []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    parts, start = [], 0
    for m in pattern.finditer(text):
        parts.append(text[start:m.start() + 1])
        start = m.start() + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def load_tokenizer(path: str) -> Tokenizer:
    """From a `.model` file, a `tokenizer.json`, or a directory holding one of them."""
    if epath.Path(path).is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "spm.model"):
            if (epath.Path(path) / name).is_file():
                return load_tokenizer(os.fspath(epath.Path(path) / name))
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model inside")
    if path.endswith(".json"):
        return HFTokenizer(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise ValueError(f"{path}: unknown tokenizer format (expected tokenizer.json or a .model file)")


def train_sentencepiece(texts: Iterable[str], out_path: str, *, vocab_size: int,
                        special_tokens: Sequence[str] = CHAT_SPECIAL_TOKENS) -> SentencePieceTokenizer:
    """Trains a small deterministic SentencePiece model (for the demo and tests): BPE,
    byte fallback (any text encodes), the chat special tokens as user-defined symbols, and
    no normalisation (newlines and spaces survive, so ChatML text round-trips exactly)."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, user_defined_symbols=list(special_tokens), character_coverage=1.0,
        num_threads=1, minloglevel=2, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        split_digits=True, hard_vocab_limit=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(buf.getvalue())
    return SentencePieceTokenizer(out_path)
