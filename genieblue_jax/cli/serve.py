"""An OpenAI-compatible HTTP server over a model (FastAPI + uvicorn).

    python -m tools.serve --checkpoint workdirs/stage2_skip [--host 127.0.0.1 --port 8000]

`--checkpoint` is anything `genieblue_jax.load` takes. Endpoints:

    POST /v1/chat/completions   OpenAI chat completions (`stream: true`: server-sent events)
    GET  /v1/models             the one model; its id is the checkpoint directory's name
    GET  /health                {"status": "ok", ...}

Routing is `GenieBlue.generate`'s (the non-shared base): a request without images runs the
untouched base LLM, one with images the multimodal path; every response says which in
`"route": "base" | "multimodal"` (beside OpenAI's fields).

Messages take string content or typed parts: `{"type": "text", "text": ...}` and
`{"type": "image_url", "image_url": {"url": ...}}` where the URL is a `data:image/...;base64,`
URL, a `file:///abs/path.png` URL or a plain path on the server's disk (relative to its working
directory). Remote http(s) URLs are refused (400): the server fetches nothing. Anyone who can
reach the server can make it read image files it can read, hence the default --host 127.0.0.1.
Each image part puts an `<image>` slot where it stands (parts joined by newlines: [image, text]
is the `<image>\\n` + text that `model.generate(text, images=[...])` renders).

Prompts are rendered by the model's own chat template (its default system turn included), or
ChatML for a tokenizer without one, as `GenieBlue.generate` renders them; answers end at the
model's end tokens (generation_config.json's eos ids, the tokenizer's eos token, the template's
end of turn). A message holding one of the tokenizer's special-token strings is refused (400).

Fields: `max_tokens` (or `max_completion_tokens`; default --max_tokens, capped by the context),
`temperature` (default 0: greedy, as `GenieBlue.generate`; OpenAI's default is 1), `top_p`,
`seed`, `stop` (strings cut from the decoded text, the stop string not included),
`stream` (+ `stream_options.include_usage`), `chat_template_kwargs` (the template's options, as
vLLM takes them, e.g. `{"enable_thinking": false}` for Qwen3 / SmolLM3; the openai client sends
it with `extra_body={"chat_template_kwargs": {...}}`). Others OpenAI defines are accepted and ignored;
`n` must be 1; `model` is not checked (one model is served). Bad requests get a 4xx whose JSON says why, OpenAI-style
(`{"error": {"message": ...}}`); a prompt + max_tokens beyond the model's context is one.

Batching: requests arriving within --batch_wait_ms of each other run as one padded batch
(up to --max_batch) per route and sampling settings (temperature, top_p, seed; greedy ones
all together), on one model thread. A batch decodes max(max_tokens) tokens and each answer
stops at its own limit (greedy answers are prefix-consistent, so a batched answer is the one
a lone request gets); a request's answer is sent as soon as it is complete. Batch sizes are
padded to powers of two, so few programs compile. Sampled (temperature > 0) answers depend
on the batch they ran in; a seed reproduces them only for the same batch.

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "What is 12 plus 7?"}], "max_tokens": 32}'

    import openai
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(model="stage2_skip", max_tokens=32, messages=[
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///data/scene.png"}},
            {"type": "text", "text": "How many circles are there?"}]}])
    print(reply.choices[0].message.content, reply.route)         # ... multimodal
    for chunk in client.chat.completions.create(model="stage2_skip", stream=True,
                                                messages=[{"role": "user", "content": "Hi"}]):
        print(chunk.choices[0].delta.content or "", end="")

In-process (tests, benchmarks): `with BackgroundServer(model) as server: server.url`.
The engine under the app (request parsing, batching, streaming) is
`genieblue_jax.inference.serving`, usable without HTTP.

Without a checkpoint, `--random=LLM,VIT` serves a random-init MLLM of those presets
(`genieblue_jax.random_model`: a SentencePiece tokenizer, weights drawn in numpy and scaled so that greedy
decoding gives varied tokens; what tests/test_serve.py serves). `--benchmark` measures
instead of serving, through the official `openai` client against an in-process server:

    python -m tools.serve --random=tiny-qwen2,tiny-siglip --benchmark=1,8
    python -m tools.serve --checkpoint workdirs/stage2_skip --benchmark=1,8 --benchmark_image scene.png

Each of N concurrent clients sends one streaming request (greedy, --benchmark_max_tokens).
Per round: the median time to first token (request sent -> first content delta), the median
per-client decode rate (tokens after the first / time after the first), the aggregate
tokens/s (all clients' tokens / wall time), the wall time, how the requests were batched and
how many programs compiled while measuring (0 expected: every padded batch size is compiled,
and each concurrency run once, before measuring).
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (`Request`,
# imported in make_app) as objects.
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import threading
import time
import uuid
from typing import Any


def _error(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


# --- the app ----------------------------------------------------------------------------------

def make_app(model, *, model_id: str | None = None, batch_wait_ms: float = 10.0, max_batch: int = 8,
             max_tokens: int = 256):
    """The FastAPI app serving `model` (a `GenieBlue` with a tokenizer); its model thread
    runs while the app does (lifespan). `max_tokens`: a request's default."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    from genieblue_jax.inference import serving

    model.requests  # noqa: B018  (fails now if the model has no tokenizer; built once, not per thread)
    model_id = model_id or serving.model_name(model)
    created = int(time.time())
    batcher = serving.Batcher(model, wait_s=batch_wait_ms / 1000, max_batch=max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="genieblue_jax", lifespan=lifespan)
    app.state.batcher, app.state.model_id = batcher, model_id

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "queued": batcher.queue.qsize()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "genieblue_jax"}]}

    def chunk(job: serving.Job, cid: str, delta: dict, finish_reason=None, **extra) -> str:
        out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
               "route": job.route, **extra}
        return f"data: {json.dumps(out)}\n\n"

    def usage(job: serving.Job) -> dict:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                "total_tokens": job.prompt_tokens + job.completion_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _error(400, f"the request body is not valid JSON: {e}")
        loop, received = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(kind: str, value: Any):  # the model thread -> this request's event loop
            loop.call_soon_threadsafe(received.put_nowait, (kind, value))

        try:  # on a worker thread: image decoding, tokenising
            job = await asyncio.to_thread(serving.parse_request, model, body, max_tokens=max_tokens,
                                          model_id=model_id, on_event=on_event)
        except serving.BadRequest as e:
            return _error(e.status, str(e), e.param)
        batcher.submit(job)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        first = await received.get()  # errors before the first token still get their status code
        if first[0] == "error":
            return _error(*first[1])
        if not body.get("stream"):
            event = first
            while event[0] == "delta":
                event = await received.get()
            if event[0] == "error":
                return _error(*event[1])
            return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                                 "logprobs": None, "finish_reason": job.finish_reason}],
                    "usage": usage(job), "route": job.route}
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        async def events():
            event = first
            try:
                yield chunk(job, cid, {"role": "assistant", "content": ""})
                while True:
                    kind, value = event
                    if kind == "delta":
                        yield chunk(job, cid, {"content": value})
                    elif kind == "done":
                        yield chunk(job, cid, {}, job.finish_reason)
                        if include_usage:
                            out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                   "model": model_id, "choices": [], "usage": usage(job), "route": job.route}
                            yield f"data: {json.dumps(out)}\n\n"
                        break
                    else:  # an error after the stream began: OpenAI's in-stream error object
                        yield f"data: {json.dumps({'error': {'message': value[1], 'type': 'server_error'}})}\n\n"
                        break
                    event = await received.get()
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = not job.finish_reason  # the client left: stop decoding for it

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# --- running it -------------------------------------------------------------------------------

