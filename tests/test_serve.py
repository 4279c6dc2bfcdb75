"""``edgelora serve`` (issue 15): the real server (uvicorn on a free loopback port) talked to with
the ``openai`` client, httpx, curl and headless Chromium. Every greedy answer is compared with
``model.generate``/``model.chat`` of a separately loaded model with the same adapter and prompt."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="edgelora[serve] is not installed (pip install 'edgelora[serve]')")
pytest.importorskip("uvicorn", reason="edgelora[serve] is not installed (pip install 'edgelora[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is a test reference (pip install 'edgelora[test]')")
httpx = pytest.importorskip("httpx")

import edgelora  # noqa: E402
from conftest import ROOT, demo_adapter_paths, demo_bundle_path  # noqa: E402
from edgelora.errors import UsageError  # noqa: E402
from edgelora.openai_api import APIError, parse_request, resolve_adapter  # noqa: E402

KEY = "test-key-123"
CONTEXT = 256
MIX = {"pirate": 0.5, "shout": 0.5}
SELECTIONS = [None, "pirate", "shout", MIX]  # the base, each adapter, a mix
QUESTIONS = ["What color is the ball?", "Where is the cat?", "Who has the red hat?", "Tell me about the dog."]


class Recorder:
    """The server's engine, with every submitted request kept (to see what became of it)."""

    def __init__(self, engine):
        self.engine, self.requests = engine, []

    def submit(self, *args, **kwargs):
        req = self.engine.submit(*args, **kwargs)
        self.requests.append(req)
        return req

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def ref():
    """The reference: the same bundle and adapters, loaded apart from the server's model."""
    return edgelora.load(demo_bundle_path(), max_context=CONTEXT, adapters=demo_adapter_paths())


@pytest.fixture(scope="module")
def served():
    from edgelora.runtime.engine import Engine
    from edgelora.server import default_prompt_cache_bytes
    model = edgelora.load(demo_bundle_path(), max_context=CONTEXT)
    engine = Recorder(Engine(model, max_batch=4, max_queue=4, prompt_cache_bytes=default_prompt_cache_bytes(model, 4)))
    server = edgelora.serve(model, adapters=demo_adapter_paths(), port=0, api_key=KEY, background=True,
                            log_level="warning", max_body_bytes=64 * 1024, engine=engine)
    yield server, model, engine
    server.close()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def options(adapter) -> dict:
    """The request fields choosing ``adapter``: ``model`` for the base or one adapter, ``adapters`` for a mix."""
    if isinstance(adapter, dict):
        return {"model": "base", "extra_body": {"adapters": adapter}}
    return {"model": adapter or "demo-llama-nf4"}


def post(url: str, body: dict):
    """POST with the key, again after a short wait while the queue is full (429)."""
    for _ in range(400):
        r = httpx.post(url, json=body, headers=auth(), timeout=120)
        if r.status_code != 429:
            return r
        assert int(r.headers["Retry-After"]) >= 1
        time.sleep(0.05)
    raise AssertionError("the queue never had room")


