"""One tokenizer interface over SentencePiece `.model` files and Hugging Face `tokenizer.json`,
and what a tokenizer's directory says beside it (`TokenizerAssets`: tokenizer_config.json's
special tokens, the chat template, generation_config.json's end tokens).

Special tokens (ChatML's `<|im_start|>`, `<|im_end|>`, the image placeholder) are looked up
by `token_id(piece)` and inserted as ids by the chat renderer; `encode` never turns text
into special tokens, so user text cannot inject a turn boundary or an image slot: the chat
tokens count as special whatever the tokenizer's flag says (Llama-family bases often add
them with `add_tokens`, as non-special), and every character of the text is kept (NUL too).
`encode(text, add_special_tokens=True)` adds what the tokenizer's post-processor adds around
a text (Llama 3's and Gemma's BOS; nothing for Qwen), as `transformers`' `tokenizer(text)` does.

    >>> tok = load_tokenizer("/ckpt/qwen2.5-3b/hf_assets")         # tokenizer.json inside
    >>> tok.token_id("<|im_end|>")
    151645
    >>> read_assets("/ckpt/qwen2.5-3b/hf_assets").special_tokens   # tokenizer_config.json
    {'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'}
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
from typing import Iterable, Protocol, Sequence

from etils import epath

IM_START, IM_END, IMAGE_PAD, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|endoftext|>"
CHAT_SPECIAL_TOKENS = (IM_START, IM_END, IMAGE_PAD, END_OF_TEXT)


class Tokenizer(Protocol):
    """What the pipeline, the chat renderer and inference need of a tokenizer."""
    vocab_size: int  # ids are in [0, vocab_size), added tokens included
    path: str | None  # the tokenizer file it was read from

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; never a special token's id from the text itself (see the module).
        With `add_special_tokens`, the ids the tokenizer's post-processor puts around a text
        (e.g. Llama 3's BOS) are added, as `transformers`' `tokenizer(text)` adds them."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens written out."""
        ...

    def token_id(self, piece: str) -> int:
        """The id of one vocabulary entry (e.g. "<|im_end|>"); KeyError naming it if absent."""
        ...

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id (e.g. 151645 -> "<|im_end|>")."""
        ...

    @property
    def added_tokens(self) -> dict[str, int]:
        """The tokens added to the base vocabulary (special or not): {text: id}."""
        ...

    @property
    def special_tokens(self) -> dict[str, int]:
        """The control tokens `encode` never produces from text: {text: id}."""
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

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`Tokenizer.encode`. SentencePiece has no post-processor: `add_special_tokens` adds
        the model's BOS / EOS where the directory's tokenizer_config.json asks for them
        (`add_bos_token` / `add_eos_token`), as transformers' SentencePiece tokenizers do."""
        ids: list[int] = []
        for part in _split_specials(text, self._specials):
            ids += self._sp.EncodeAsIds(part)
        if add_special_tokens:
            bos, eos = self._around
            ids = bos + ids + eos
        return ids

    @functools.cached_property
    def _around(self) -> tuple[list[int], list[int]]:
        config = read_assets(self.path).config if self.path else {}
        bos, eos = self._sp.bos_id(), self._sp.eos_id()
        return ([bos] if config.get("add_bos_token") and bos >= 0 else [],
                [eos] if config.get("add_eos_token") and eos >= 0 else [])

    def decode(self, ids: Sequence[int]) -> str:
        """`Tokenizer.decode`."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        """`Tokenizer.token_id`."""
        i = self._sp.PieceToId(piece)
        if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i):
            raise KeyError(f"token {piece!r} is not in the vocabulary of {self.path or 'this tokenizer'}")
        return i

    def piece(self, token_id: int) -> str:
        """`Tokenizer.piece`."""
        return self._sp.IdToPiece(int(token_id))

    @property
    def added_tokens(self) -> dict[str, int]:
        """`Tokenizer.added_tokens`: the user-defined pieces."""
        return {p: self._sp.PieceToId(p) for p in self._specials}

    @property
    def special_tokens(self) -> dict[str, int]:
        """`Tokenizer.special_tokens`: the user-defined pieces (control pieces never match text)."""
        return self.added_tokens


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

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`Tokenizer.encode`: the parts between split special strings are encoded one by one,
        merged, and (with `add_special_tokens`) run through the post-processor, as the
        `tokenizers` library's own `encode(text)` would run them."""
        parts = [self._tok.encode(part, add_special_tokens=False) for part in _split_specials(text, self._specials)]
        if not add_special_tokens:
            return [i for part in parts for i in part.ids]
        from tokenizers import Encoding
        merged = Encoding.merge(parts) if parts else self._tok.encode("", add_special_tokens=False)
        return self._tok.post_process(merged, None, add_special_tokens=True).ids

    def encode_chat(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of a chat a template rendered, its special-token strings
        encoded as those tokens and nothing added around it: what transformers'
        `apply_chat_template(..., tokenize=True)` does with the rendered text (`tokenizer(chat,
        add_special_tokens=False)`). Only for text whose user parts were checked to hold no
        special-token string (`data_pipelines.chat.TemplateRenderer`)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int]) -> str:
        """`Tokenizer.decode`."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, piece: str) -> int:
        """`Tokenizer.token_id`."""
        i = self._tok.token_to_id(piece)
        if i is None:
            raise KeyError(f"token {piece!r} is not in the vocabulary of {self.path}")
        return i

    def piece(self, token_id: int) -> str:
        """`Tokenizer.piece`."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise KeyError(f"id {token_id} is not in the vocabulary of {self.path}")
        return piece

    @property
    def added_tokens(self) -> dict[str, int]:
        """`Tokenizer.added_tokens`."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    @property
    def special_tokens(self) -> dict[str, int]:
        """`Tokenizer.special_tokens`: the special-flagged added tokens and the chat ones."""
        return {t: self._tok.token_to_id(t) for t in self._specials}


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


# What transformers reads beside a tokenizer file, in its directory (and copies with it).
ASSET_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
               "chat_template.jinja", "chat_template.json")
# transformers' named special tokens (`SPECIAL_TOKENS_ATTRIBUTES`): what `special_tokens_map` passes a template.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclasses.dataclass(frozen=True)
class TokenizerAssets:
    """What a tokenizer's directory says beside the vocabulary (`read_assets`).

    `special_tokens`: {"bos_token": "<|begin_of_text|>", "eos_token": ...}, the named tokens of
    tokenizer_config.json (special_tokens_map.json where the config names none), as
    transformers' `special_tokens_map` gives them to a chat template. `chat_template`: the
    Jinja source transformers would use (chat_template.jinja, else tokenizer_config.json's
    `chat_template` (its "default" when it lists several), else chat_template.json, a
    processor's file), with `chat_template_file` naming where it came from; None when the
    directory has none. `generation_eos_ids`: generation_config.json's `eos_token_id` (an int
    or a list; () without the file)."""
    directory: str | None
    config: dict
    special_tokens: dict
    chat_template: str | None
    chat_template_file: str | None
    generation_config: dict | None

    @property
    def generation_eos_ids(self) -> tuple[int, ...]:
        """generation_config.json's end-of-sequence ids, in its order."""
        eos = (self.generation_config or {}).get("eos_token_id")
        return tuple(int(i) for i in (eos if isinstance(eos, list) else [] if eos is None else [eos]))


