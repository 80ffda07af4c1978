"""Chat rendering with training labels and image placeholders: the model's own chat template
(`TemplateRenderer`, rendered as transformers' `apply_chat_template` renders it) or, for a
tokenizer that has none, ChatML (`ChatMLRenderer`). `chat_renderer` picks one.

Which renderer (`chat_renderer(chat_template=...)`, the recipe's `data.chat_template`):

    "auto"       the tokenizer directory's template (chat_template.jinja, tokenizer_config.json's
                 `chat_template`, chat_template.json: `tokenizer.read_assets`), ChatML without one
    "tokenizer"  the directory's template; an error naming the directory if it has none
    "chatml"     ChatML always (workdirs written before templates were read rendered this way)

**The model's template** (`TemplateRenderer`). The conversation is rendered to text by
transformers' own Jinja machinery (`transformers.utils.chat_template_utils.render_jinja_template`,
as `apply_chat_template` calls it: the tokenizer's named special tokens such as `bos_token`,
`add_generation_prompt`, the template's default system turn, `raise_exception`, options such as
Qwen3's `enable_thinking` as template variables), then tokenized as a whole with the special-token
strings the template wrote becoming their tokens (`tokenize=True`). So the ids of a training
record equal `tokenizer.apply_chat_template(messages, tokenize=True)`'s, and a prompt's equal
`apply_chat_template(messages, add_generation_prompt=True)`'s.

- Loss mask. With `{% generation %}` markers in the template, exactly what transformers'
  `return_assistant_tokens_mask` marks (tokens overlapping a marked span; the record's first
  token excepted, which is never a target, so packed samples never learn across their boundary). Without markers, the
  rule: each assistant message's content is located in the rendered text (the template may trim
  its surrounding whitespace); the loss runs from its start through the first special token the
  template writes after it, its end of turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`); tokens
  overlapping that span are trained, as in transformers' mask. A record whose assistant content
  the template does not render verbatim (it rewrites it, or renders it twice) is rejected with a
  message naming this rule. Everything else (system turns, user turns, headers) is context.
- Images. Each `<image>` of a user message is replaced by the image placeholder token's text
  before rendering; after tokenization each placeholder id is expanded into the image's N ids.
  The ids are therefore transformers' apart from that expansion.
- No injection. Message text may not contain any of the tokenizer's special-token strings
  (`Tokenizer.special_tokens` plus the image placeholder): such a conversation is refused by
  name (a counted rejection in training, an error at inference), so user text can never become
  a turn boundary, an end of text or an image slot.
- Dates. A template that reads the date (`strftime_now`, Llama 3.2's and SmolLM3's default
  system turn) renders `date` when one is given (training pins it: the recipe's `data.chat_date`)
  and today's date otherwise (inference, as transformers and vLLM do).
- Stop tokens (`stop_token_ids`): generation_config.json's `eos_token_id`s, the tokenizer's
  `eos_token`, and the template's end of turn (the special token it writes after an answer).

**ChatML** (`ChatMLRenderer`; the fallback for tokenizers without a template, e.g. the demo's
SentencePiece), rendered piece by piece:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{text, with each <image> replaced by N image tokens}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n ...

and `loss_mask[t]` is True exactly for the tokens of assistant contents and the
`<|im_end|>` that closes each assistant turn (the model learns to stop), for assistant
turns that follow a user turn: an answer before any question is context only (as LLaVA's
preprocessing drops a leading non-human turn; data_pipelines.convert drops and counts them).
Everything else (role headers, user text, image tokens, the newline after `<|im_end|>`) is context only.
A sequence always starts with `<|im_start|>`, which is never a target, so in a packed
row no token is ever trained to be predicted from the previous sample. User text is encoded
with special-token strings split (`Tokenizer.encode`), so it never yields a structural id.
Stops at `<|im_end|>` and `<|endoftext|>` (where the vocabulary has them) and at the
directory's generation_config.json / `eos_token` ids. `CHATML_JINJA` is its Jinja form (what
`tools.to_torch` writes for such a model).

Example (one image of 2 tokens, `T(...)` = the tokenizer's ids for that text, `I` = image token):

    turns = [{"role": "user", "content": "<image>\\nWhat colour?"}, {"role": "assistant", "content": "red"}]
    tokens    = [S] T("user\\n") [I I] T("\\nWhat colour?") [E] T("\\n") [S] T("assistant\\n") T("red") [E] T("\\n")
    loss_mask =  0      0..0    0 0        0...0           0      0     0        0..0          1..1   1     0
"""
from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Sequence

