"""`tinylm serve`'s OpenAI API, tested with the official `openai` client (the oracle of
the wire format) against a server on a free localhost port: completions and chat equal
`tinylm.generate.generate` on the same prompt, streaming equals the whole response,
n > 1, stop strings, seeds, logprobs, usage; every documented error's status and
error object; the HTTP layer's framing; the API key; the queue limit; a client that
leaves mid-stream; a model that fails; the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from serve_helpers import NAME, Gated, client, raw, running, tiny_model, tiny_tokenizer, \
    wait_until
from tinylm.generate import cut_at_stop, generate
from tinylm.prompts import ChatTemplate
from tinylm.sampling import SamplingConfig

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def server(model, tok):
    with running(model, tok, max_batch=8, max_body=4096) as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    return client(server)


def gen(model, tok, ids, max_tokens, n=1, seed=None, stop=(), **sampling):
    out = generate(model, [ids] * n, max_tokens, tokenizer=tok, stop=stop, seed=seed,
                   sampling=SamplingConfig(**sampling))
    texts = [cut_at_stop(tok.decode(t, skip_special_tokens=True), stop) for t in out.tokens]
    return texts, out


def _chat_ids(tok, messages):
    template = ChatTemplate.builtin("plain")
    return tok.encode(template.render(messages), allowed_special=template.special_tokens(tok)), \
        tuple(template.stop)


# --------------------------------------------------------------------------- results


def test_models_health_and_metrics(server, api):
    models = api.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert api.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("other")
    health = json.loads(raw(server.port, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
                        .split(b"\r\n\r\n", 1)[1])
    assert health["status"] == "ok" and health["model"] == NAME


def test_completion_equals_generate_with_usage(model, tok, api):
    prompt = "ROMEO:\nWhat light"
    ids = tok.encode(prompt)
    r = api.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    texts, out = gen(model, tok, ids, 12, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert r.choices[0].text == texts[0]
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(ids), 12, len(ids) + 12)
    # token ids as the prompt, and a list of prompts: one choice each, in order
    r2 = api.completions.create(model=NAME, prompt=[ids, tok.encode("All:")], max_tokens=5,
                                temperature=0)
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[0].text == texts[0][:len(r2.choices[0].text)] and r2.choices[0].text
    assert r2.usage.prompt_tokens == len(ids) + len(tok.encode("All:"))
    # the default max_tokens of a completion is OpenAI's 16
    assert api.completions.create(model=NAME, prompt="All:", temperature=0) \
        .usage.completion_tokens == 16


def test_chat_uses_the_template(model, tok, api):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who is there?"}]
    r = api.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                    temperature=0)
    ids, stops = _chat_ids(tok, messages)
    texts, out = gen(model, tok, ids, 10, stop=stops, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == texts[0]
    assert r.usage.prompt_tokens == len(ids)
    # max_completion_tokens is the chat spelling; content as text parts
    r2 = api.chat.completions.create(
        model=NAME, max_completion_tokens=4, temperature=0,
        messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": "Who is there?"}])
    assert r2.usage.completion_tokens == 4 and texts[0].startswith(r2.choices[0].message.content)


def test_streaming_equals_whole(api):
    for kind in ("completion", "chat"):
        kw = dict(model=NAME, max_tokens=20, temperature=0.9, top_p=0.95, seed=3, n=2)
        if kind == "chat":
            kw["messages"] = [{"role": "user", "content": "Speak, speak!"}]
            create = api.chat.completions.create
        else:
            kw["prompt"] = "First Citizen:\n"
            create = api.completions.create
        whole = create(**kw)
        deltas, finish, usage = ["", ""], [None, None], []
        for chunk in create(stream=True, stream_options={"include_usage": True}, **kw):
            if chunk.usage is not None:
                usage.append(chunk.usage)
                assert chunk.choices == []
                continue
            for c in chunk.choices:
                if kind == "chat":
                    assert chunk.object == "chat.completion.chunk"
                    deltas[c.index] += c.delta.content or ""
                else:
                    deltas[c.index] += c.text
                finish[c.index] = c.finish_reason or finish[c.index]
        texts = [c.message.content if kind == "chat" else c.text for c in whole.choices]
        assert deltas == texts
        assert finish == [c.finish_reason for c in whole.choices]
        assert len(usage) == 1 and usage[0] == whole.usage


def test_n_and_seeds(model, tok, api):
    prompt = "KING RICHARD:"
    kw = dict(model=NAME, prompt=prompt, max_tokens=15, n=3, temperature=1.0, seed=11)
    a, b = api.completions.create(**kw), api.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.text for c in b.choices]  # same seed, same text
    assert len(set(texts)) == 3  # the choices are different draws
    other = api.completions.create(**dict(kw, seed=12))
    assert [c.text for c in other.choices] != texts
    # the same draws as generate(..., seed=11) over n copies of the prompt
    want, _ = gen(model, tok, tok.encode(prompt), 15, n=3, seed=11, temperature=1.0)
    assert texts == want
    assert a.usage.completion_tokens == 45 and a.usage.prompt_tokens == len(tok.encode(prompt))


def test_penalties_and_extensions(model, tok, api):
    prompt = "MENENIUS:"
    kw = dict(temperature=0.7, frequency_penalty=1.5, presence_penalty=0.5)
    r = api.completions.create(model=NAME, prompt=prompt, max_tokens=15, seed=5,
                               extra_body={"top_k": 20}, **kw)
    want, _ = gen(model, tok, tok.encode(prompt), 15, seed=5, top_k=20, **kw)
    assert r.choices[0].text == want[0]
    r = api.completions.create(model=NAME, prompt=prompt, max_tokens=15, seed=5, top_p=0.8,
                               extra_body={"top_k": -1, "min_p": 0.1}, **kw)  # -1: no top_k
    want, _ = gen(model, tok, tok.encode(prompt), 15, seed=5, top_p=0.8, min_p=0.1, **kw)
    assert r.choices[0].text == want[0]


def test_stop_strings(model, tok, api):
    prompt = "CORIOLANUS:"
    full = api.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0)
    text = full.choices[0].text
    printable = [i for i in range(2, len(text) - 2) if text[i:i + 2].isascii()
                 and text[i:i + 2].strip() and text.find(text[i:i + 2]) == i]
    assert printable, text
    stop = text[printable[0]:printable[0] + 2]
    for kind in ("whole", "stream"):
        kw = dict(model=NAME, prompt=prompt, max_tokens=30, temperature=0,
                  stop=[stop, "never appears"])
        if kind == "whole":
            r = api.completions.create(**kw)
            got, reason = r.choices[0].text, r.choices[0].finish_reason
        else:
            chunks = list(api.completions.create(stream=True, **kw))
            got = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        assert got == text[:printable[0]] and reason == "stop"


def test_logprobs(model, tok, api):
    prompt = "VOLUMNIA:"
    ids = tok.encode(prompt)
    _, out = gen(model, tok, ids, 6, temperature=0)
    r = api.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                               logprobs=3)
    lp = r.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, out.logprobs[0], atol=1e-6)
    assert lp.tokens == [tok.decode([t]) for t in out.tokens[0]]
    assert lp.text_offset[0] == len(prompt)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        values = list(top.values())
        assert values == sorted(values, reverse=True) and len(top) <= 3
        assert max(values) == pytest.approx(chosen)  # greedy: the chosen one is the top
    c = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    # streamed: the same log-probabilities, one token per chunk
    chunks = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=5, temperature=0, logprobs=True, stream=True)
    streamed = [e.logprob for ch in chunks for c in ch.choices if c.logprobs
                for e in c.logprobs.content]
    np.testing.assert_allclose(streamed, [e.logprob for e in content], atol=1e-9)


# --------------------------------------------------------------------------- errors


def _error(excinfo, status, param=None, code=None):
    e = excinfo.value
    assert e.status_code == status
    assert set(e.body) == {"message", "type", "param", "code"} and e.body["message"]
    assert e.body["param"] == param
    if code is not None:
        assert e.body["code"] == code
    return e.body


def test_bad_fields_are_400_naming_the_field(api):
    chat = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(prompt="x", temperature="hot"), "temperature", "invalid_type"),
        (dict(prompt="x", temperature=3), "temperature", "invalid_value"),
        (dict(prompt="x", max_tokens=1.5), "max_tokens", "invalid_type"),
        (dict(prompt="x", max_tokens=0), "max_tokens", "invalid_value"),
        (dict(prompt="x", n="2"), "n", "invalid_type"),
        (dict(prompt="x", n=9), "n", "invalid_value"),  # more than the server's --max-batch
        (dict(prompt="x", stop=5), "stop", "invalid_type"),
        (dict(prompt="x", stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
        (dict(prompt="x", logprobs=True), "logprobs", "invalid_type"),
        (dict(prompt="x", top_p=0), "top_p", "invalid_value"),
        (dict(prompt="x", seed="1"), "seed", "invalid_type"),
        (dict(prompt="x", seed=-1), "seed", "invalid_value"),
        (dict(prompt=[1, "a"]), "prompt", "invalid_type"),
        (dict(prompt=[[10**6]]), "prompt", "invalid_value"),
        (dict(prompt="x", max_tokens=1000), "max_tokens", "invalid_value"),
        (dict(prompt=[5] * 100, max_tokens=50), "max_tokens", "context_length_exceeded"),
        (dict(prompt=[5] * 128), "prompt", "context_length_exceeded"),
    ]
    for extra, param, code in cases:
        with pytest.raises(openai.BadRequestError) as e:
            api.completions.create(model=NAME, **extra)
        _error(e, 400, param, code)
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=NAME, prompt="x", extra_body={"bogus": 1})
    _error(e, 400, "bogus", "unknown_parameter")
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=NAME, prompt="x", logit_bias={"1": 5})
    _error(e, 400, "logit_bias", "unsupported_parameter")
    chat_cases = [
        (dict(messages="hi"), "messages"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
        (dict(messages=[{"role": "user", "content": 3}]), "messages[0].content"),
        (dict(messages=[{"role": "user", "content": "a <|endoftext|>"}]), "messages[0].content"),
        (dict(messages=chat, top_logprobs=2), "top_logprobs"),
        (dict(messages=chat, stream_options={"include_usage": True}), "stream_options"),
        (dict(messages=chat, max_tokens=2, max_completion_tokens=2), "max_tokens"),
    ]
    for extra, param in chat_cases:
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model=NAME, **extra)
        _error(e, 400, param)


def test_unknown_model_is_404(api):
    with pytest.raises(openai.NotFoundError) as e:
        api.completions.create(model="gpt-4", prompt="x")
    _error(e, 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    _error(e, 404, "model", "model_not_found")


def _response(data: bytes):
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    return status, {k.lower(): v for k, v in headers.items()}, body


def _post(port, path, body: bytes, extra: str = "") -> tuple:
    return _response(raw(port, (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                f"Content-Type: application/json\r\n{extra}"
                                f"Content-Length: {len(body)}\r\n\r\n").encode() + body))


def test_malformed_requests(server):
    status, _, body = _post(server.port, "/v1/completions", b'{"model": "tiny", "prompt": ')
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = _post(server.port, "/v1/completions", b'[1, 2]')
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = _post(server.port, "/v1/completions",
                            b'{"model": "tiny", "prompt": "x", "temperature": NaN}')
    assert status == 400
    status, _, body = _post(server.port, "/v1/chat/completions", b'{"model": "tiny"}')
    assert status == 400 and json.loads(body)["error"]["param"] == "messages"
    # too large a body: refused before it is read
    status, _, body = _post(server.port, "/v1/completions", b"x" * 5000)
    error = json.loads(body)["error"]
    assert status == 413 and error["code"] == "request_too_large" and error["param"] is None
    # unknown path, wrong method
    status, _, body = _response(raw(server.port, b"GET /v2/nothing HTTP/1.1\r\n"
                                                 b"Connection: close\r\n\r\n"))
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_url"
    status, headers, body = _response(raw(server.port, b"GET /v1/completions HTTP/1.1\r\n"
                                                       b"Connection: close\r\n\r\n"))
    assert status == 405 and headers["allow"] == "POST"
    # framing errors: a 4xx JSON error, and the connection is closed
    for data, want in ((b"NONSENSE\r\n\r\n", 400), (b"GET / HTTP/2.0\r\n\r\n", 505),
                       (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
                       (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"0\r\n\r\n", 501),
                       (b"POST /v1/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
                       (b"GET / HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n", 431)):
        status, _, body = _response(raw(server.port, data))
        assert status == want, data[:40]
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_keep_alive_and_expect_continue(server):
    request = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = raw(server.port, request)
    assert data.count(b"HTTP/1.1 200 OK") == 2  # two answers on one connection
    body = json.dumps({"model": NAME, "prompt": "x", "max_tokens": 2}).encode()
    status, _, out = _post(server.port, "/v1/completions", body, "Expect: 100-continue\r\n")
    assert status == 100  # the interim response comes first ...
    assert b"HTTP/1.1 200 OK" in out and b'"text_completion"' in out  # ... then the answer
    # a stream to an HTTP/1.0 client: events as they are, ended by closing
    body = json.dumps({"model": NAME, "prompt": "x", "max_tokens": 3, "stream": True}).encode()
    status, headers, out = _response(raw(server.port, (
        f"POST /v1/completions HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        + body))
    assert status == 200 and "transfer-encoding" not in headers
    assert headers["content-type"].startswith("text/event-stream")
    events = [e for e in out.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"
    # an HTTP/1.1 stream is chunked, and the connection stays open for the next request
    request = (f"POST /v1/completions HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body + b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"
    out = raw(server.port, request)
    assert b"Transfer-Encoding: chunked" in out and out.endswith(b"}") \
        and b"data: [DONE]\n\n\r\n0\r\n\r\nHTTP/1.1 200 OK" in out


def test_static_files_and_api_key(model, tok, tmp_path):
    (tmp_path / "index.html").write_text("<html>chat</html>")
    (tmp_path / "app.js").write_text("let x = 1;")
    with running(model, tok, static=str(tmp_path), api_key="sesame") as s:
        good = client(s, api_key="sesame")
        assert good.models.list().data[0].id == NAME
        for key in ("wrong", None):
            bad_client = client(s, api_key=key or "x")
            if key is None:  # no Authorization header at all
                bad_client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0,
                                           default_headers={"Authorization": ""})
            with pytest.raises(openai.AuthenticationError) as e:
                bad_client.completions.create(model=NAME, prompt="x")
            _error(e, 401, None, "invalid_api_key" if key else "missing_api_key")
        status, headers, _ = _response(raw(s.port, b"GET /metrics HTTP/1.1\r\n"
                                                   b"Connection: close\r\n\r\n"))
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        # /health and the page's files need no key
        for path, want in ((b"/health", b'"ok"'), (b"/", b"<html>chat</html>"),
                           (b"/app.js", b"let x = 1;"), (b"/static/app.js", b"let x = 1;")):
            status, headers, body = _response(raw(s.port, b"GET " + path + b" HTTP/1.1\r\n"
                                                  b"Connection: close\r\n\r\n"))
            assert status == 200 and want in body, path
        assert headers["content-type"].startswith("text/javascript")
        for path in (b"/../serve_helpers.py", b"/static/../x", b"/.hidden"):
            status, _, _ = _response(raw(s.port, b"GET " + path + b" HTTP/1.1\r\n"
                                                  b"Connection: close\r\n\r\n"))
            assert status in (401, 404), path


# --------------------------------------------------------------------------- load


def test_full_queue_is_429_and_a_leaving_client_frees_its_row(tok):
    model = tiny_model(tok, max_positions=256, cls=Gated)
    with running(model, tok, max_batch=1, max_queue=1) as s:
        api = client(s)
        model.delay = 0.01  # ~100 tokens/s: the stream below outlasts the test
        stream = api.completions.create(model=NAME, prompt="x", max_tokens=200,
                                        temperature=0, stream=True)
        next(iter(stream))  # it holds the only row now
        done = []
        waiter = threading.Thread(target=lambda: done.append(api.completions.create(
            model=NAME, prompt="y", max_tokens=3, temperature=0)))
        waiter.start()
        try:
            wait_until(lambda: s.engine.waiting == 1, what="the second request to queue")
            with pytest.raises(openai.RateLimitError) as e:
                api.completions.create(model=NAME, prompt="z", max_tokens=3)
            assert _error(e, 429, None, "queue_full")["type"] == "rate_limit_error"
            stream.close()  # the client goes away mid-stream
            waiter.join(10)
        finally:
            model.delay = 0
            waiter.join(10)
        assert done and done[0].usage.completion_tokens == 3  # it got the freed row
        metrics = s.engine.metrics()
        assert metrics["cancelled"] == 1 and metrics["tokens"] < 200
        wait_until(lambda: not s.engine.rows, what="every row to be free")


def test_a_failing_model_is_a_500_and_the_server_goes_on(tok):
    model = tiny_model(tok, cls=Gated)
    with running(model, tok) as s:
        api = client(s)
        model.fail = True
        with pytest.raises(openai.InternalServerError) as e:
            api.completions.create(model=NAME, prompt="x", max_tokens=3)
        assert "the model broke" in _error(e, 500, None, "engine_error")["message"]
        model.fail = True
        chunks = api.chat.completions.create(model=NAME, stream=True, max_tokens=3,
                                             messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.APIError, match="the model broke"):
            list(chunks)
        assert api.completions.create(model=NAME, prompt="x", max_tokens=3) \
            .usage.completion_tokens == 3
    # a closed server's engine has stopped; a request to a closed port is refused
    assert not s.engine.alive


def test_adapters(tok):
    """A LoRA model serves what generate() gives it; prompt tuning (virtual tokens in
    the cache) is refused in one line."""
    from tinylm import peft
    from tinylm.errors import TinyLMError
    from tinylm.serve import Server

    model = peft.apply(tiny_model(tok, seed=4), "lora", r=4, init_lora_weights=False).eval()
    with running(model, tok) as s:
        r = client(s).completions.create(model=NAME, prompt="ROMEO:", max_tokens=8,
                                         temperature=0)
    assert r.choices[0].text == gen(model, tok, tok.encode("ROMEO:"), 8, temperature=0)[0][0]
    prompted = peft.apply(tiny_model(tok), "prompt_tuning", num_virtual_tokens=2)
    with pytest.raises(TinyLMError, match="not prompt or prefix tuning"):
        Server(prompted, tok)


def test_close_mid_decode_stops_the_engine_before_the_loop_closes(tok):
    """A server closed while a step is running: the engine stops while the event loop
    still runs, so the step's events (and the shutdown Failures) reach an open loop
    (no "Event loop is closed" error, the engine thread ends cleanly)."""
    model = tiny_model(tok, cls=Gated)
    s = running(model, tok)
    server = s.__enter__()
    try:
        model.delay = 0.3  # each forward: the close comes in the middle of one
        api = client(server)
        out = []
        th = threading.Thread(target=lambda: out.append(_stream_quietly(api)), daemon=True)
        th.start()
        wait_until(lambda: server.engine.metrics().get("tokens", 0) >= 1, what="decoding")
        engine_thread = server.engine._thread
    finally:
        s.__exit__(None, None, None)
        model.delay = 0
    assert not engine_thread.is_alive()
    assert server.engine.failed is None
    th.join(30)


def _stream_quietly(api):
    try:
        return list(api.completions.create(model=NAME, prompt="ROMEO:", max_tokens=100,
                                           stream=True))
    except Exception as e:  # noqa: BLE001 - the server closes under it
        return e


def test_a_sink_after_the_loop_closed_returns_quietly(tok):
    import asyncio

    from tinylm.serve import api as serve_api
    from tinylm.serve.app import Run

    loop = asyncio.new_event_loop()
    req = serve_api.Parsed("completion", [[1, 2]], 3, SamplingConfig())
    run = Run(req, loop, tok)
    loop.close()
    run.jobs[0].sink([])  # the engine's last events, after the loop closed


def test_http_close_ends_a_connection_whose_task_has_not_started():
    """A connection accepted just before close(), its task created but not yet run
    (close()'s cancels cannot see it): close() still ends it at once, not after the
    idle timeout (300 s here; and Python >= 3.12's wait_closed waits for it)."""
    import asyncio
    import inspect
    import socket

    from tinylm.serve.http import HTTPServer

    def closed_soon(sock) -> bool:
        sock.settimeout(3)
        try:
            return sock.recv(1) == b""
        except ConnectionError:
            return True
        except socket.timeout:
            return False

    def unstarted() -> bool:
        coros = [t.get_coro() for t in asyncio.all_tasks()]
        return any(c.__qualname__ == "HTTPServer._serve"
                   and inspect.getcoroutinestate(c) == inspect.CORO_CREATED for c in coros)

    async def main() -> bool:
        server = HTTPServer(lambda request, conn: conn.respond(200, b"{}"),
                            lambda *a: b"{}", idle=300)
        await server.start("127.0.0.1", 0)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            for _ in range(100):
                await asyncio.sleep(0)
                if unstarted():
                    break
            assert unstarted(), "the loop never showed a connection task not yet run"
            await server.close()
            return await asyncio.get_running_loop().run_in_executor(None, closed_soon, sock)

    assert asyncio.run(main()), "the connection stayed open after close()"


# --------------------------------------------------------------------------- the CLI


def _ignore_sigint():  # as a non-interactive shell starts a background job
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_cli_serves_a_saved_model_until_interrupted(tmp_path, signum):
    """SIGINT stops the server (exit 0) even when the child inherited SIGINT ignored;
    SIGTERM stops it the same way."""
    from generate_helpers import tiny_hf_gpt

    from serve_helpers import TEXT

    path, _, _ = tiny_hf_gpt(tmp_path / "m", TEXT[:5000])
    if signum == signal.SIGINT:
        bad = subprocess.run([sys.executable, "-c", "from tinylm.cli import main; main()",
                              "serve", "-m", str(path), "--context", "999"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.startswith("Error: ") \
            and len(bad.stderr.strip().splitlines()) == 1 and "max_positions" in bad.stderr
    env = dict(os.environ, TINYLM_API_KEY="k")
    proc = subprocess.Popen([sys.executable, "-c", "from tinylm.cli import main; main()",
                             "serve", "-m", str(path), "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_ignore_sigint)
    try:
        line = proc.stderr.readline()
        assert "tinylm serve: http://127.0.0.1:" in line, line
        url = line.split()[2]
        api = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=30)
        assert api.models.list().data[0].id == "m"
        r = api.completions.create(model="m", prompt="The ", max_tokens=4)
        assert r.usage.completion_tokens <= 4
        proc.send_signal(signum)
        assert proc.wait(30) == 0
        log = proc.stderr.read()
        assert "POST /v1/completions 200" in log and "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
