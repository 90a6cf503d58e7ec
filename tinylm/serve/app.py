"""The routes of ``tinylm serve``: the OpenAI endpoints, health, metrics, the chat page.

    GET  /health                 {"status": "ok"}; never needs the API key
    GET  /v1/models              the one model served (GET /v1/models/NAME: it alone)
    POST /v1/completions         text completion (stream: server-sent events)
    POST /v1/chat/completions    chat, the messages rendered by the model's template
    GET  /metrics                decode steps by batch size, tokens, requests (JSON)
    GET  /                       the chat page (tinylm/serve/static/index.html); the
                                 page's other files at /NAME and /static/NAME

With an API key, every route but /health and the page's files needs
``Authorization: Bearer KEY`` (a 401 otherwise): the page is static and public, like
llama.cpp's, and sends the key the user types with its API calls.

A request becomes one ``engine.Job`` per prompt (a completion may send several), with
a sink that hands each step's events to the event loop (``call_soon_threadsafe``) and
an asyncio queue the handler reads. A whole response waits for every choice to end;
a stream writes each delta as it comes. A client that goes away (its socket closes,
or a write fails) has its jobs cancelled: the engine frees their rows at its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections import Counter
from importlib import resources

from tinylm.serve import api
from tinylm.serve.engine import Busy, Delta, Failure, Job
from tinylm.serve.http import Connection, Request

log = logging.getLogger("tinylm.serve")

CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json",
                 ".txt": "text/plain; charset=utf-8"}
_SAFE_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
POLL_S = 0.25  # how often a handler waiting for tokens checks that its client is there


class Gone(Exception):
    """The client closed the connection: nobody to answer."""


def static_dir() -> str:
    """The folder the chat page's files are in (package data)."""
    return str(resources.files("tinylm.serve") / "static")


