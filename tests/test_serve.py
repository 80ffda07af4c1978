"""`tools.serve` through the official `openai` client (and its engine,
`genieblue_jax.inference.serving`, without HTTP): the answers are `GenieBlue.generate`'s
(text requests bitwise the base LLM's, image requests the multimodal path's), streamed
deltas add up to them, concurrent requests are batched and answered as alone, and bad
requests get a 4xx while the server keeps serving.

The model is a random tiny MLLM written by `genieblue_jax.random_model` (weights
drawn in numpy: nothing trained, nothing compiled to build it) with a 256-token context;
the server runs on a thread of the test process, so it shares the compiled programs with
the reference `model.generate` calls.
"""
import base64
import os
import subprocess
import sys
import threading
import time

import httpx2
import numpy as np
import openai
import pytest
from PIL import Image

import genieblue_jax
from genieblue_jax.cli.serve import BackgroundServer
from genieblue_jax.random_model import random_model

CONTEXT = 256
QUESTIONS = ["What is 3 plus 4?", "How many circles are there?", "What colour is the square?", "Name a shape.",
             "Is the circle left of the square?", "What is 9 plus 1?", "Answer yes or no.", "Describe it."]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = genieblue_jax.load(random_model(str(root), context=CONTEXT))
    image = root / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(image)
    # a batching window wide enough for 8 clients started together on a busy machine
    with BackgroundServer(model, batch_wait_ms=30, max_batch=8) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        yield {"model": model, "server": server, "client": client, "image": str(image), "id": "model"}


def _ask(served, content, **kwargs):
    return served["client"].chat.completions.create(model=served["id"], messages=[{"role": "user", "content": content}],
                                                    **kwargs)


def _image_parts(url, text="Describe the image."):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def _data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _stream(served, content, **kwargs):
    chunks = list(_ask(served, content, stream=True, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks][:-1] == [None] * (len(chunks) - 1)
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks


def test_text_requests_get_the_base_models_answer(served):
    model, question = served["model"], QUESTIONS[0]
    reply = _ask(served, question, max_tokens=16)
    want = model.generate(question, max_new_tokens=16)
    assert reply.choices[0].message.content == want == model.generate(question, max_new_tokens=16, mode="text")
    assert len(set(want)) > 5, want  # random weights scaled to give a varied answer
    seen, first5 = [], []  # the streaming hook: every answer token as decoded; True ends the loop
    model.generate(question, max_new_tokens=16, on_token=lambda i, token: seen.append(token))
    assert model.tokenizer.decode(seen) == want
    early = model.generate(question, max_new_tokens=16, on_token=lambda i, t: first5.append(t) or len(first5) == 5)
    assert first5 == seen[:5] and early == model.tokenizer.decode(seen[:5])
    assert reply.route == "base" and reply.object == "chat.completion" and reply.model == served["id"]
    n = len(model.requests.encode(question).tokens)
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (n, n + reply.usage.completion_tokens)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in served["client"].models.list()] == [served["id"]]  # the checkpoint directory's name
    assert httpx2.get(f"{served['server'].url}/health").json()["status"] == "ok"


def test_image_requests_run_the_multimodal_path(served):
    model, image = served["model"], served["image"]
    reply = _ask(served, _image_parts(_data_url(image)), max_tokens=12)
    want = model.generate("Describe the image.", images=[image], max_new_tokens=12)
    assert reply.choices[0].message.content == want and reply.route == "multimodal"
    assert want != model.generate("Describe the image.", max_new_tokens=12)  # another path than the base's
    assert _ask(served, _image_parts(f"file://{image}"), max_tokens=12).choices[0].message.content == want
    assert _ask(served, _image_parts(image), max_tokens=12).choices[0].message.content == want  # a plain path


