"""The server's parts put together and its life: start, serve, close.

    with Server(model, tokenizer, ServerConfig(port=0)).start() as server:  # a thread
        print(server.url)                     # http://127.0.0.1:PORT (a free port)
    Server(model, tokenizer, config).serve_forever()   # `tinylm serve`: to Ctrl-C, SIGTERM

Two threads: the event loop's (HTTP, validation, streaming: ``tinylm.serve.app``) and
the engine's (the model: ``tinylm.serve.engine``). ``start`` runs the loop in a
background thread (tests, notebooks); ``serve_forever`` runs it in the calling one.
Closing stops listening, closes the connections (their jobs are cancelled), then
stops the engine, before the loop closes (the engine's last events go to the loop).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from dataclasses import dataclass

from tinylm.errors import TinyLMError
from tinylm.serve import api
from tinylm.serve.app import App
from tinylm.serve.engine import Engine
from tinylm.serve.http import HTTPServer


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it allows (``tinylm serve``'s options).

    ``max_batch``: sequences decoded together (cache rows; a request's n choices take
    n); ``max_queue``: requests waiting for rows before a 429; ``max_tokens``: the most
    new tokens one request may ask (None: the context); ``context``: prompt +
    completion positions (None: the model's ``max_positions``); ``max_body``: request
    bytes (413 beyond)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str = "tinylm"
    max_batch: int = 16
    max_queue: int = 64
    max_tokens: int | None = None
    context: int | None = None
    max_body: int = 1 << 20

    def check(self, model) -> int:
        """The context length; a ``TinyLMError`` for a value out of range."""
        for name in ("max_batch", "max_queue", "max_body"):
            if getattr(self, name) < (0 if name == "max_queue" else 1):
                raise TinyLMError(f"{name} must be a positive number, got {getattr(self, name)}")
        limit = model.config.max_positions
        context = self.context or limit
        if not context:
            raise TinyLMError("the model sets no max_positions; give the context length "
                              "(--context N)")
        if limit and context > limit:
            raise TinyLMError(f"--context {context} is longer than the model's max_positions "
                              f"({limit}); give at most {limit}")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= context:
            # (it was clamped to the context, silently)
            raise TinyLMError(f"--max-tokens {self.max_tokens} does not fit the context of "
                              f"{context} positions (prompt included); give 1 to {context}, "
                              f"or leave it out to allow the whole context")
        return context


class Server:
    """The engine, the app and the HTTP server for ``model`` and its ``tokenizer``.
    ``template``: the chat template (default "plain"); ``precision``: a context the
    model runs in (``amp.autocast``); ``threads``: the engine's BLAS thread limit."""

    def __init__(self, model, tokenizer, config: ServerConfig = ServerConfig(), *,
                 template=None, precision=None, threads: int | None = None, static=None):
        from tinylm.generate import default_eos_ids
        from tinylm.prompts import ChatTemplate

        check_servable(model)
        self.config = config
        context = config.check(model)
        limits = api.Limits(context, min(config.max_tokens or context, context),
                            config.max_batch)
        self.served = api.ServedModel(config.model_name, tokenizer,
                                      template or ChatTemplate.builtin("plain"),
                                      default_eos_ids(model, tokenizer),
                                      model.config.vocab_size, limits)
        self.engine = Engine(model, tokenizer, config.max_batch, context,
                             precision=precision, threads=threads)
        self.app = App(self.engine, self.served, config.api_key, config.max_queue, static)
        self.http = HTTPServer(self.app.handle, api.error_json, max_body=config.max_body)
        self._thread = self._loop = self._stop = None

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    # ---- in a background thread

    def start(self) -> "Server":
        """Listen and serve from a background thread; returns once listening."""
        ready, failure = threading.Event(), []
        self.engine.start()
        self._thread = threading.Thread(target=self._loop_thread, args=(ready, failure),
                                        name="tinylm-serve-http", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self.engine.close()
            raise failure[0]
        return self

    def _loop_thread(self, ready, failure) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._stop = asyncio.Event()
            try:
                loop.run_until_complete(self._listen())
            except TinyLMError as e:
                failure.append(e)
                return
            finally:
                ready.set()
            loop.run_until_complete(self._stop.wait())
            loop.run_until_complete(self._shut())
        finally:
            loop.close()

    def close(self) -> None:
        """Stop listening, close the connections, stop the engine."""
        if self._thread is not None:
            if self._thread.is_alive() and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            self._thread = None
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- in this thread

    def serve_forever(self, on_ready=None) -> None:
        """Serve until Ctrl-C, SIGINT or SIGTERM, then stop gracefully (listening,
        connections, engine, in that order) and return; ``on_ready(server)`` once
        listening. In the main thread a SIGINT left ignored (a background job of a
        non-interactive shell inherits SIG_IGN) is restored first: a server stops on
        Ctrl-C."""
        async def main():
            stop = asyncio.Event()
            _stop_on_signals(asyncio.get_running_loop(), stop.set)
            await self._listen()
            if on_ready is not None:
                on_ready(self)
            try:
                await stop.wait()
            finally:
                await self._shut()

        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.engine.start()
        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            pass
        finally:
            self.engine.close()  # a no-op once _shut ran; not if listening failed

    async def _shut(self) -> None:
        """Close the HTTP side, then stop the engine while the loop still runs (its last
        events reach an open loop) without blocking the loop."""
        await self.http.close()
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)

    async def _listen(self) -> None:
        c = self.config
        try:
            await self.http.start(c.host, c.port)
        except OSError as e:
            raise TinyLMError(f"cannot listen on {c.host}:{c.port} ({e.strerror or e}); "
                              f"choose another --port or --host") from None


def _stop_on_signals(loop, stop) -> None:
    """SIGINT and SIGTERM call ``stop`` on ``loop`` (a graceful stop) where the loop can
    take signals: Unix, the main thread. Elsewhere Ctrl-C still raises
    KeyboardInterrupt (``asyncio.run`` cancels the main task: the same stop)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            return


def check_servable(model) -> None:
    """A ``TinyLMError`` unless ``model`` is a decoder without virtual-token adapters
    (prompt or prefix tuning change what the cache holds; the server's cache does not
    know them)."""
    from tinylm.models.base import BlockStack
    from tinylm.objectives import model_kind
    from tinylm.peft import adapter_sets

    kind = model_kind(model)
    if kind != "decoder":
        raise TinyLMError(f"tinylm serve serves decoder-only models (gpt2, llama); this one "
                          f"is {kind or 'of an unknown kind'}")
    if any(isinstance(host, BlockStack) for _, host, _ in adapter_sets(model)):
        raise TinyLMError("tinylm serve runs adapters that change weights (lora, dora, ia3, "
                          "bottleneck), not prompt or prefix tuning; use tinylm generate "
                          "--adapter for those")