def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class BackgroundServer:
    """The server on a thread of this process, e.g. for tests (port 0: a free one).

        with BackgroundServer(model, port=0) as server:
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    """

    def __init__(self, model, *, host: str = "127.0.0.1", port: int = 0, **app_kwargs):
        import uvicorn
        self.app = make_app(model, **app_kwargs)
        self.sock = _bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="genieblue-serve-http")

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def run(model, *, host: str = "127.0.0.1", port: int = 8000, **app_kwargs) -> None:
    """Serves `model` (a `GenieBlue`, or a path `genieblue_jax.load` takes) until interrupted."""
    import uvicorn
    if isinstance(model, (str, os.PathLike)):
        import genieblue_jax
        model = genieblue_jax.load(os.fspath(model))
    app = make_app(model, **app_kwargs)
    print(f"serving {app.state.model_id} ({model}) on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


# --- a model without training, and the benchmark --------------------------------------------

def stream_once(client, model_id: str, messages, max_tokens: int) -> dict:
    """One streaming request: {"ttft", "seconds", "tokens", "text"}."""
    t0 = time.perf_counter()
    first, pieces, tokens = None, [], 0
    for chunk in client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "seconds": end - t0, "tokens": tokens, "text": "".join(pieces)}


def concurrent(client, model_id: str, messages_list, max_tokens: int) -> tuple[list[dict], float]:
    """Every messages of the list at once, one thread each: (results, wall seconds)."""
    results: list = [None] * len(messages_list)

    def one(i):
        results[i] = stream_once(client, model_id, messages_list[i], max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(messages_list))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def benchmark(model, clients=(1, 8), *, max_tokens: int = 64, image: str | None = None, rounds: int = 2,
              **app_kwargs) -> list[dict]:
    """--benchmark's figures (module docstring), one dict per measured round; `app_kwargs`
    as `make_app`'s."""
    import openai

    from genieblue_jax import inference
    questions = ["What is 3 plus 4?", "Describe the picture.", "How many circles are there?",
                 "What colour is the square?", "Is there a triangle left of the circle?", "What is 9 plus 1?",
                 "Name a shape.", "Answer yes or no."]

    def messages(i):
        text = questions[i % len(questions)]
        if image:
            url = image if "://" in image or image.startswith("data:") else f"file://{os.path.abspath(image)}"
            return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": text}]}]
        return [{"role": "user", "content": text}]

    # compiles every padded batch size first (1, 2, 4, ...): clients started together may still
    # arrive as two batches, and a compile inside a measured round would be all it measures
    size = 1
    while size <= max(clients):
        model.generate([messages(i)[0]["content"] if not image else questions[i % len(questions)]
                        for i in range(size)], images=[[image] if image else None] * size, max_new_tokens=max_tokens)
        size *= 2
    rows = []
    with BackgroundServer(model, **app_kwargs) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        model_id = server.app.state.model_id
        for n in clients:
            concurrent(client, model_id, [messages(i) for i in range(n)], max_tokens)  # warm-up: compiles
            for _ in range(rounds):
                batches, traces = len(server.app.state.batcher.batches), sum(inference.TRACES.values())
                results, wall = concurrent(client, model_id, [messages(i) for i in range(n)], max_tokens)
                rates = [(r["tokens"] - 1) / max(r["seconds"] - r["ttft"], 1e-9) for r in results if r["tokens"] > 1]
                rows.append({"clients": n, "ttft_s": statistics.median(r["ttft"] for r in results),
                             "client_tok_s": statistics.median(rates) if rates else 0.0,
                             "aggregate_tok_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
                             "tokens": sum(r["tokens"] for r in results),
                             "batches": server.app.state.batcher.batches[batches:],
                             "compiles": sum(inference.TRACES.values()) - traces})
    return rows