def tokenizer_directory(path: str | None) -> str | None:
    """The directory a tokenizer lives in: `path` itself, or the folder holding the file."""
    if not path:
        return None
    p = epath.Path(path)
    return os.fspath(p if p.is_dir() else p.parent)


def _read_json(path: epath.Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or remove the file") from None


def read_assets(path: str | None) -> TokenizerAssets:
    """The `TokenizerAssets` of the directory holding tokenizer `path` (a file or a directory,
    local or gs://). Missing files give empty fields; a malformed one is a ValueError naming it.

        >>> read_assets("/ckpt/llama-3.2-1b-instruct/hf_assets").generation_eos_ids  # doctest: +SKIP
        (128001, 128008, 128009)
    """
    directory = tokenizer_directory(path)
    root = epath.Path(directory) if directory else None

    def load(name):
        return _read_json(root / name) if root is not None and (root / name).is_file() else None

    config = load("tokenizer_config.json") or {}
    legacy = load("special_tokens_map.json") or {}
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name, legacy.get(name))
        if isinstance(value, dict):  # an AddedToken written out: {"content": ..., "special": ...}
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    template, source = None, None
    if root is not None and (root / "chat_template.jinja").is_file():
        template, source = (root / "chat_template.jinja").read_text(), "chat_template.jinja"
    elif config.get("chat_template") is not None:
        template, source = config["chat_template"], "tokenizer_config.json"
    elif (processor := load("chat_template.json")) is not None:
        template, source = processor.get("chat_template"), "chat_template.json"
    if isinstance(template, list):  # named templates [{"name": ..., "template": ...}], as transformers reads them
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{directory}/{source}: chat_template must be a Jinja string (or a list of named templates "
                         f"with a 'default'), got {type(template).__name__}")
    return TokenizerAssets(directory, config, special, template, source if template else None,
                           load("generation_config.json"))


