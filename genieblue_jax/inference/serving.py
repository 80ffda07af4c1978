"""The serving engine: OpenAI chat requests -> jobs, batched on one model thread, answers
streamed as they grow. No HTTP here: `genieblue_jax.cli.serve` puts FastAPI in front of it,
and Python code drives it directly.

    from genieblue_jax.inference import serving
    with serving.Batcher(model, wait_s=0.01, max_batch=8) as batcher:      # `model`: a GenieBlue
        jobs = [batcher.submit(serving.parse_request(model, {
                    "messages": [{"role": "user", "content": q}], "max_tokens": 32}))
                for q in ("What is 3 plus 4?", "Name a shape.")]
        answers = [job.result() for job in jobs]       # == model.generate(q, max_new_tokens=32)

`parse_request` validates an OpenAI chat-completions body (messages, with images as
`image_url` parts; max_tokens, stop, temperature, top_p, seed, chat_template_kwargs) and
encodes it once, raising `BadRequest` (an HTTP status and the culprit) before any model work.
A `Job` reports its answer through `on_event(kind, value)`, called on the model thread:
("delta", text) as the answer grows, then ("done", None) or ("error", (status, message));
`Job.result()` waits for the whole answer instead.

Batching: jobs arriving within `wait_s` of each other run as one padded batch (up to
`max_batch`) per route (base / multimodal) and sampling settings (temperature, top_p, seed;
greedy ones all together) and template options: one `model.generate` call each. A batch
decodes max(max_tokens) tokens and each answer stops at its own limit (greedy answers are
prefix-consistent, so a batched answer is the one a lone request gets). Batch sizes are
padded to powers of two, so few programs compile. Sampled answers depend on the batch they
ran in; a seed reproduces them only for the same batch.

The model is duck-typed (`genieblue_jax.GenieBlue`): `generate(turns_list, images=...,
max_new_tokens=..., temperature=..., top_p=..., seed=..., on_token=..., chat_template_kwargs=...)`,
`tokenizer.decode`, `requests.encode`, `max_context`, `is_mllm`, `path`.
"""
import base64
import binascii
import os
import queue
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Callable

from data_pipelines.chat import checked_template_kwargs
from data_pipelines.records import IMAGE_TAG
from genieblue_jax.inference.requests import read_image

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class BadRequest(ValueError):
    """A request the server refuses: HTTP `status` with a message naming the culprit."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def model_name(model) -> str:
    """The name a model is served under: its directory's name ("genieblue" without a path)."""
    return os.path.basename(os.path.normpath(model.path or "genieblue"))


# --- requests ---------------------------------------------------------------------------------

def load_image(url: Any, where: str):
    """An image part's URL -> uint8 (H, W, 3): data: URLs, file:// URLs and plain paths.
    Raises `BadRequest` naming `where` for remote (http/https) URLs, other schemes and
    unreadable images (a file on the server is named, never what it holds)."""
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: the image URL must be a non-empty string", where)
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadRequest(f"{where}: a data URL must be base64 (data:image/png;base64,...)", where)
        try:
            raw = base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise BadRequest(f"{where}: the data URL is not valid base64: {e}", where) from None
        source: Any = raw
    else:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            raise BadRequest(f"{where}: remote image URLs are not fetched ({url[:80]}): this server makes no network "
                             "requests; send the image as a data: URL (data:image/png;base64,...) or a path on the "
                             "server (file:///path or /path)", where)
        if scheme == "file":
            source = urllib.request.url2pathname(parts.path)
        elif len(scheme) > 1:  # one letter: a Windows drive, a plain path
            raise BadRequest(f"{where}: unsupported image URL scheme {scheme!r}; use data:, file:// or a path", where)
        else:
            source = url
    try:
        return read_image(source, where)
    except (OSError, ValueError) as e:
        if isinstance(source, str):  # a file on the server: say which, never what it holds (size, first bytes)
            raise BadRequest(f"{where}: {source} is not a readable image file", where) from None
        raise BadRequest(str(e), where) from None