import numpy as np

from data_pipelines.records import IMAGE_TAG, ROLES
from data_pipelines.tokenizer import END_OF_TEXT, IM_END, IM_START, IMAGE_PAD, Tokenizer, read_assets

CHAT_TEMPLATE_CHOICES = ("auto", "tokenizer", "chatml")

# The Jinja form of ChatMLRenderer (no default system turn), for exporters.
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")

# Names render_jinja_template takes itself: a template option may not use them.
RESERVED_TEMPLATE_NAMES = frozenset({"messages", "conversations", "tools", "documents", "chat_template",
                                     "add_generation_prompt", "continue_final_message",
                                     "return_assistant_tokens_mask"})
# transformers' test for `{% generation %}` markers (render_jinja_template).
GENERATION_MARKER = re.compile(r"\{\%-?\s*generation\s*-?\%\}")
# Private-use characters around the stand-ins for assistant contents (the loss-mask rule).
_STAND_IN = "\U000f0100{}\U000f0101"


@dataclasses.dataclass
class RenderedChat:
    """A conversation rendered by a renderer's `render`."""
    tokens: np.ndarray            # int32 (L,)
    loss_mask: np.ndarray         # bool (L,): tokens trained as targets
    image_spans: list[tuple[int, int]]  # (start, length) of each image's token run, in order


def _unique(ids) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _declared_stop_ids(tokenizer: Tokenizer, assets) -> list[int]:
    """generation_config.json's eos ids and the tokenizer's eos_token (when in the vocabulary)."""
    ids = list(assets.generation_eos_ids)
    if "eos_token" in assets.special_tokens:
        try:
            ids.append(tokenizer.token_id(assets.special_tokens["eos_token"]))
        except KeyError:
            pass
    return ids


def stop_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Where generation stops for a tokenizer without a chat renderer (plain-text completion):
    `<|im_end|>` / `<|endoftext|>` where the vocabulary has them, generation_config.json's eos
    ids and the tokenizer's `eos_token`."""
    ids = []
    for piece in (IM_END, END_OF_TEXT):
        try:
            ids.append(tokenizer.token_id(piece))
        except KeyError:
            pass
    return _unique(ids + _declared_stop_ids(tokenizer, read_assets(getattr(tokenizer, "path", None))))


