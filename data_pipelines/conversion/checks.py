"""The record checks every conversion format shares: turns, ids, images and their paths, the
rejection reasons (`REASONS`) and adjustments (`ADJUSTMENTS`), and record identity (`Identity`:
ids made unique, byte-identical repeats rejected).

A check that refuses a record raises `Reject(reason, detail)`, `reason` a key of `REASONS`; the
driver (`data_pipelines.conversion.driver`) counts it and logs it to `out/rejects.jsonl`.
Records kept with a change say so by returning a key of `ADJUSTMENTS`.

Record identity: ids do not feed training, and LLaVA-style data reuses one id for several
conversations about one image, so a record that only shares an earlier record's id is kept,
its id made unique (`ID#2`, `ID#3`, ...); a record byte-identical to an earlier one (same id,
turns and image bytes) is a duplicate and rejected. Answers need a question: leading
assistant turns (before any user turn) are dropped, as LLaVA's preprocessing drops a leading
non-human turn, and a record left with no assistant turn after a user turn is rejected
(`no_answer`). LLaVA convention: a record with images but no `<image>` tag gets "<image>\\n"
(one per image) prepended to its first user turn (`with_images`).

>>> answers_need_questions([{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Q?"},
...                         {"role": "assistant", "content": "A."}])[1]
['leading_answer_dropped']
>>> check_tags([{"role": "user", "content": "<image>\\nQ?"}], num_images=2)
Traceback (most recent call last):
data_pipelines.conversion.checks.Reject: 1 <image> tag(s) but 2 image(s)
"""
import dataclasses
import hashlib
import os

import numpy as np

from data_pipelines.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, decode_image
from data_pipelines.records import IMAGE_TAG, ROLES, Example, encode_example

REASONS = {
    "missing_image": "an image file named by the record does not exist under image_root",
    "undecodable_image": "an image file that PIL cannot decode",
    "image_too_large": "an image whose header declares more than max_image_pixels pixels (decompression bomb)",
    "outside_image_root": "an image path that leads outside image_root (../, absolute, a symlink out)",
    "image_tag_mismatch": "the number of <image> tags differs from the number of images "
                          "(or a tag outside a user turn)",
    "malformed_record": "missing/invalid fields, unknown role, empty turn",
    "malformed_json": "a JSONL line that is not valid JSON",
    "duplicate_record": "byte-identical to an earlier record (same id, turns and image bytes)",
    "no_answer": "no assistant turn after a user turn: nothing to train or score",
}
ADJUSTMENTS = {
    "id_made_unique": "the id of an earlier, different record: kept as ID#2, ID#3, ...",
    "leading_answer_dropped": "assistant turn(s) before the first user turn: dropped (an answer needs a question)",
}
CONVERSATION_STYLES = ("conversations", "messages", "texts")  # the layouts `conversation_turns` reads
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


class Reject(Exception):
    """A refused record: `reason` (a key of `REASONS`) and `detail` (what, and where in the
    record). Raised by the checks here and by the formats' converters; formats whose input
    can fail before a record exists (a JSONL line that does not parse) yield one in its place."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def check_text(value, where: str) -> str:
    """`value` if it is a non-empty string, else Reject("malformed_record") naming `where`."""
    if not isinstance(value, str) or not value.strip():
        raise Reject("malformed_record", f"{where} must be a non-empty string, got {value!r:.60}")
    return value


def record_id(rec: dict, default: str) -> str:
    """The record's "id" as a string (`default` when it has none); Reject("malformed_record")
    for an id that is not a non-empty string or integer.

    >>> record_id({"id": 7}, "llava-0"), record_id({}, "llava-0")
    ('7', 'llava-0')
    """
    if "id" not in rec:
        return default
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise Reject("malformed_record", f"id must be a non-empty string or integer, got {rid!r:.60}")
    return str(rid)


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how big they may be: paths resolve (symlinks followed)
    inside `image_root` unless `allow_outside_root` (for datasets that really use absolute
    paths); headers declaring more than `max_pixels` pixels are refused before decoding."""
    image_root: str
    allow_outside_root: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


