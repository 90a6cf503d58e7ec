"""A small, strict HTTP/1.1 server on asyncio streams: what ``tinylm serve`` speaks.

    server = HTTPServer(handler, error_body, max_body=1 << 20)
    await server.start("127.0.0.1", 8000)       # port 0: a free one (server.port)
    ...
    async def handler(request: Request, conn: Connection):
        await conn.respond(200, b'{"ok": true}')                  # or:
        stream = await conn.event_stream()                        # server-sent events
        await stream.send('{"delta": "hi"}'); await stream.end()  # ... data: [DONE]

What it accepts: a request line ``METHOD target HTTP/1.1`` (or 1.0), header lines
(the head at most ``max_head`` bytes, else 431), and a body of ``Content-Length``
bytes (more than ``max_body``: 413, refused before it is read; ``Transfer-Encoding``
on a request: 501, a client sends a length). ``Expect: 100-continue`` gets its
interim response. Connections stay open between requests (HTTP/1.1 keep-alive)
unless the client says ``Connection: close`` or speaks HTTP/1.0, or sends nothing for
``idle`` seconds (300; then it is closed quietly); anything malformed
gets its 4xx and the connection is closed, since the stream's framing is lost.

Responses carry ``Content-Length``; a stream of server-sent events (``data: ...`` +
blank line per event) goes out with ``Transfer-Encoding: chunked`` so the connection
can be kept after it. ``Connection.closed`` tells the handler that the client has
gone (it closed its side, or a write failed): the server then stops the work.

Error bodies come from ``error_body(status, message, code)``: the caller's format (the
OpenAI error object), so protocol errors look like every other error.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

log = logging.getLogger("tinylm.serve")

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ")  # RFC 9110 tchar: method and header names


@dataclass
class Request:
    """One parsed request: ``headers`` with lower-case names (repeated ones joined
    with ", "), ``path`` without its query string."""

    method: str
    path: str
    query: str = ""
    version: str = "HTTP/1.1"
    headers: dict = field(default_factory=dict)
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


class ProtocolError(Exception):
    """A request that cannot be read: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# --------------------------------------------------------------------------- reading