def sse_events(lines) -> list:
    """The data of each server-sent event; the last is the string ``[DONE]``."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


# --- the OpenAI API against model.generate ---------------------------------------------------------------

@pytest.mark.parametrize("adapter", SELECTIONS, ids=["base", "pirate", "shout", "mix"])
def test_chat_and_completions_equal_generate(served, client, ref, adapter):
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    want = ref.chat(msgs, max_new_tokens=40, adapter=adapter, return_result=True)
    kw = options(adapter)
    r = client.chat.completions.create(messages=msgs, max_tokens=40, temperature=0, **kw)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_ids), len(want.token_ids))
    assert r.model == kw["model"]

    streamed = client.chat.completions.create(messages=msgs, max_completion_tokens=40, temperature=0, stream=True,
                                              **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want.text

    prompt = "Once upon a time"
    want = ref.generate(prompt, max_new_tokens=24, adapter=adapter, return_result=True)
    r = client.completions.create(prompt=prompt, max_tokens=24, temperature=0, **kw)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason in ("length", "context") else "stop")
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.prompt_tokens == len(want.prompt_ids)
    streamed = client.completions.create(prompt=prompt, max_tokens=24, temperature=0, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_stop_seed_and_token_prompts(client, ref):
    msgs = [{"role": "user", "content": QUESTIONS[1]}]
    want = ref.chat(msgs, max_new_tokens=40, stop=["ball", " the"], adapter="pirate", return_result=True)
    r = client.chat.completions.create(model="pirate", messages=msgs, max_tokens=40, temperature=0,
                                       stop=["ball", " the"])
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "stop"
    sampled = ref.generate("Once upon a time", max_new_tokens=16, adapter="shout", temperature=0.9, top_p=0.9,
                           seed=11)
    for _ in range(2):  # a seed gives the same sample each time, and model.generate's
        r = client.completions.create(model="shout", prompt="Once upon a time", max_tokens=16, temperature=0.9,
                                      top_p=0.9, seed=11)
        assert r.choices[0].text == sampled
    ids = ref.encode("Once upon a time")
    r = client.completions.create(model="demo-llama-nf4", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.generate(ids, max_new_tokens=12, adapter=None)


def test_logprobs_in_openai_shapes(client, ref):
    msgs = [{"role": "user", "content": QUESTIONS[2]}]
    want = ref.chat(msgs, max_new_tokens=12, adapter="pirate", logprobs=3, return_result=True)
    r = client.chat.completions.create(model="pirate", messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.logprobs)
    for got, exp in zip(content, want.logprobs):
        assert got.token == ref.tokenizer.decode([exp.token]) and bytes(got.bytes) == got.token.encode()
        assert got.logprob == pytest.approx(exp.logprob, abs=1e-9)
        assert [t.token for t in got.top_logprobs] == [ref.tokenizer.decode([i]) for i, _ in exp.top_logprobs]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([lp for _, lp in exp.top_logprobs], abs=1e-9)

    want = ref.generate("Once upon a time", max_new_tokens=10, adapter=None, logprobs=2, return_result=True)
    r = client.completions.create(model="base", prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [ref.tokenizer.decode([t.token]) for t in want.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-9)
    assert [len(d) for d in lp.top_logprobs] == [len({ref.tokenizer.decode([i]) for i, _ in t.top_logprobs})
                                                 for t in want.logprobs]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # streamed chat logprobs: one entry per token, the same values
    events = client.chat.completions.create(model="pirate", messages=msgs, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=1, stream=True)
    streamed = [e for c in events if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([t.logprob for t in ref.chat(
        msgs, max_new_tokens=12, adapter="pirate", logprobs=1, return_result=True).logprobs], abs=1e-9)


def test_streaming_shapes_with_usage(served, ref):
    url = served[0].url
    msgs = [{"role": "user", "content": QUESTIONS[3]}]
    want = ref.chat(msgs, max_new_tokens=30, adapter="shout", return_result=True)
    body = {"model": "shout", "messages": msgs, "max_tokens": 30, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None and len(c["choices"]) == 1
               for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1 and events[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == ("length" if want.finish_reason == "length" else "stop")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.text
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": len(want.prompt_ids), "completion_tokens": len(want.token_ids),
        "total_tokens": len(want.prompt_ids) + len(want.token_ids)}

    body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" and "usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref.generate("Once upon a time", 8, adapter=None)


def test_32_concurrent_requests_across_adapters_each_equal_its_sequential_reference(served, ref):
    url = served[0].url
    jobs = [(QUESTIONS[i % 4], SELECTIONS[(i // 4) % 4], i % 3 == 0) for i in range(32)]  # (question, adapter, stream)
    want = {(q, json.dumps(a)): ref.chat([{"role": "user", "content": q}], max_new_tokens=32, adapter=a)
            for q, a, _ in jobs}

    def ask(job):
        q, a, stream = job
        body = {"messages": [{"role": "user", "content": q}], "max_tokens": 32, "temperature": 0, "stream": stream,
                **({"model": "base", "adapters": a} if isinstance(a, dict) else {"model": a or "base"})}
        for attempt in range(200):  # a full queue answers 429 with Retry-After: wait a little and retry
            if stream:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=120) as r:
                    if r.status_code == 429:
                        time.sleep(0.05)
                        continue
                    assert r.status_code == 200
                    events = sse_events(r.iter_lines())
                return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
            r = post(url + "/v1/chat/completions", body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        raise AssertionError("the queue never had room")

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, jobs))
    for (q, a, _), text in zip(jobs, got):
        assert text == want[(q, json.dumps(a))], (q, a)


def test_adapters_load_and_unload_through_the_api_while_requests_run(served, ref, tmp_path):
    url, model = served[0].url, served[1]
    pirate = demo_adapter_paths()["pirate"]
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    want_pirate = ref.chat(msgs, max_new_tokens=40, adapter="pirate")
    want_base = ref.chat(msgs, max_new_tokens=40, adapter=None)

    def ask(name):
        r = post(url + "/v1/chat/completions", {"model": name, "messages": msgs, "max_tokens": 40, "temperature": 0})
        return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(ask, "base") for _ in range(3)]
        r = httpx.post(url + "/v1/adapters", headers=auth(), json={"name": "arr", "path": str(pirate)}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "arr" and r.json()["load_ms"] > 0
        assert "arr" in [m["id"] for m in httpx.get(url + "/v1/models", headers=auth()).json()["data"]]
        in_flight = [pool.submit(ask, "arr") for _ in range(3)]
        time.sleep(0.02)
        gone = httpx.delete(url + "/v1/adapters/arr", headers=auth())
        assert gone.status_code == 200 and gone.json() == {"id": "arr", "object": "adapter", "deleted": True}
        for f in running:
            assert f.result()[1]["choices"][0]["message"]["content"] == want_base
        for f in in_flight:  # submitted before the unload: the adapter they started with; after: not found
            status, body = f.result()
            assert (status == 200 and body["choices"][0]["message"]["content"] == want_pirate) or (
                status == 404 and body["error"]["code"] == "model_not_found"), body
    assert "arr" not in model.adapters.names
    status, body = ask("arr")
    assert status == 404 and "'arr' does not exist" in body["error"]["message"] and body["error"]["param"] == "model"

    # a bad path, an adapter folder that is broken, a duplicate name: clear errors, and the server goes on
    r = httpx.post(url + "/v1/adapters", headers=auth(), json={"name": "nope", "path": str(tmp_path / "missing")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_refused"
    assert "missing" in r.json()["error"]["message"]
    broken = tmp_path / "broken"
    shutil.copytree(pirate, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = httpx.post(url + "/v1/adapters", headers=auth(), json={"name": "broken", "path": str(broken)})
    assert r.status_code == 400 and "adapter_model.safetensors" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/adapters", headers=auth(), json={"name": "pirate", "path": str(pirate)})
    assert r.status_code == 409
    assert httpx.delete(url + "/v1/adapters/nope", headers=auth()).status_code == 404
    status, body = ask("pirate")
    assert status == 200 and body["choices"][0]["message"]["content"] == want_pirate
    listed = httpx.get(url + "/v1/adapters", headers=auth()).json()["data"]
    assert [a["id"] for a in listed] == ["pirate", "shout"] and listed[0]["path"] == str(pirate)


def test_errors_are_openai_shaped_with_the_right_status(served):
    url = served[0].url
    chat = url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]

    def check(r, status, code=None, param=None):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code is not None:
            assert err["code"] == code
        if param is not None:
            assert err["param"] == param
        return err

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        check(httpx.post(chat, json={"messages": msgs}, headers=headers), 401, "invalid_api_key")
        check(httpx.get(url + "/v1/models", headers=headers), 401)
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(url + "/health").json()["status"] == "ok"  # open, as the page itself
    assert httpx.get(url + "/").status_code == 200

    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    check(httpx.post(chat, json=big, headers=auth()), 413, "request_too_large")
    chunked = (b"{" + b" " * 1000 + b"}" for _ in range(70))  # no Content-Length: counted while read
    check(httpx.post(chat, content=chunked, headers=auth()), 413, "request_too_large")
    check(httpx.post(chat, json={"model": "gpt-4o", "messages": msgs}, headers=auth()), 404, "model_not_found", "model")
    check(httpx.post(chat, json={"model": "base", "adapters": {"pirate": 1, "ghost": 1}, "messages": msgs},
                     headers=auth()), 404, "adapter_not_found", "adapters")
    check(httpx.post(chat, json={"model": "pirate", "adapters": {"shout": 1}, "messages": msgs}, headers=auth()), 400)
    check(httpx.post(chat, json={"messages": msgs, "n": 2}, headers=auth()), 400, param="n")
    check(httpx.post(chat, json={"messages": msgs, "max_tokens": CONTEXT}, headers=auth()), 400,
          "context_length_exceeded", "max_tokens")
    long = [{"role": "user", "content": " ".join(["ball"] * CONTEXT)}]
    check(httpx.post(chat, json={"messages": long}, headers=auth()), 400, "context_length_exceeded", "messages")
    check(httpx.post(chat, json={"messages": msgs, "temperature": 3}, headers=auth()), 400, param="temperature")
    check(httpx.post(chat, json={"messages": msgs, "top_logprobs": 2}, headers=auth()), 400, param="top_logprobs")
    check(httpx.post(chat, json={"messages": []}, headers=auth()), 400, param="messages")
    check(httpx.post(chat, json={"messages": [{"role": "wizard", "content": "hi"}]}, headers=auth()), 400)
    check(httpx.post(chat, content=b"{not json", headers=auth()), 400)
    check(httpx.post(url + "/v1/completions", json={"prompt": [10**6]}, headers=auth()), 400, param="prompt")
    check(httpx.get(url + "/v1/nothing", headers=auth()), 404, "not_found")
    check(httpx.get(chat, headers=auth()), 405)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="base", messages=msgs, n=2)


def test_full_queue_is_429_with_retry_after_and_the_queued_ones_still_finish(served, ref):
    server, model, engine = served
    chat = server.url + "/v1/chat/completions"
    body = {"model": "pirate", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 16,
            "temperature": 0}
    want = ref.chat(body["messages"], max_new_tokens=16, adapter="pirate")

    def until(condition):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)

    held = model._running()  # the model's step lock: the engine stops at its first forward
    held.__enter__()
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            accepted = [pool.submit(httpx.post, chat, json=body, headers=auth(), timeout=120)]
            until(lambda: engine.stats()["running"] == 1)  # admitted, its prefill waiting for the lock
            accepted += [pool.submit(httpx.post, chat, json=body, headers=auth(), timeout=120) for _ in range(4)]
            until(lambda: engine.stats()["queued"] == 4)  # max_queue
            r = httpx.post(chat, json=body, headers=auth(), timeout=30)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["Retry-After"]) >= 1
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(**body)
            held.__exit__(None, None, None)
            held = None
            for f in accepted:
                assert f.result().status_code == 200 and f.result().json()["choices"][0]["message"]["content"] == want
    finally:
        if held is not None:
            held.__exit__(None, None, None)


def test_a_client_that_disconnects_cancels_its_request(served):
    server, model, engine = served
    for stream in (True, False):
        n = len(engine.requests)
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": stream}
        held = model._running()  # nothing is generated until the client has gone
        held.__enter__()
        try:
            with httpx.Client(timeout=30) as c:
                if stream:
                    with c.stream("POST", server.url + "/v1/completions", json=body, headers=auth()) as r:
                        assert r.status_code == 200 and len(engine.requests) == n + 1  # submitted before the headers
                else:
                    with pytest.raises(httpx.ReadTimeout):
                        c.post(server.url + "/v1/completions", json=body, headers=auth(), timeout=1.0)
            time.sleep(0.2)  # the server sees the connection close
        finally:
            held.__exit__(None, None, None)
        result = engine.requests[n].result(timeout=60)
        assert result.finish_reason == "cancelled" and len(result.token_ids) < 200


def test_curl_works_unchanged(served, ref):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    url = served[0].url
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    body = json.dumps({"model": "pirate", "messages": msgs, "max_tokens": 30, "temperature": 0})
    out = subprocess.run([curl, "-sS", url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-H", f"Authorization: Bearer {KEY}", "-d", body], capture_output=True, text=True, timeout=60)
    want = ref.chat(msgs, max_new_tokens=30, adapter="pirate")
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == want
    body = json.dumps({"model": "pirate", "messages": msgs, "max_tokens": 30, "temperature": 0, "stream": True})
    out = subprocess.run([curl, "-sSN", url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-H", f"Authorization: Bearer {KEY}", "-d", body], capture_output=True, text=True, timeout=60)
    events = sse_events(out.stdout.split("\n"))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == want


def test_models_lists_the_base_and_resident_adapters(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "demo-llama-nf4" and set(ids[1:]) >= {"pirate", "shout"}
    assert client.models.retrieve("pirate").id == "pirate"


# --- request parsing, without a server -------------------------------------------------------------------

def test_adapter_selection_from_model_and_both_mix_styles():
    names = ["pirate", "shout"]
    assert resolve_adapter({"model": "b"}, "b", names) == ("b", None)
    assert resolve_adapter({"model": "base"}, "b", names) == ("base", None)
    assert resolve_adapter({"model": "shout"}, "b", names) == ("shout", "shout")
    assert resolve_adapter({"model": "b", "adapters": {"pirate": 0.5, "shout": 0.5}}, "b", names)[1] == MIX
    assert resolve_adapter({"model": "b", "lora": [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.5}]}, "b",
                           names)[1] == MIX
    assert resolve_adapter({"model": "b", "adapters": [{"name": "pirate", "scale": 0.25}]}, "b", names)[1] == \
        {"pirate": 0.25}
    assert resolve_adapter({}, "b", names) == ("b", None)
    for body, status in (({"model": "x"}, 404), ({"model": "b", "lora": [{"id": 2}]}, 404),
                         ({"model": "b", "adapters": {"pirate": "half"}}, 400), ({"model": "b", "adapters": 3}, 400),
                         ({"model": "b", "adapters": {"pirate": float("nan")}}, 400)):
        with pytest.raises(APIError) as e:
            resolve_adapter(body, "b", names)
        assert e.value.status == status


def test_parse_request_limits(ref):
    job = parse_request("completion", {"prompt": "Once", "max_tokens": 5, "temperature": 0, "stop": "x"}, ref, "b")
    assert job.max_tokens == 5 and job.stop == ["x"] and job.sampling["temperature"] == 0.0
    assert job.prompt_ids == ref.encode("Once")
    assert parse_request("completion", {"prompt": "Once"}, ref, "b").max_tokens == CONTEXT - len(job.prompt_ids)
    assert parse_request("completion", {"prompt": "Once"}, ref, "b").sampling["temperature"] == 1.0  # OpenAI's default
    for body in ({"prompt": "Once", "presence_penalty": 0.5}, {"prompt": "Once", "stop": ["x"] * 17},
                 {"prompt": "Once", "max_tokens": 0}, {"prompt": "Once", "top_p": 0}, {"prompt": "Once", "echo": True},
                 {"prompt": "Once", "stream_options": {"include_usage": True}}, {"prompt": ""}, {"prompt": 5},
                 {"prompt": "Once", "logprobs": 21}, {"prompt": "Once", "temperature": True}):
        with pytest.raises(APIError) as e:
            parse_request("completion", body, ref, "b")
        assert e.value.status == 400, body


def test_without_the_serve_extra_the_error_says_what_to_install(monkeypatch):
    from edgelora import server
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(UsageError, match=r"pip install 'edgelora\[serve\]'"):
        server.serve("anything")


def test_the_chat_page_is_package_data():
    assert (Path(edgelora.__file__).parent / "static" / "chat.html").is_file()
    assert '"static/*"' in (ROOT / "pyproject.toml").read_text()
    page = (Path(edgelora.__file__).parent / "static" / "chat.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


# --- the command line: serve, then Ctrl-C drains -------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_and_sigint_lets_running_requests_finish(ref, tmp_path):
    port = _free_port()
    pirate = demo_adapter_paths()["pirate"]
    env = {**os.environ, "EDGELORA_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "edgelora", "serve", str(demo_bundle_path()), "--port", str(port),
                             "--adapter", f"pirate={pirate}", "--max-context", str(CONTEXT), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key from EDGELORA_API_KEY
        msgs = [{"role": "user", "content": QUESTIONS[0]}]
        body = {"model": "pirate", "messages": msgs, "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGINT)  # mid-stream: the stream still ends normally
            events = sse_events([first, *lines])
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == \
            ref.chat(msgs, max_new_tokens=40, adapter="pirate")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the chat page in headless Chromium ---------------------------------------------------------------

class WebDriver:
    """The few W3C WebDriver commands the test needs, spoken to chromedriver over HTTP."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, driver: str, browser: str, profile: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen([driver, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.base + "/status", timeout=1).json()["value"]["ready"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("chromedriver did not start")
            time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,800"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": browser, "args": args}}}}
        self.session = self._call("POST", "/session", caps, timeout=120)["sessionId"]

    def _call(self, method, path, body=None, timeout=60):
        r = httpx.request(method, self.base + path, json=body, timeout=timeout)
        value = r.json()["value"]
        if r.status_code != 200:
            raise AssertionError(f"webdriver {path}: {value}")
        return value

    def cmd(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url):
        self.cmd("POST", "/url", {"url": url})

    def find(self, css):
        found = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        assert self.ELEMENT in found, found
        return found[self.ELEMENT]

    def type(self, css, text):
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script, *args, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(script, *args)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for: {script}")

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))

    def close(self):
        try:
            self._call("DELETE", f"/session/{self.session}", timeout=30)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def test_chat_page_in_headless_chromium(served, ref, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    url = served[0].url
    wd = WebDriver(driver, browser, tmp_path / "profile")
    try:
        wd.get(url + "/")
        wd.type("#key", KEY)
        wd.js("document.querySelector('#key').dispatchEvent(new Event('change'))")
        options = wd.wait("const o = [...document.querySelectorAll('#model option')].map(o => o.value);"
                          "return o.length > 1 ? o : null")
        assert options[:3] == ["demo-llama-nf4", "pirate", "shout"] and options[-1] == "__mix__"

        def ask(question, select, mix=None):
            wd.js("const s = document.querySelector('#model'); s.value = arguments[0];"
                  "s.dispatchEvent(new Event('change'))", select)
            if mix is not None:
                wd.js("document.querySelector('#mix').value = arguments[0]", mix)
            n = wd.js("return document.querySelectorAll('.assistant').length")
            wd.type("#input", question)
            wd.click("#send")
            wd.wait("const a = document.querySelectorAll('.assistant'); return a.length > arguments[0] && "
                    "a[a.length - 1].dataset.done", n)
            return wd.js("const a = document.querySelectorAll('.assistant');"
                         "return [a[a.length - 1].dataset.done, a[a.length - 1].querySelector('.text').textContent]")

        q = QUESTIONS[0]
        assert ask(q, "demo-llama-nf4") == ["1", ref.chat([{"role": "user", "content": q}], max_new_tokens=128,
                                                          adapter=None)]
        stats = wd.js("return document.querySelector('#stats').textContent")
        assert "tok/s" in stats and "tokens" in stats
        wd.click("#new")
        assert ask(q, "pirate") == ["1", ref.chat([{"role": "user", "content": q}], max_new_tokens=128,
                                                  adapter="pirate")]
        first = ref.chat([{"role": "user", "content": q}], max_new_tokens=128, adapter="pirate")
        q2 = QUESTIONS[1]  # a second turn: the conversation so far goes with it
        history = [{"role": "user", "content": q}, {"role": "assistant", "content": first},
                   {"role": "user", "content": q2}]
        assert ask(q2, "shout") == ["1", ref.chat(history, max_new_tokens=128, adapter="shout")]
        wd.click("#new")
        assert ask(q, "__mix__", "pirate=0.5,shout=0.5") == [
            "1", ref.chat([{"role": "user", "content": q}], max_new_tokens=128, adapter=MIX)]
        wd.screenshot(tmp_path / "chat-page.png")
        assert (tmp_path / "chat-page.png").stat().st_size > 1000
    finally:
        wd.close()