def image_bytes(data, where: str, max_pixels: int) -> bytes:
    """`data` unchanged if the pipeline's own decoder accepts it (what converts here trains);
    Reject naming `where`: malformed_record (not bytes), image_too_large, undecodable_image."""
    if not isinstance(data, bytes):
        raise Reject("malformed_record", f"{where}: image bytes expected, got {type(data).__name__}")
    try:
        decode_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        raise Reject("image_too_large", f"{where}: {e}") from None
    except ImageDecodeError as e:
        raise Reject("undecodable_image", f"{where}: {e}") from None
    return data


def read_image(policy: ImagePolicy, rel) -> bytes:
    """The bytes of image file `rel` under `policy.image_root`, checked by `image_bytes`;
    Reject: malformed_record (not a path), outside_image_root (nothing of the file is read),
    missing_image, image_too_large, undecodable_image."""
    if not isinstance(rel, str) or not rel:
        raise Reject("malformed_record", f"image path must be a non-empty string, got {rel!r:.60}")
    path = os.path.join(policy.image_root, rel)
    if not policy.allow_outside_root:
        root = os.path.realpath(policy.image_root)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise Reject("outside_image_root", f"{rel!r} leads outside image_root {policy.image_root} (pass "
                         "--allow_outside_image_root if the dataset really uses such paths)")
    if not os.path.isfile(path):
        raise Reject("missing_image", f"{path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    return image_bytes(data, path, policy.max_pixels)


def check_tags(turns: list[dict], num_images: int) -> None:
    """Reject("image_tag_mismatch") unless `<image>` tags stand in user turns only and number
    `num_images`."""
    for i, turn in enumerate(turns):
        if turn["role"] != "user" and IMAGE_TAG in turn["content"]:
            raise Reject("image_tag_mismatch", f"turn {i} ({turn['role']}) contains {IMAGE_TAG}; "
                         "image tags belong in user turns")
    tags = sum(t["content"].count(IMAGE_TAG) for t in turns)
    if tags != num_images:
        raise Reject("image_tag_mismatch", f"{tags} {IMAGE_TAG} tag(s) but {num_images} image(s)")


def answers_need_questions(turns: list[dict]) -> tuple[list[dict], list[str]]:
    """`turns` without the assistant turns before the first user turn (system turns stay), and
    the adjustments made; raises Reject("no_answer") when no assistant turn follows a user turn."""
    first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
    if first_user is None or not any(t["role"] == "assistant" for t in turns[first_user:]):
        raise Reject("no_answer", f"roles {[t['role'] for t in turns]}: no assistant turn after a user turn")
    kept = [t for i, t in enumerate(turns) if i >= first_user or t["role"] != "assistant"]
    return kept, (["leading_answer_dropped"] if len(kept) < len(turns) else [])


def check_schema(ex: Example) -> None:
    """Reject("malformed_record") for anything else `encode_example` refuses (e.g. text that is
    not valid UTF-8)."""
    try:
        encode_example(ex)
    except ValueError as e:
        raise Reject("malformed_record", str(e)) from None


def with_images(rid: str, source: str, turns: list[dict], images: list, resolve) -> Example:
    """The Example of `turns` (through `answers_need_questions` already, so a user turn exists)
    and `images`: untagged images get their tags before the first user turn (LLaVA
    convention), then `check_tags` and `check_schema` run before any image is read, then
    `resolve(k, image)` gives the k-th image's bytes (or raises Reject)."""
    if images and not any(IMAGE_TAG in t["content"] for t in turns):
        first_user = next(t for t in turns if t["role"] == "user")
        first_user["content"] = (IMAGE_TAG + "\n") * len(images) + first_user["content"]
    check_tags(turns, len(images))
    check_schema(Example(rid, source, turns, [b""] * len(images)))
    return Example(rid, source, turns, [resolve(k, im) for k, im in enumerate(images)])


# ---------------------------------------------------------------------------------------------
# Conversation layouts -> [{"role", "content"}]

def rows(value, where: str) -> list:
    """A non-empty list of turn/part objects (else Reject("malformed_record")); a
    `datasets.Sequence` of a struct stores them column-wise ({"from": [...], "value": [...]}):
    turned back into rows.

    >>> rows({"from": ["human", "gpt"], "value": ["Q?", "A."]}, "'conversations'")
    [{'from': 'human', 'value': 'Q?'}, {'from': 'gpt', 'value': 'A.'}]
    """
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            return [dict(zip(value, row)) for row in zip(*value.values())]
    if not isinstance(value, list) or not value:
        raise Reject("malformed_record", f"{where} must be a non-empty list, got {value!r:.60}")
    return value


def llava_turns(convs: list) -> list[dict]:
    """LLaVA `conversations` ([{"from", "value"}, ...]; human/user, gpt/assistant, system) ->
    [{"role", "content"}]; Reject("malformed_record") for an unknown role or an empty turn."""
    turns = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise Reject("malformed_record", f"conversations[{i}] is not an object")
        role = turn.get("from")
        if not isinstance(role, str) or role not in _LLAVA_ROLES:
            raise Reject("malformed_record", f"conversations[{i}] has unknown role 'from'={role!r:.40}")
        turns.append({"role": _LLAVA_ROLES[role],
                      "content": check_text(turn.get("value"), f"conversations[{i}].value")})
    return turns


def _join_parts(parts, where: str, counter: list[int]) -> str:
    text = ""
    prev_image = False
    for j, part in enumerate(rows(parts, where)):
        if not isinstance(part, dict):
            raise Reject("malformed_record", f"{where}[{j}] is not an object")
        kind = part.get("type")
        if kind == "image":
            index = part.get("index")
            if index is not None and index != counter[0]:
                raise Reject("malformed_record", f"{where}[{j}] is image part {counter[0]} of the record but "
                             f"has index {index!r:.20}; images are taken in order, never reordered")
            counter[0] += 1
            if text and not prev_image and not text[-1].isspace():
                text += "\n"
            text += IMAGE_TAG
            prev_image = True
        elif kind == "text":
            piece = part.get("text")
            if not isinstance(piece, str):
                raise Reject("malformed_record", f"{where}[{j}].text must be a string, got {piece!r:.60}")
            if prev_image and piece and not piece[0].isspace():
                text += "\n"
            text += piece
            prev_image = False
        else:
            raise Reject("malformed_record", f"{where}[{j}] has type {kind!r:.40}; expected 'text' or 'image'")
    return text


def message_turns(msgs, parts: bool = True) -> list[dict]:
    """role/content `messages` (roles system / user / assistant) -> [{"role", "content"}];
    with `parts`, a content of typed parts becomes text in order: a text part its text, an
    image part an "<image>" tag (its "index", when present, must be its position: images are
    never reordered), "\\n" between a tag and text next to it without whitespace there.
    Reject("malformed_record") for an unknown role, an empty turn, a bad part.

    >>> message_turns([{"role": "user", "content": [{"type": "text", "text": "Compare"},
    ...                                             {"type": "image"}, {"type": "image"}]}])
    [{'role': 'user', 'content': 'Compare\\n<image><image>'}]
    """
    turns, counter = [], [0]
    for i, msg in enumerate(rows(msgs, "'messages'")):
        if not isinstance(msg, dict):
            raise Reject("malformed_record", f"messages[{i}] is not an object")
        if msg.get("role") not in ROLES:
            raise Reject("malformed_record", f"messages[{i}] has unknown role {msg.get('role')!r:.40}")
        content = msg.get("content")
        if parts and isinstance(content, (list, dict)):
            content = _join_parts(content, f"messages[{i}].content", counter)
        turns.append({"role": msg["role"], "content": check_text(content, f"messages[{i}].content")})
    return turns


def texts_turns(texts) -> list[dict]:
    """The Cauldron's `texts` ([{"user", "assistant"}, ...] question/answer pairs) -> turns."""
    turns = []
    for i, pair in enumerate(rows(texts, "'texts'")):
        if not isinstance(pair, dict):
            raise Reject("malformed_record", f"texts[{i}] is not an object")
        turns += [{"role": "user", "content": check_text(pair.get("user"), f"texts[{i}].user")},
                  {"role": "assistant", "content": check_text(pair.get("assistant"), f"texts[{i}].assistant")}]
    return turns


def conversation_turns(obj: dict, where: str) -> list[dict]:
    """The turns of a record holding exactly one of the `CONVERSATION_STYLES`:

        conversations   LLaVA style, the roles human/user, gpt/assistant, system (`llava_turns`)
        messages        role/content, content a string or typed parts (`message_turns`)
        texts           the Cauldron's question/answer pairs (`texts_turns`)

    Reject("malformed_record") naming `where` otherwise."""
    styles = [s for s in CONVERSATION_STYLES if s in obj]
    if len(styles) != 1:
        raise Reject("malformed_record",
                     f"{where} needs exactly one of {list(CONVERSATION_STYLES)}, has keys {sorted(obj)[:12]}")
    parse = {"conversations": lambda convs: llava_turns(rows(convs, "'conversations'")),
             "messages": message_turns, "texts": texts_turns}[styles[0]]
    return parse(obj[styles[0]])


# ---------------------------------------------------------------------------------------------
# Record identity

class _KeySet:
    """A set of 16-byte keys at about 16 bytes each (a Python set costs ~100): new keys in a
    small Python set, merged into one sorted numpy array whenever it holds `_RECENT` keys (an
    O(size) copy, so O(n^2 / _RECENT) in all: seconds for the 10M keys of one worker of a 645M
    conversion). Membership: the set, then one binary search."""
    _RECENT = 8192

    def __init__(self):
        self._recent: set[bytes] = set()
        self._sorted = np.empty(0, dtype="S16")

    def __len__(self) -> int:
        return len(self._recent) + self._sorted.size

    def __contains__(self, key: bytes) -> bool:
        if key in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, key))
        # "S16" items drop trailing NUL bytes; every key has 16, so compare without them.
        return i < self._sorted.size and self._sorted[i] == key.rstrip(b"\0")

    def add(self, key: bytes) -> None:
        """Adds one 16-byte key."""
        self._recent.add(key)
        if len(self._recent) >= self._RECENT:
            self.merge(np.array(list(self._recent), dtype="S16"))
            self._recent = set()

    def merge(self, keys: np.ndarray) -> None:
        """Adds "S16" `keys`, none of them in the set yet (a committed chunk's, on resume)."""
        keys = np.sort(keys)
        self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, keys), keys)


