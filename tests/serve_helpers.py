"""What the `tinylm serve` tests share: a tiny model, a server that always closes, a
model whose forward can be held or made to fail, and raw HTTP over a socket."""

from __future__ import annotations

import contextlib
import pathlib
import socket
import threading
import time

import tinylm
from tinylm.models import Decoder, GPT2Config
from tinylm.serve import Server, ServerConfig
from tinylm.tokenizers.bpe import BPETokenizer

TEXT = (pathlib.Path(__file__).parent / "data" / "tinyshakespeare_head.txt").read_text()[:20000]
NAME = "tiny"


def tiny_tokenizer():
    return BPETokenizer.train([TEXT], 300, special_tokens=["<|endoftext|>"])


def tiny_model(tok, max_positions: int = 128, seed: int = 0, cls=None):
    """A random 2-layer GPT-2 over ``tok`` (eval mode)."""
    tinylm.seed(seed)
    config = GPT2Config(vocab_size=len(tok), d_model=32, n_layer=2, n_head=4,
                        max_positions=max_positions)
    return (cls or Decoder)(config).eval()


class Gated(Decoder):
    """A Decoder whose layers, at each forward, wait for ``gate`` (set: run), sleep
    ``delay`` seconds, and raise once when ``fail`` is set: to hold the engine still,
    slow it down, or make it fail. The hold is in its ``BlockStack``, not in an
    overridden ``forward``, so the engine runs it as the plain decoder it is (the
    last-position-only logits of ``tinylm.serve.forward``)."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.fail = False
        self.calls = 0
        run = self.transformer.forward

        def held(*args, **kwargs):
            self.gate.wait(10)
            self.calls += 1
            if self.delay:
                time.sleep(self.delay)
            if self.fail:
                self.fail = False
                raise RuntimeError("the model broke (on purpose)")
            return run(*args, **kwargs)

        self.transformer.forward = held


@contextlib.contextmanager
def running(model, tok, static=None, **config):
    """A started server on a free port, closed whatever happens."""
    server = Server(model, tok, ServerConfig(port=0, model_name=NAME, **config),
                    static=static).start()
    try:
        yield server
    finally:
        server.close()


def client(server, **kwargs):
    import openai

    kwargs.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=server.url + "/v1", max_retries=0, timeout=30, **kwargs)


def raw(port: int, data: bytes, read_all: bool = True, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection; what comes back until the server closes
    (``read_all``) or the first response's bytes arrive."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_all:
                break
        return b"".join(chunks)


def wait_until(condition, timeout: float = 10.0, what: str = "the condition"):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