class ChatMLRenderer:
    """ChatML rendering (Qwen2 / LLaVA-OneVision style `<|im_start|>role\n...<|im_end|>\n`),
    piece by piece: image tags expanded to runs of the image token, answers (and their end
    tokens) trained. The fallback for a tokenizer without a chat template (module docstring).
    KeyError naming the token when the vocabulary lacks `<|im_start|>` / `<|im_end|>` or the image token."""
    kind = "chatml"

    def __init__(self, tokenizer: Tokenizer, *, default_system: str | None = None,
                 image_token: str | None = IMAGE_PAD, extra_stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.im_start = tokenizer.token_id(IM_START)
        self.im_end = tokenizer.token_id(IM_END)
        self.image_token_id = tokenizer.token_id(image_token) if image_token is not None else None
        self._newline = tokenizer.encode("\n")
        self._headers = {r: tokenizer.encode(f"{r}\n") for r in ROLES}
        ends = [self.im_end]
        try:
            ends.append(tokenizer.token_id(END_OF_TEXT))
        except KeyError:
            pass
        self.stop_token_ids = _unique(ends + list(extra_stop_ids))
        self.template_source = CHATML_JINJA

    def render(self, turns: Sequence[dict], image_token_counts: Sequence[int] = (), *,
               add_generation_prompt: bool = False, example_id: str = "?",
               template_kwargs: dict | None = None) -> RenderedChat:
        """Tokens, loss mask and image spans of a conversation.

        `image_token_counts[i]` is how many LLM tokens the i-th image becomes (it depends
        on its tile grid); their number must equal the number of `<image>` tags. ChatML
        has no options: `template_kwargs` is accepted and not read (as a template ignores
        variables it does not use).
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
            role, content = _checked_turn(turn, i, example_id)
            asked = asked or role == "user"
            trained = role == "assistant" and asked
            add([self.im_start])
            add(self._headers[role])
            for j, piece in enumerate(content.split(IMAGE_TAG)):
                if j:
                    if n_images >= len(image_token_counts) or self.image_token_id is None:
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
        placed = 0 if self.image_token_id is None else int(np.count_nonzero(ids == self.image_token_id))
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


def _checked_turn(turn: dict, i: int, example_id: str) -> tuple[str, str]:
    role, content = turn.get("role"), turn.get("content")
    if role not in ROLES or not isinstance(content, str):
        raise ValueError(f"example {example_id}: turn {i} has role {role!r} / content of type "
                         f"{type(content).__name__}; roles are {ROLES}, content a string")
    if IMAGE_TAG in content and role != "user":
        raise ValueError(f"example {example_id}: turn {i} ({role}) contains {IMAGE_TAG}; "
                         "images belong in user turns")
    return role, content


def pinned_date_template(template: str, date: datetime.date) -> str:
    """`template` with `strftime_now(format)` answering `date` (at 00:00) instead of today: a
    Jinja macro of that name, defined first, shadows transformers' global for every format the
    template passes as a string literal (a format given otherwise raises naming it).

        >>> t = pinned_date_template('{{ strftime_now("%d %b %Y") }}', datetime.date(2026, 1, 1))
        >>> render_jinja_template([[]], chat_template=t)[0][0]  # doctest: +SKIP
        '01 Jan 2026'
    """
    formats = sorted(set(re.findall(r"""strftime_now\(\s*(?:"([^"]*)"|'([^']*)')\s*\)""", template)))
    when = datetime.datetime.combine(date, datetime.time())
    branches = "".join(f"{{%- {'if' if k == 0 else 'elif'} format == {_jinja_string(f)} -%}}"
                       f"{{{{ {_jinja_string(when.strftime(f))} }}}}"
                       for k, f in enumerate(a or b for a, b in formats))
    refuse = ("{{ raise_exception('strftime_now(' ~ format ~ '): the training date is pinned for the formats "
              "this template passes as literals only') }}")
    body = f"{branches}{{%- else -%}}{refuse}{{%- endif -%}}" if branches else refuse
    return f"{{%- macro strftime_now(format) -%}}{body}{{%- endmacro -%}}{template}"


def _jinja_string(text: str) -> str:
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