class Identity:
    """Record identity over one input (module docstring): `admit(ex)` returns `ex` (its id made
    unique if an earlier, different record had it) and the adjustments made, or raises
    Reject("duplicate_record") for a byte-identical repeat.

    The state is two key sets of 16-byte BLAKE2b digests, ~32 bytes per kept record: of
    final ids (a collision, 2^-128 per pair, would only add a needless "#k") and of encoded
    records (the byte-identical check).

    >>> identity, ex = Identity(), Example("a", "s", [{"role": "user", "content": "Q?"}])
    >>> identity.admit(ex)[0].id, identity.admit(Example("a", "s", [{"role": "user", "content": "R?"}]))[0].id
    ('a', 'a#2')
    >>> identity.admit(ex)
    Traceback (most recent call last):
    data_pipelines.conversion.checks.Reject: id 'a': byte-identical to an earlier record
    """

    def __init__(self):
        self.ids = _KeySet()
        self.digests = _KeySet()
        self.last_id_key = b""   # of the record admitted last: what a chunk marker keeps
        self.last_digest = b""
        self.last_encoded = b""  # its `encode_example` bytes (under its final id): what is written

    @staticmethod
    def id_key(rid: str) -> bytes:
        """The 16-byte key of id `rid`."""
        return hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def restore(self, id_keys: bytes, digests: bytes) -> None:
        """Adds the concatenated 16-byte `last_id_key`s / `last_digest`s of records admitted
        before (a committed chunk's)."""
        self.ids.merge(np.frombuffer(id_keys, dtype="S16"))
        self.digests.merge(np.frombuffer(digests, dtype="S16"))

    def admit(self, ex: Example) -> tuple[Example, list[str]]:
        """`ex` (its id made unique if needed) and the adjustments made; Reject("duplicate_record")."""
        encoded = encode_example(ex)
        digest = hashlib.blake2b(encoded, digest_size=16).digest()
        if digest in self.digests:
            raise Reject("duplicate_record", f"id {ex.id!r}: byte-identical to an earlier record")
        self.digests.add(digest)
        adjusted = []
        key = self.id_key(ex.id)
        if key in self.ids:
            k = 2
            while (key := self.id_key(f"{ex.id}#{k}")) in self.ids:
                k += 1
            ex, adjusted = dataclasses.replace(ex, id=f"{ex.id}#{k}"), ["id_made_unique"]
            encoded = encode_example(ex)
        self.ids.add(key)
        self.last_id_key, self.last_digest, self.last_encoded = key, digest, encoded
        return ex, adjusted