def print_benchmark(rows: list[dict]) -> None:
    """`benchmark`'s rows as a table."""
    print(f"{'clients':>7} {'TTFT s':>8} {'tok/s per client':>17} {'tok/s total':>12} {'wall s':>7} {'tokens':>7}  "
          "batches (compiles)")
    for r in rows:
        print(f"{r['clients']:>7} {r['ttft_s']:>8.3f} {r['client_tok_s']:>17.1f} {r['aggregate_tok_s']:>12.1f} "
              f"{r['wall_s']:>7.2f} {r['tokens']:>7}  {r['batches']} ({r['compiles']})")


# --- command line -----------------------------------------------------------------------------

def define_flags():
    """This tool's absl flags (defined only when it runs as a command, not on import)."""
    from absl import flags
    flags.DEFINE_string("checkpoint", None, "Training workdir, genieblue_jax checkpoint or HF model directory.")
    flags.DEFINE_list("random", None, "Instead of --checkpoint: LLM,ViT presets of a random model "
                      "(e.g. tiny-qwen2,tiny-siglip; genieblue_jax.random_model), for trying the server and "
                      "benchmarks.")
    flags.DEFINE_integer("step", None, "For a workdir: the checkpoint step (default: the latest).")
    flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0: every one; see the docstring).")
    flags.DEFINE_integer("port", 8000, "TCP port.")
    flags.DEFINE_float("batch_wait_ms", 10.0, "How long the first request of a batch waits for others.")
    flags.DEFINE_integer("max_batch", 8, "Most requests per generate call.")
    flags.DEFINE_integer("max_tokens", 256, "max_tokens of a request that gives none (capped by the context).")
    flags.DEFINE_list("benchmark", None, "Instead of serving: measure TTFT and tokens/s for these numbers of "
                      "concurrent streaming clients (e.g. 1,8) against an in-process server, print, exit.")
    flags.DEFINE_integer("benchmark_max_tokens", 64, "--benchmark: tokens per answer.")
    flags.DEFINE_string("benchmark_image", None, "--benchmark: an image file for every request (the multimodal "
                        "route).")
    flags.DEFINE_integer("benchmark_rounds", 2, "--benchmark: measured rounds per concurrency.")


def main(argv):
    """Loads --checkpoint (or builds --random) and serves it until interrupted, or --benchmark."""
    import tempfile

    from genieblue_jax import cli
    from genieblue_jax.random_model import random_model
    cli.start(argv)
    from absl import flags

    import genieblue_jax
    f = flags.FLAGS
    if bool(f.checkpoint) == bool(f.random):
        sys.exit("error: give --checkpoint=DIR or --random=LLM,VIT")
    with tempfile.TemporaryDirectory(prefix="genieblue_serve_") as tmp:
        path = f.checkpoint
        if f.random:
            if len(f.random) != 2:
                sys.exit(f"error: --random takes two presets, LLM,VIT; got {f.random}")
            path = random_model(tmp, llm=f.random[0], vit=f.random[1])
        try:
            model = genieblue_jax.load(path, step=f.step)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: cannot load --checkpoint={f.checkpoint}: {e}")
        options = dict(model_id=os.path.basename(os.path.normpath(f.checkpoint or "random")),
                       batch_wait_ms=f.batch_wait_ms, max_batch=f.max_batch)
        try:
            if f.benchmark:
                print(model, flush=True)
                rows = benchmark(model, [int(c) for c in f.benchmark], max_tokens=f.benchmark_max_tokens,
                                 image=f.benchmark_image, rounds=f.benchmark_rounds, **options)
                print_benchmark(rows)
                return
            run(model, host=f.host, port=f.port, max_tokens=f.max_tokens, **options)
        except ValueError as e:  # e.g. a model without a tokenizer
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