def parse_messages(messages: Any) -> tuple[list[dict], list]:
    """OpenAI messages -> (chat turns with `<image>` slots, images in slot order). Each image
    part puts an `<image>` slot where it stands (parts joined by newlines). Raises `BadRequest`
    naming the message or part that is malformed."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    turns, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"{where}: unknown role {role!r}; this model takes {sorted(ROLES)}", f"{where}.role")
        if isinstance(content, list):
            pieces = []
            for k, part in enumerate(content):
                at = f"{where}.content[{k}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif kind == "image_url":
                    spec = part.get("image_url")
                    images.append(load_image(spec.get("url") if isinstance(spec, dict) else spec, at))
                    pieces.append(IMAGE_TAG)
                else:
                    raise BadRequest(f"{at}: parts are {{'type': 'text', 'text': ...}} or "
                                     f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}; got {str(part)[:80]}", at)
            content = "\n".join(pieces)
        elif not isinstance(content, str):
            raise BadRequest(f"{where}: content must be a string or a list of parts", f"{where}.content")
        turns.append({"role": ROLES[role], "content": content})
    return turns, images


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"'{name}' must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    if low is not None and value < low:
        raise BadRequest(f"'{name}'={value} must be >= {low}", name)
    if high is not None and value > high:
        raise BadRequest(f"'{name}'={value} must be <= {high}", name)
    return kind(value)


def parse_request(model, body: Any, *, max_tokens: int = 256, model_id: str | None = None,
                  on_event: Callable[[str, Any], None] | None = None) -> "Job":
    """Validates and encodes an OpenAI chat-completions body into a `Job` for `model` (image
    decoding and tokenising happen here, on the caller's thread). `max_tokens`: a request's
    default (capped by the context); `model_id`: the name error messages give the model
    (default `model_name(model)`); `on_event`: the job's event callback (see `Job`). Raises
    `BadRequest` for anything the model cannot answer: `n` other than 1, bad messages or
    images, images for a text-only LLM, bad template options, special-token text, a prompt +
    max_tokens beyond the context, bad stop / temperature / top_p / seed values."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("n") not in (None, 1):
        raise BadRequest("only n=1 is supported", "n")
    turns, images = parse_messages(body.get("messages"))
    if images and not model.is_mllm:
        raise BadRequest(f"this model ({model_id or model_name(model)}) is a text-only LLM and takes no images",
                         "messages")
    try:
        template_kwargs = checked_template_kwargs(body.get("chat_template_kwargs"))
    except ValueError as e:
        raise BadRequest(f"'chat_template_kwargs': {e}", "chat_template_kwargs") from None
    try:
        prompt = len(model.requests.encode(turns, images, template_kwargs=template_kwargs).tokens)
    except (OSError, ValueError) as e:
        raise BadRequest(str(e), "messages") from None
    context = model.max_context
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = _number(body, name, None, int, low=1)
    if limit is None:
        limit = min(max_tokens, context - prompt)
    if limit < 1 or prompt + limit > context:  # as GenieBlue.generate's check, before any work
        raise BadRequest(f"{prompt} prompt tokens + {name}={limit} exceed the model's context of {context} "
                         "tokens (max_position_embeddings); shorten the messages or lower max_tokens",
                         "messages", status=400)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("'stop' must be a non-empty string or a list of them", "stop")
    temperature = _number(body, "temperature", 0.0, low=0, high=2)
    top_p = _number(body, "top_p", 1.0, low=0, high=1)
    seed = _number(body, "seed", 0, int)
    if top_p <= 0:
        raise BadRequest("'top_p' must be > 0", "top_p")
    # greedy decoding ignores top_p and the seed: every greedy request can share a batch
    sampling = (temperature, top_p, seed) if temperature > 0 else (0.0, 1.0, 0)
    return Job(model, turns=turns, images=images, prompt_tokens=prompt, max_tokens=limit, stops=stops,
               sampling=sampling, template_kwargs=template_kwargs, on_event=on_event)


# --- the model thread -------------------------------------------------------------------------

class Job:
    """One request on its way through the model thread. The model thread feeds it tokens
    (`add`) and reports through `on_event(kind, value)` (on the model thread; keep it short):
    ("delta", text) pieces that add up to the answer, then ("done", None) with `text`,
    `finish_reason` ("stop" / "length") and `completion_tokens` set, or ("error", (status,
    message)). `result()` waits for the end instead. Set `cancelled` when nobody waits any more:
    the batch stops decoding for it."""

    def __init__(self, model, *, turns, images, prompt_tokens: int, max_tokens: int, stops: list[str],
                 sampling: tuple, template_kwargs: dict | None = None,
                 on_event: Callable[[str, Any], None] | None = None):
        self.model, self.turns, self.images = model, turns, images
        self.template_kwargs = template_kwargs or {}
        self.prompt_tokens, self.max_tokens, self.stops = prompt_tokens, max_tokens, stops
        self.sampling = sampling  # (temperature, top_p, seed)
        self.on_event = on_event
        self.route = "multimodal" if images else "base"
        self.tokens: list[int] = []
        self.sent = ""  # the text streamed so far, always a prefix of the final text
        self.text, self.finish_reason, self.completion_tokens = "", None, 0
        self.error: tuple[int, str] | None = None
        self.cancelled = False  # the client went away
        self.ended = threading.Event()  # set after the last event

    def _put(self, kind: str, value=None):
        if self.on_event is not None:
            self.on_event(kind, value)
        if kind != "delta":
            self.ended.set()

    def _stop_at(self, text: str) -> int:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else -1

    def add(self, token: int) -> bool:
        """A new answer token (model thread); True once this request wants no more."""
        if self.finish_reason or self.cancelled:
            return True
        self.tokens.append(token)
        # the whole answer decoded again: merged tokens and multi-byte characters come out as
        # the non-streamed text has them (token-by-token decoding would split them)
        text = self.model.tokenizer.decode(self.tokens)
        cut = self._stop_at(text)
        if cut >= 0:
            return self.finish(text[:cut], "stop")
        if len(self.tokens) >= self.max_tokens:
            return self.finish(text, "length")
        # stream what cannot change: not a trailing partial character (U+FFFD until its last
        # byte comes), not a tail that may be the start of a stop string
        safe = text.rstrip("\ufffd")
        held = max((k for s in self.stops for k in range(1, min(len(s), len(safe) + 1)) if safe.endswith(s[:k])),
                   default=0)
        safe = safe[: len(safe) - held]
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self._put("delta", safe[len(self.sent):])
            self.sent = safe
        return False

    def finish(self, text: str, reason: str, stop_token: bool = False) -> bool:
        """The answer is complete (model thread): the rest of its text, then "done"."""
        self.text, self.finish_reason = text, reason
        self.completion_tokens = len(self.tokens) + int(stop_token)  # as OpenAI: the stop token counts
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self._put("delta", text[len(self.sent):])
        self._put("done")
        return True

    def fail(self, status: int, message: str):
        """The batch failed (model thread): the job ends with ("error", (status, message))."""
        self.finish_reason, self.error = "error", (status, message)
        self._put("error", (status, message))

    def result(self, timeout: float | None = None) -> str:
        """Waits for the answer and returns its text. Raises `TimeoutError` after `timeout`
        seconds, `BadRequest` if the model refused the request (a 4xx status), `RuntimeError`
        if its batch failed (5xx)."""
        if not self.ended.wait(timeout):
            raise TimeoutError(f"no answer within {timeout} s")
        if self.error:
            status, message = self.error
            raise BadRequest(message, status=status) if status < 500 else RuntimeError(message)
        return self.text


class Batcher:
    """The model thread: collects jobs for `wait_s`, runs them as padded batches (one
    `model.generate` call per route, sampling settings and template options, at most
    `max_batch` jobs), feeds each job its tokens. `start()` / `close()`, or a `with` block.
    Raises ValueError for `max_batch` < 1."""

    def __init__(self, model, *, wait_s: float = 0.01, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.model, self.wait_s, self.max_batch = model, wait_s, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (real requests), for tests / logs
        self.thread = threading.Thread(target=self._loop, name="genieblue-serve-model", daemon=True)

    def start(self):
        """Starts the model thread."""
        self.thread.start()

    def close(self):
        """Ends the model thread after the jobs queued before this."""
        self.queue.put(None)
        self.thread.join(timeout=60)

    def __enter__(self) -> "Batcher":
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def submit(self, job: Job) -> Job:
        """Queues a job for the next batch; returns it."""
        self.queue.put(job)
        return job

    def _collect(self) -> list[Job] | None:
        first = self.queue.get()
        if first is None:
            return None
        jobs, deadline = [first], time.monotonic() + self.wait_s
        while len(jobs) < self.max_batch and (left := deadline - time.monotonic()) > 0:
            try:
                job = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # close after this round
                break
            jobs.append(job)
        return jobs

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs that can share a generate call: same route, sampling and template options, at most
        max_batch, and every prompt + the batch's max_tokens within the context."""
        groups: list[list[Job]] = []
        context = self.model.max_context
        for job in jobs:
            for g in groups:
                if (len(g) < self.max_batch and g[0].route == job.route and g[0].sampling == job.sampling
                        and g[0].template_kwargs == job.template_kwargs
                        and max(j.prompt_tokens for j in g + [job]) + max(j.max_tokens for j in g + [job])
                        <= context):
                    g.append(job)
                    break
            else:
                groups.append([job])
        return groups

    def _loop(self):
        while (jobs := self._collect()) is not None:
            for group in self._groups([j for j in jobs if not j.cancelled]):
                try:
                    self._run(group)
                except Exception as e:  # noqa: BLE001  (a bug must not stop the model thread)
                    self._fail(group, 500, f"{type(e).__name__}: {e}")

    @staticmethod
    def _fail(group: list[Job], status: int, message: str):
        for job in group:
            if not job.finish_reason:  # a job already answered keeps its answer
                job.fail(status, message)

    def _run(self, group: list[Job]):
        n = len(group)
        size = min(max(1 << (n - 1).bit_length(), n), max(self.max_batch, n))
        padded = group + [group[-1]] * (size - n)  # copies of the last request; their tokens are dropped
        temperature, top_p, seed = group[0].sampling
        self.batches.append(n)

        def on_token(i: int, token: int) -> bool:
            return True if i >= n else group[i].add(token)

        try:
            self.model.generate([j.turns for j in padded], images=[j.images or None for j in padded],
                                max_new_tokens=max(j.max_tokens for j in group), temperature=temperature,
                                top_p=top_p, seed=seed, on_token=on_token,
                                chat_template_kwargs=group[0].template_kwargs or None)
        except ValueError as e:  # checked up front; a request that still fails says why
            return self._fail(group, 400, str(e))
        for job in group:
            if not job.finish_reason:  # ended by a stop token: add() never saw it
                job.finish(self.model.tokenizer.decode(job.tokens), "stop", stop_token=True)