def tokenizer_files(path: str) -> list[str]:
    """The files that make up tokenizer `path` (a tokenizer file or a directory holding one):
    the vocabulary file and the `ASSET_FILES` present beside it, e.g. to copy into a checkpoint."""
    directory = tokenizer_directory(path)
    root = epath.Path(directory)
    main = path if not epath.Path(path).is_dir() else next(
        (os.fspath(root / n) for n in ("tokenizer.json", "tokenizer.model", "spm.model") if (root / n).is_file()), None)
    if main is None:
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model inside")
    return [main] + [os.fspath(root / n) for n in ASSET_FILES if (root / n).is_file()]


# Where a model family keeps spare special tokens, in the order "auto" tries them (lowest number first).
SPARE_TOKEN_PATTERNS = (r"<\|reserved_special_token_(\d+)\|>", r"<unused(\d+)>")


def choose_image_token(tokenizer: Tokenizer, rows: int, wanted: str = "auto") -> str:
    """The image placeholder: a special token of the model's own vocabulary inside its
    embedding table (`rows` = the LLM's vocab_size), so the base's vocabulary and weights stay
    as they are. "auto": Qwen's `<|image_pad|>` when the tokenizer has it, else the lowest of
    Llama 3's `<|reserved_special_token_N|>`, else of Gemma's `<unusedN>`. Any other `wanted`
    is checked as it is. ValueError naming the token (or the lack of one) otherwise.

        >>> choose_image_token(qwen, 151936)                  # doctest: +SKIP
        '<|image_pad|>'
        >>> choose_image_token(llama3, 128256)                # doctest: +SKIP
        '<|reserved_special_token_0|>'
        >>> choose_image_token(gemma3_1b, 262144, "<image_soft_token>")  # doctest: +SKIP
        ValueError: ... id 262144 is outside the LLM's embedding table of 262144 rows ...
    """
    if wanted != "auto":
        try:
            token_id = tokenizer.token_id(wanted)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        if not 0 <= token_id < rows:
            raise ValueError(f"{wanted!r} has id {token_id}, outside the LLM's embedding table of {rows} rows "
                             "(an image token must be one of the rows the base has)")
        return wanted
    added = tokenizer.added_tokens
    if IMAGE_PAD in added and added[IMAGE_PAD] < rows:
        return IMAGE_PAD
    for pattern in SPARE_TOKEN_PATTERNS:
        spare = sorted((int(m.group(1)), text) for text, i in added.items()
                       if (m := re.fullmatch(pattern, text)) and i < rows)
        if spare:
            return spare[0][1]
    raise ValueError(f"{getattr(tokenizer, 'path', None) or 'the tokenizer'} has no usable image token: no "
                     f"{IMAGE_PAD}, <|reserved_special_token_N|> or <unusedN> inside the LLM's {rows} embedding rows; "
                     "name one of its special tokens the base does not use")