class TemplateRenderer:
    """The model's own chat template, rendered and tokenized as transformers'
    `apply_chat_template` does, with the loss mask, image expansion, injection check, pinned
    date and stop tokens of the module docstring.

    `tokenizer` must encode rendered chats (`encode_chat`: a tokenizer.json); `special_tokens`
    are the named tokens the template reads (`TokenizerAssets.special_tokens`); `image_token`
    the placeholder's text (None: no images); `template_kwargs` the template's options;
    `date` pins `strftime_now`; `generation_eos_ids` the model's declared end tokens.

        >>> r = TemplateRenderer(tok, assets.chat_template, special_tokens=assets.special_tokens,
        ...                      image_token="<|image_pad|>")                   # doctest: +SKIP
        >>> r.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True).tokens  # doctest: +SKIP
        array([151644, 8948, 198, ...])   # Qwen2.5-Instruct: its default system turn first
    """
    kind = "template"

    def __init__(self, tokenizer: Tokenizer, template: str, *, special_tokens: dict | None = None,
                 image_token: str | None = None, template_kwargs: dict | None = None,
                 date: datetime.date | None = None, default_system: str | None = None,
                 generation_eos_ids: Sequence[int] = (), source: str = "the chat template"):
        if not hasattr(tokenizer, "encode_chat"):
            raise ValueError(f"{source}: a chat template needs a tokenizer.json (Hugging Face `tokenizers` format) "
                             f"to tokenize what it renders; {getattr(tokenizer, 'path', None)} is SentencePiece")
        self.tokenizer = tokenizer
        self.template_source = template
        self.source = source
        self.template = template if date is None or "strftime_now" not in template else \
            pinned_date_template(template, date)
        self.date = date
        self.has_generation_markers = bool(GENERATION_MARKER.search(template))
        self.special_token_names = dict(special_tokens or {})
        self.template_kwargs = checked_template_kwargs(template_kwargs)
        self.default_system = default_system
        self.image_token_id = tokenizer.token_id(image_token) if image_token is not None else None
        self.image_token = image_token
        control = dict(tokenizer.special_tokens)
        if image_token is not None:
            control[image_token] = self.image_token_id
        self.control_tokens = control
        self._control = re.compile("|".join(re.escape(t) for t in sorted(control, key=len, reverse=True)) or "(?!)")
        self.end_of_turn_id = self._probe_end_of_turn()
        self.stop_token_ids = _unique([*generation_eos_ids, *self._eos_id(), self.end_of_turn_id])
        if image_token is not None:
            self._check_image_token_unused(image_token)

    def _check_image_token_unused(self, image_token: str) -> None:
        """ValueError when the image placeholder is a token the template or the tokenizer uses
        itself (an end of turn, BOS / EOS / pad, a token a rendered chat holds): its slots would
        be indistinguishable from the template's own."""
        named = {t for t in self.special_token_names.values() if t in self.control_tokens}
        probe, _ = self._render_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok"},
                                      {"role": "user", "content": "Hi"}], True, False, self._kwargs(None), "probe")
        if self.image_token_id in self.stop_token_ids or image_token in named or image_token in probe:
            raise ValueError(f"the image token {image_token!r} is one {self.source} or the tokenizer uses itself "
                             "(an end of turn, a named token such as BOS / EOS / pad, or part of a rendered chat); "
                             "choose a spare special token (model.image_token chooses it; 'auto' picks one)")

    def _eos_id(self) -> list[int]:
        try:
            return [self.tokenizer.token_id(self.special_token_names["eos_token"])]
        except KeyError:
            return []

    def _probe_end_of_turn(self) -> int | None:
        """The special token the template writes after an answer (None if it refuses the probe)."""
        stand_in = _STAND_IN.format(0)
        try:
            text, _ = self._render_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": stand_in}],
                                        False, False, self._kwargs(None), "probe")
        except ValueError:
            return None
        at = text.find(stand_in)
        m = self._control.search(text, at + len(stand_in)) if at >= 0 else None
        return self.control_tokens[m.group()] if m else None

    def _kwargs(self, extra: dict | None) -> dict:
        return {**self.special_token_names, **self.template_kwargs, **checked_template_kwargs(extra)}

    def _render_text(self, messages, add_generation_prompt: bool, markers: bool, kwargs: dict, example_id: str):
        import jinja2
        from transformers.utils.chat_template_utils import render_jinja_template
        try:
            rendered, indices = render_jinja_template([messages], chat_template=self.template,
                                                      add_generation_prompt=add_generation_prompt,
                                                      return_assistant_tokens_mask=markers, **kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(f"example {example_id}: {self.source} refused the conversation: "
                             f"{type(e).__name__}: {e}") from None
        return rendered[0], (indices[0] if markers else None)

    def _messages(self, turns: Sequence[dict], n_images: int, example_id: str) -> list[dict]:
        messages = []
        for i, turn in enumerate(turns):
            role, content = _checked_turn(turn, i, example_id)
            found = self._control.search(content)
            if found:
                raise ValueError(f"example {example_id}: turn {i} ({role}) contains {found.group()!r}, a special "
                                 "token of the tokenizer; message text may not hold special tokens (they would "
                                 "become a turn boundary, an end of text or an image slot): remove it from the text")
            if IMAGE_TAG in content:
                if self.image_token is None:
                    raise ValueError(f"example {example_id}: turn {i} has {IMAGE_TAG} but this model takes no images")
                content = content.replace(IMAGE_TAG, self.image_token)
            messages.append({"role": role, "content": content})
        tags = sum(m["content"].count(self.image_token) for m in messages) if self.image_token else 0
        if tags != n_images:
            raise ValueError(f"example {example_id}: {tags} {IMAGE_TAG} tags but {n_images} images")
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        return messages

    def render(self, turns: Sequence[dict], image_token_counts: Sequence[int] = (), *,
               add_generation_prompt: bool = False, example_id: str = "?",
               template_kwargs: dict | None = None) -> RenderedChat:
        """Tokens, loss mask and image spans of a conversation (`ChatMLRenderer.render`'s
        contract). `template_kwargs` add to / override the renderer's options for this call.
        The loss mask is computed for training records (`add_generation_prompt=False`); a prompt's
        is all False. ValueError naming `example_id` for a conversation the template refuses,
        special-token text, tags that do not match the images, or (no markers) an assistant
        content the template does not render verbatim."""
        messages = self._messages(turns, len(image_token_counts), example_id)
        kwargs = self._kwargs(template_kwargs)
        markers = self.has_generation_markers and not add_generation_prompt
        text, marked = self._render_text(messages, add_generation_prompt, markers, kwargs, example_id)
        ids, offsets = self.tokenizer.encode_chat(text)
        if add_generation_prompt:
            mask = np.zeros(len(ids), bool)
        else:
            spans = marked if markers else self._assistant_spans(messages, text, kwargs, example_id)
            mask = _overlap_mask(offsets, spans)
            mask[:1] = False  # a sample's first token is never a target: packed samples never learn across
        return self._expand_images(np.asarray(ids, np.int32), mask, image_token_counts, example_id)

    def _assistant_spans(self, messages: list[dict], text: str, kwargs: dict, example_id: str) -> list[tuple]:
        """The loss-mask rule for templates without markers (module docstring): (start, end)
        character spans, each an assistant content through the next special token."""
        answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        if not answers:
            return []
        stand_ins = [_STAND_IN.format(j) for j in range(len(answers))]
        probe = [dict(m) for m in messages]
        for k, s in zip(answers, stand_ins):
            probe[k]["content"] = s
        probed, _ = self._render_text(probe, False, False, kwargs, example_id)
        rule = (f"example {example_id}: {self.source} does not render assistant message {{}} verbatim; the loss mask "
                "of a template without {{% generation %}} markers needs each answer in the rendered chat (at most "
                "trimmed of surrounding whitespace), followed by a special end-of-turn token")
        pieces = []
        for j, s in enumerate(stand_ins):
            if probed.count(s) != 1:
                raise ValueError(rule.format(j))
            before, probed = probed.split(s)
            pieces.append(before)
        pieces.append(probed)
        if not text.startswith(pieces[0]):
            raise ValueError(rule.format(0))
        pos, spans = len(pieces[0]), []
        for j, k in enumerate(answers):
            content, after = messages[k]["content"], pieces[j + 1]
            for form in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip(),
                                       content.lstrip("\n"), content.rstrip("\n"), content.strip("\n"))):
                end = pos + len(form)
                if (text.startswith(form, pos) and text.startswith(after, end)
                        and (j + 1 < len(answers) or end + len(after) == len(text))):
                    break
            else:
                raise ValueError(rule.format(j))
            end_of_turn = self._control.search(text, end)
            if end_of_turn is None:
                raise ValueError(rule.format(j))
            spans.append((pos, end_of_turn.end()))
            pos = end + len(after)
        return spans

    def _expand_images(self, ids: np.ndarray, mask: np.ndarray, counts: Sequence[int],
                       example_id: str) -> RenderedChat:
        if self.image_token_id is None:
            return RenderedChat(ids, mask, [])
        at = np.flatnonzero(ids == self.image_token_id)
        if len(at) != len(counts):  # the template dropped or repeated a message holding an image
            raise ValueError(f"example {example_id}: {self.source} rendered {len(at)} image placeholders for "
                             f"{len(counts)} images")
        tokens, trained, spans, prev = [], [], [], 0
        for pos, n in zip(at, counts):
            tokens += [ids[prev:pos], np.full(n, self.image_token_id, np.int32)]
            trained += [mask[prev:pos], np.zeros(n, bool)]
            spans.append((int(sum(len(t) for t in tokens) - n), int(n)))
            prev = pos + 1
        tokens.append(ids[prev:])
        trained.append(mask[prev:])
        return RenderedChat(np.concatenate(tokens).astype(np.int32), np.concatenate(trained), spans)