def test_streamed_deltas_add_up_to_the_answer(served):
    for content in (QUESTIONS[0], _image_parts(_data_url(served["image"]))):
        whole = _ask(served, content, max_tokens=16)
        text, chunks = _stream(served, content, max_tokens=16)
        assert text == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].route == whole.route
        if content == QUESTIONS[0]:  # 16 tokens (test above): streamed piece by piece
            answer = text
            assert len(chunks) > 6, chunks
    # a stop string: the text before its first occurrence, streamed or not
    stop = next(answer[i:i + 2] for i in range(3, len(answer)) if answer[i:i + 2].isalpha())
    cut = _ask(served, QUESTIONS[0], max_tokens=16, stop=[stop, "never in it \u2603"])
    assert cut.choices[0].message.content == answer[:answer.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert _stream(served, QUESTIONS[0], max_tokens=16, stop=stop)[0] == answer[:answer.index(stop)]


def test_concurrent_clients_are_batched_and_answered_as_alone(served):
    lengths = [8 + i for i in range(8)]  # the batch runs the longest; each answer stops at its own
    start = time.perf_counter()
    sequential = [_ask(served, q, max_tokens=n).choices[0].message.content for q, n in zip(QUESTIONS, lengths)]
    sequential_s = time.perf_counter() - start
    batches = served["server"].app.state.batcher.batches
    for attempt in ("cold", "warm"):  # the first compiles the batch-of-8 programs
        answers, first, barrier = [None] * 8, len(batches), threading.Barrier(8)

        def ask(i):
            barrier.wait()
            answers[i] = _ask(served, QUESTIONS[i], max_tokens=lengths[i]).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s = time.perf_counter() - start
        assert answers == sequential
        assert max(batches[first:]) > 1, batches[first:]  # batched, not one by one
        print(f"8 clients ({attempt}): concurrent {concurrent_s:.2f} s, sequential {sequential_s:.2f} s, "
              f"ratio {concurrent_s / sequential_s:.2f}; batches {batches[first:]}")


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(served):
    url = f"{served['server'].url}/v1/chat/completions"
    bad = httpx2.post(url, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    for body, status, message in [
            ({"model": "m"}, 400, "'messages' must be a non-empty list"),
            ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role 'wizard'"),
            ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "'max_tokens' must be"),
            ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "only n=1"),
            ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": "thinking"}, 400,
             "'chat_template_kwargs': chat template options must be an object"),
            ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tools": []}}, 400,
             "['tools'] are not options"),
    ]:
        r = httpx2.post(url, json=body)
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
    with pytest.raises(openai.BadRequestError, match=f"exceed the model's context of {CONTEXT} tokens"):
        _ask(served, " ".join(QUESTIONS * 8), max_tokens=8)
    with pytest.raises(openai.BadRequestError, match=f"max_tokens={CONTEXT} exceed the model's context"):
        _ask(served, "hi", max_tokens=CONTEXT)
    with pytest.raises(openai.BadRequestError, match="remote image URLs are not fetched"):
        _ask(served, _image_parts("https://example.com/cat.png"))
    with pytest.raises(openai.BadRequestError, match=r"scene.png.missing is not a readable image file"):
        _ask(served, _image_parts(served["image"] + ".missing"))
    secret = os.path.join(os.path.dirname(served["image"]), "secret.txt")  # a server file that is not an image:
    with open(secret, "w") as f:                                           # named, its content never echoed
        f.write("hunter2")
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(served, _image_parts(secret))
    assert "secret.txt is not a readable image file" in str(refused.value) and "hunter2" not in str(refused.value)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].content\[0\]"):
        _ask(served, _image_parts("data:image/png;base64," + base64.b64encode(b"not a png").decode()))
    stream = httpx2.post(url, json={"messages": [{"role": "user", "content": [{"type": "video"}]}], "stream": True})
    assert stream.status_code == 400 and "parts are" in stream.json()["error"]["message"]  # before any event
    assert _ask(served, QUESTIONS[0], max_tokens=16).choices[0].message.content == \
        served["model"].generate(QUESTIONS[0], max_new_tokens=16)


def test_the_engine_runs_without_http(served):
    """`genieblue_jax.inference.serving` driven from Python, no FastAPI: two jobs submitted
    together run as one batch, their answers are `model.generate`'s (each at its own
    max_tokens), the streamed deltas add up to them, a bad request is refused before any model
    work, and importing the engine imports neither fastapi nor uvicorn."""
    from genieblue_jax.inference import serving
    model, lengths = served["model"], (12, 16)
    deltas: dict[int, list[str]] = {0: [], 1: []}

    def request(i):
        body = {"messages": [{"role": "user", "content": QUESTIONS[i]}], "max_tokens": lengths[i]}
        return serving.parse_request(model, body,
                                     on_event=lambda kind, value: kind == "delta" and deltas[i].append(value))

    with serving.Batcher(model, wait_s=1.0, max_batch=8) as batcher:  # a window both submits fall in
        jobs = [batcher.submit(request(i)) for i in range(2)]
        answers = [job.result(timeout=300) for job in jobs]
    assert batcher.batches == [2]
    assert answers == [model.generate(QUESTIONS[i], max_new_tokens=lengths[i]) for i in range(2)]
    assert ["".join(deltas[i]) for i in range(2)] == answers
    assert [job.route for job in jobs] == ["base", "base"] and all(job.finish_reason for job in jobs)
    with pytest.raises(serving.BadRequest, match="only n=1"):
        serving.parse_request(model, {"messages": [{"role": "user", "content": "hi"}], "n": 2})
    code = "import sys, genieblue_jax.inference.serving; print(sorted({'fastapi', 'uvicorn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]"