class App:
    """``handle(request, conn)`` for the HTTP server: routing, the API key, the
    endpoints. ``max_queue``: jobs that may wait for rows before a 429."""

    def __init__(self, engine, served: api.ServedModel, api_key: str | None = None,
                 max_queue: int = 64, static: str | None = None):
        self.engine, self.served = engine, served
        self.api_key, self.max_queue = api_key, max_queue
        self.static = static_dir() if static is None else static
        self.created = int(time.time())
        self.requests = Counter()  # "METHOD path status" -> count
        self.routes = {
            "/health": {"GET": self.health},
            "/v1/models": {"GET": self.models},
            "/v1/completions": {"POST": self.completions},
            "/v1/chat/completions": {"POST": self.chat},
            "/metrics": {"GET": self.metrics},
        }

    # ---- dispatch

    async def handle(self, request: Request, conn: Connection) -> None:
        started = time.perf_counter()
        try:
            await self._dispatch(request, conn)
        except api.APIError as e:
            headers = [("WWW-Authenticate", "Bearer")] if e.status == 401 else []
            if e.status == 405:
                headers = [("Allow", ", ".join(self.routes.get(request.path, {})))]
            await conn.respond(e.status, e.json(), headers=headers)
        except Gone:
            conn.keep_alive = False
            conn.answered = True
        status = conn.status
        known = request.path in self.routes or request.path.startswith("/v1/models/")
        self.requests[f"{request.method} {request.path if known else '(other)'} {status}"] += 1
        log.info("%s %s %s %.3fs", request.method, request.path, status or "-",
                 time.perf_counter() - started)

    async def _dispatch(self, request: Request, conn: Connection) -> None:
        path = request.path
        route = self.routes.get(path)
        if route is None and path.startswith("/v1/models/"):
            route = {"GET": self.model}
        if route is None:
            if request.method in ("GET", "HEAD") and self._static_file(path):
                return await self._send_static(request, conn, self._static_file(path))
            raise api.APIError(404, f"no route {path}; the API is under /v1 (GET /v1/models, "
                                    f"POST /v1/completions, POST /v1/chat/completions)",
                               code="unknown_url")
        handler = route.get(request.method)
        if handler is None:
            raise api.APIError(405, f"{path} takes {', '.join(route)}, not {request.method}",
                               code="method_not_allowed")
        if path != "/health":
            self._authorize(request)
        await handler(request, conn)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise api.APIError(401, "you didn't provide an API key: send it in an "
                                    "Authorization header (Authorization: Bearer KEY)",
                               code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                key.strip().encode("utf-8"), self.api_key.encode("utf-8")):
            raise api.APIError(401, "incorrect API key provided", code="invalid_api_key")

    # ---- small routes

    async def health(self, request, conn):
        alive = self.engine.alive
        body = {"status": "ok" if alive else "error", "model": self.served.name,
                "active_rows": len(self.engine.rows), "waiting": self.engine.waiting}
        if not alive:
            body["error"] = self.engine.failed or "the engine is not running"
        await conn.respond(200 if alive else 503, _json(body))

    def _model_object(self) -> dict:
        return {"id": self.served.name, "object": "model", "created": self.created,
                "owned_by": "tinylm", "max_model_len": self.served.limits.context}

    async def models(self, request, conn):
        await conn.respond(200, _json({"object": "list", "data": [self._model_object()]}))

    async def model(self, request, conn):
        name = request.path[len("/v1/models/"):]
        if name != self.served.name:
            raise api.APIError(404, f"the model {name!r} does not exist; this server serves "
                                    f"{self.served.name!r}", "model", "model_not_found")
        await conn.respond(200, _json(self._model_object()))

    async def metrics(self, request, conn):
        body = {"engine": self.engine.metrics(), "requests": dict(self.requests)}
        await conn.respond(200, _json(body))

    def _static_file(self, path: str):
        name = "index.html" if path in ("/", "/index.html") else path.rsplit("/", 1)[-1]
        if path not in ("/", f"/{name}", f"/static/{name}"):
            return None
        if not name or not set(name) <= _SAFE_NAME or name.startswith("."):
            return None
        full = os.path.join(self.static, name)
        return full if os.path.isfile(full) else None

    async def _send_static(self, request, conn, full: str):
        with open(full, "rb") as f:
            body = f.read()
        kind = CONTENT_TYPES.get(os.path.splitext(full)[1], "application/octet-stream")
        await conn.respond(200, b"" if request.method == "HEAD" else body, kind,
                           headers=[("Cache-Control", "no-cache")])

    # ---- generation

    async def completions(self, request, conn):
        await self._generate(conn, api.parse_completion(api.read_body(request.body),
                                                        self.served))

    async def chat(self, request, conn):
        await self._generate(conn, api.parse_chat(api.read_body(request.body), self.served))

    async def _generate(self, conn: Connection, req: api.Parsed) -> None:
        run = Run(req, asyncio.get_running_loop(), self.served.tokenizer)
        try:
            self.engine.submit(run.jobs, self.max_queue)
        except Busy as e:
            raise api.APIError(429, f"the server is busy: {e.args[0]} requests are waiting "
                                    f"(--max-queue {self.max_queue}); retry later",
                               code="queue_full") from None
        if not self.engine.alive:
            run.cancel()
            raise api.APIError(503, "the server is not decoding (shutting down, or its "
                                    "engine failed: see /health)", code="unavailable")
        try:
            if req.stream:
                await StreamWriter(run, self.served).write(conn)
            else:
                await run.collect(conn)
                await conn.respond(200, _json(run.whole_object(self.served)))
        finally:
            run.cancel()


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- one request


class Choice:
    """What one choice has produced so far."""

    def __init__(self):
        self.text, self.tokens, self.logprobs, self.top = [], [], [], []
        self.finish = None

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        self.tokens.append(d.token)
        if d.logprob is not None:
            self.logprobs.append(d.logprob)
            self.top.append(d.top)
        if d.finish:
            self.finish = d.finish