def _overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Tokens whose character offsets overlap one of the ordered `spans`: the single pass of
    transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)`."""
    mask = np.zeros(len(offsets), bool)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = True
    return mask


def checked_template_kwargs(kwargs) -> dict:
    """A template's options as a dict; ValueError naming the problem (not a mapping, or a
    name render_jinja_template takes itself)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"chat template options must be an object of named values, got {kwargs!r}")
    clash = sorted(RESERVED_TEMPLATE_NAMES & set(kwargs))
    if clash:
        raise ValueError(f"chat template options {clash} are not options: they name the renderer's own inputs")
    return dict(kwargs)


def parse_date(date) -> datetime.date | None:
    """A pinned date from "YYYY-MM-DD" (or a date; None / "" stays None); ValueError naming it."""
    if date is None or date == "" or isinstance(date, datetime.date):
        return date or None
    try:
        return datetime.date.fromisoformat(str(date))
    except ValueError:
        raise ValueError(f"date {date!r} is not YYYY-MM-DD") from None


def chat_renderer(tokenizer: Tokenizer, *, chat_template: str = "auto", image_token: str | None = IMAGE_PAD,
                  template_kwargs: dict | None = None, date=None, default_system: str | None = None):
    """The renderer for `tokenizer` (which one: the module docstring): a `TemplateRenderer` on
    the template of the tokenizer's directory, or a `ChatMLRenderer`. KeyError naming the
    token when ChatML is chosen and the vocabulary lacks its tokens; ValueError for an unknown
    `chat_template`, "tokenizer" without a template, or a template beside a SentencePiece model.

        >>> chat_renderer(load_tokenizer("/ckpt/llama-3.2-1b/hf_assets"), image_token=None).kind  # doctest: +SKIP
        'template'
        >>> chat_renderer(load_tokenizer("/data/demo/tokenizer.model")).kind                      # doctest: +SKIP
        'chatml'
    """
    if chat_template not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"chat_template={chat_template!r}; choose one of {CHAT_TEMPLATE_CHOICES}")
    assets = read_assets(getattr(tokenizer, "path", None))
    if chat_template == "chatml" or (chat_template == "auto" and assets.chat_template is None):
        return ChatMLRenderer(tokenizer, default_system=default_system, image_token=image_token,
                              extra_stop_ids=_declared_stop_ids(tokenizer, assets))
    if assets.chat_template is None:
        raise ValueError(f"chat_template='tokenizer' but {assets.directory} has no chat template (chat_template.jinja, "
                         "tokenizer_config.json's chat_template or chat_template.json); use 'chatml' or 'auto'")
    return TemplateRenderer(tokenizer, assets.chat_template, special_tokens=assets.special_tokens,
                            image_token=image_token, template_kwargs=template_kwargs, date=parse_date(date),
                            default_system=default_system, generation_eos_ids=assets.generation_eos_ids,
                            source=f"the chat template of {assets.directory}/{assets.chat_template_file}")


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