async def read_request(reader: asyncio.StreamReader, writer, max_head: int, max_body: int,
                       idle: float | None = None):
    """The next request on the connection, or None when the client closed it between
    requests or sent no whole head for ``idle`` seconds. Raises ``ProtocolError`` for
    anything malformed or too large."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle)
    except asyncio.TimeoutError:
        return None
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise ProtocolError(400, "the request ended inside its headers") from None
        return None
    except asyncio.LimitOverrunError:
        raise ProtocolError(431, f"the request line and headers pass {max_head} bytes",
                            "headers_too_large") from None
    if len(head) > max_head:
        raise ProtocolError(431, f"the request line and headers pass {max_head} bytes",
                            "headers_too_large")
    request = parse_head(head)
    request.body = await _read_body(reader, writer, request, max_body)
    return request


def parse_head(head: bytes) -> Request:
    """The request line and headers of ``head`` (which ends with a blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise ProtocolError(400, "the request head is not text") from None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN or not parts[1]:
        raise ProtocolError(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(505, f"{version[:20]!r} is not served; speak HTTP/1.1",
                            "http_version_not_supported")
    headers: dict = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN:
            raise ProtocolError(400, f"malformed header line {line[:80]!r}")
        name, value = name.lower(), value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path, _, query = target.partition("?")
    return Request(method, path, query, version, headers)


async def _read_body(reader, writer, request: Request, max_body: int) -> bytes:
    if "transfer-encoding" in request.headers:
        raise ProtocolError(501, "request bodies with Transfer-Encoding are not supported; "
                                 "send the body with a Content-Length", "not_implemented")
    length = request.headers.get("content-length")
    if length is None:
        return b""
    if not length.isdigit():
        raise ProtocolError(400, f"Content-Length must be one whole number, got {length[:40]!r}")
    n = int(length)
    if n > max_body:
        raise ProtocolError(413, f"the request body has {n} bytes; this server takes at most "
                                 f"{max_body} (--max-body)", "request_too_large")
    if n and request.headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ProtocolError(400, f"the body ended after fewer than its {n} bytes") from None


# --------------------------------------------------------------------------- writing


def response_head(status: int, headers) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", "Server: tinylm"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Connection:
    """One client connection as a handler sees it: answer the current request once,
    with ``respond`` or with an ``event_stream``."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.chunked = True  # HTTP/1.1: a stream goes in chunks (1.0: until the close)
        self.keep_alive = True
        self.answered = False
        self.status = 0  # the status sent (0: none yet)

    @property
    def closed(self) -> bool:
        """Whether the client has gone: it closed its side, or the socket failed."""
        return self.reader.at_eof() or self.writer.transport.is_closing()

    async def respond(self, status: int, body: bytes = b"",
                      content_type: str = "application/json", headers=()) -> None:
        """Send a whole response with its Content-Length."""
        self.answered, self.status = True, status
        head = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                ("Connection", "keep-alive" if self.keep_alive else "close"), *headers]
        self.writer.write(response_head(status, head) + body)
        await self.writer.drain()

    async def event_stream(self, headers=()) -> "EventStream":
        """Start a 200 response of server-sent events: chunked, or for an HTTP/1.0
        client written as they come and ended by closing the connection."""
        self.answered, self.status = True, 200
        if not self.chunked:
            self.keep_alive = False
        framing = [("Transfer-Encoding", "chunked")] if self.chunked else []
        head = [("Content-Type", "text/event-stream; charset=utf-8"),
                ("Cache-Control", "no-cache"), *framing,
                ("Connection", "keep-alive" if self.keep_alive else "close"), *headers]
        self.writer.write(response_head(200, head))
        await self.writer.drain()
        return EventStream(self)


class EventStream:
    """Server-sent events as HTTP chunks: ``send(data)`` writes ``data: <data>`` and a
    blank line; ``end()`` writes ``data: [DONE]`` (the OpenAI stream's end) and the
    last chunk."""

    def __init__(self, conn: Connection):
        self.conn = conn

    async def send(self, data: str) -> None:
        event = f"data: {data}\n\n".encode("utf-8")
        if self.conn.chunked:
            event = b"%x\r\n%s\r\n" % (len(event), event)
        self.conn.writer.write(event)
        await self.conn.writer.drain()

    async def end(self, done: bool = True) -> None:
        if done:
            await self.send("[DONE]")
        if self.conn.chunked:
            self.conn.writer.write(b"0\r\n\r\n")
        await self.conn.writer.drain()


# --------------------------------------------------------------------------- the server


async def _linger(reader, writer, seconds: float = 1.0, most: int = 1 << 24) -> None:
    """Close after an error without losing the answer: end our side, then read and
    drop what the client still sends (a refused body) for a while. Closing with unread
    bytes would send a reset, which can destroy the response before it is read."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        end, seen = loop.time() + seconds, 0
        while seen < most and loop.time() < end:
            chunk = await asyncio.wait_for(reader.read(65536), end - loop.time())
            if not chunk:
                return
            seen += len(chunk)
    except (asyncio.TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass


class HTTPServer:
    """Serves ``handler(request, conn)`` on every request of every connection.
    ``error_body(status, message, code) -> bytes`` (JSON) answers what cannot be
    parsed and what the handler raised."""

    def __init__(self, handler, error_body, max_body: int = 1 << 20, max_head: int = 32768,
                 idle: float = 300.0):
        self.handler, self.error_body = handler, error_body
        self.max_body, self.max_head, self.idle = max_body, max_head, idle
        self.server = None
        self.connections: set = set()
        self.closing = False

    async def start(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.closing = False
        self.server = await asyncio.start_server(self._serve, host, port,
                                                 limit=self.max_head)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and close every open connection (one accepted whose task has
        not run yet closes itself when it does); at most 5 s for the last ones."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        tasks = list(self.connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            try:  # Python >= 3.12 waits for every connection's transport
                await asyncio.wait_for(self.server.wait_closed(), 5)
            except asyncio.TimeoutError:
                log.warning("connections still open 5 s after closing; leaving them")

    async def _serve(self, reader, writer) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            if self.closing:  # accepted as the server closed: after close()'s cancels
                return
            await self._requests(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.connections.discard(task)
            writer.close()

    async def _requests(self, reader, writer) -> None:
        while True:
            conn = Connection(reader, writer)
            try:
                request = await read_request(reader, writer, self.max_head, self.max_body,
                                             self.idle)
            except ProtocolError as e:
                conn.keep_alive = False
                await conn.respond(e.status, self.error_body(e.status, e.message, e.code))
                await _linger(reader, writer)
                return
            if request is None:
                return
            conn.keep_alive = request.keep_alive
            conn.chunked = request.version == "HTTP/1.1"
            await self._answer(request, conn)
            if not conn.keep_alive or conn.closed:
                return

    async def _answer(self, request: Request, conn: Connection) -> None:
        try:
            await self.handler(request, conn)
        except ConnectionError:
            raise
        except Exception:  # a bug: answer 500 and log it, keep serving
            log.exception("error while answering %s %s", request.method, request.path)
            if conn.answered:
                conn.keep_alive = False
                return
            await conn.respond(500, self.error_body(500, "internal server error; see the "
                                                    "server's log", "internal_error"))
        if not conn.answered:
            await conn.respond(500, self.error_body(500, "the request got no answer",
                                                    "internal_error"))