class Run:
    """A parsed request's jobs (one per prompt), the queue their events arrive on, and
    its choices (prompt p's choice j is choice p * n + j)."""

    def __init__(self, req: api.Parsed, loop, tokenizer):
        self.req, self.loop, self.tokenizer = req, loop, tokenizer
        self.queue: asyncio.Queue = asyncio.Queue()
        self.id, self.created = api.new_id(req.kind), int(time.time())
        self.jobs = [Job(prompt, req.max_tokens, req.sampling, req.n, req.stop, req.eos,
                         None if req.seed is None else req.seed, req.logprobs,
                         sink=self._sink(p))
                     for p, prompt in enumerate(req.prompts)]
        self.choices = [Choice() for _ in range(len(req.prompts) * req.n)]
        self.open = len(self.choices)

    def _sink(self, p: int):
        def sink(events):  # the engine thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (p, events))
            except RuntimeError:  # the loop has closed: no one is left to read them
                pass
        return sink

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True

    async def next(self, conn: Connection) -> list:
        """The next step's [(choice index, Delta)]; ``Gone`` if the client left, an
        ``APIError`` if the engine failed."""
        while True:
            if conn.closed:
                raise Gone()
            try:
                p, events = await asyncio.wait_for(self.queue.get(), POLL_S)
                break
            except asyncio.TimeoutError:
                continue
        out = []
        for e in events:
            if isinstance(e, Failure):
                raise api.APIError(e.status, e.message, code="engine_error")
            i = p * self.req.n + e.choice
            self.choices[i].add(e)
            if e.finish:
                self.open -= 1
            out.append((i, e))
        return out

    async def collect(self, conn: Connection) -> None:
        while self.open:
            await self.next(conn)

    def usage(self) -> dict:
        return api.usage(sum(len(p) for p in self.req.prompts),
                         sum(len(c.tokens) for c in self.choices))

    def whole_object(self, served: api.ServedModel) -> dict:
        """The non-streamed response."""
        chat = self.req.kind == "chat"
        choices = []
        for i, c in enumerate(self.choices):
            lp = self._logprobs(i, c.tokens, c.logprobs, c.top)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant",
                                                        "content": "".join(c.text)},
                                "logprobs": lp, "finish_reason": c.finish})
            else:
                choices.append({"index": i, "text": "".join(c.text), "logprobs": lp,
                                "finish_reason": c.finish})
        return {"id": self.id, "object": "chat.completion" if chat else "text_completion",
                "created": self.created, "model": served.name, "choices": choices,
                "usage": self.usage()}

    def _logprobs(self, i: int, tokens, logprobs, top, offset: int | None = None):
        if self.req.logprobs is None:
            return None
        if self.req.kind == "chat":
            return api.chat_logprobs(self.tokenizer, tokens, logprobs, top)
        if offset is None:
            text = self.req.prompt_text[i // self.req.n]
            offset = len(text) if text is not None else 0
        return api.completion_logprobs(self.tokenizer, tokens, logprobs, top, offset)


class StreamWriter:
    """A run as server-sent events: ``chat.completion.chunk`` objects with a ``delta``
    (the first one per choice gives the role), or ``text_completion`` chunks; each
    choice's last chunk has its ``finish_reason``; the usage chunk (no choices) when
    ``stream_options.include_usage``; then ``data: [DONE]``. A failure mid-stream is
    sent as an ``{"error": ...}`` event."""

    def __init__(self, run: Run, served: api.ServedModel):
        self.run, self.served = run, served
        self.chat = run.req.kind == "chat"
        self.offsets = [0] * len(run.choices)

    def chunk(self, choices, usage=None) -> str:
        obj = {"id": self.run.id, "object": "chat.completion.chunk" if self.chat
               else "text_completion", "created": self.run.created,
               "model": self.served.name, "choices": choices}
        if self.run.req.include_usage:
            obj["usage"] = usage
        return json.dumps(obj, ensure_ascii=False)

    async def write(self, conn: Connection) -> None:
        stream = await conn.event_stream()
        run = self.run
        try:
            if self.chat:
                for i in range(len(run.choices)):
                    await stream.send(self.chunk([{"index": i, "delta": {
                        "role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]))
            while run.open:
                for i, d in await run.next(conn):
                    for choice in self._choices(i, d):
                        await stream.send(self.chunk([choice]))
            if run.req.include_usage:
                await stream.send(self.chunk([], run.usage()))
            await stream.end()
        except api.APIError as e:
            await stream.send(json.dumps(e.body()))
            await stream.end(done=False)
        except ConnectionError:
            raise Gone() from None

    def _choices(self, i: int, d: Delta) -> list:
        """The chunk choices of one delta: its text (with its token's logprobs) when
        there is any, and the finish when it is the last."""
        lp = None
        if d.logprob is not None:
            lp = self.run._logprobs(i, [d.token], [d.logprob], [d.top],
                                    offset=self._offset(i))
            self.offsets[i] += len(api.token_text(self.run.tokenizer, d.token))
        out = []
        if self.chat:
            if d.text or lp is not None:
                out.append({"index": i, "delta": {"content": d.text}, "logprobs": lp,
                            "finish_reason": None})
            if d.finish:
                out.append({"index": i, "delta": {}, "logprobs": None,
                            "finish_reason": d.finish})
        elif d.text or lp is not None or d.finish:
            out.append({"index": i, "text": d.text, "logprobs": lp,
                        "finish_reason": d.finish})
        return out

    def _offset(self, i: int) -> int:
        text = self.run.req.prompt_text[i // self.run.req.n]
        return (len(text) if text is not None else 0) + self.offsets[i]
