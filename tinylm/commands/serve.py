"""``tinylm serve``: an OpenAI-compatible HTTP server for a model, with a chat page.

    tinylm serve --model runs/demo                       # http://127.0.0.1:8000
    tinylm serve -m smollm2.gguf --chat-template chatml --max-batch 32 --port 9000
    TINYLM_API_KEY=secret tinylm serve -m hf/gpt2 --host 0.0.0.0

Any OpenAI client then talks to ``http://HOST:PORT/v1`` (``/v1/models``,
``/v1/completions``, ``/v1/chat/completions``); a browser opens the chat page at
``/``. Requests decode together (continuous batching, ``--max-batch`` sequences per
step); one line per request goes to stderr. Ctrl-C or SIGTERM stops the server
(gracefully: exit 0).
"""

from __future__ import annotations

import logging
import os

import click

from tinylm.commands.generate import ModelSource, model_options
from tinylm.commands.options import option_group


def _default_name(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    return os.path.splitext(name)[0] if name.endswith(".gguf") else name


def _server_config(model_name, **options):
    from tinylm.serve import ServerConfig

    return ServerConfig(model_name=model_name or "", **options)


server_options = option_group(
    "server", _server_config,
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="The address to listen on (0.0.0.0: every interface; then set "
                      "--api-key)."),
    click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
                 help="The port (0: a free one, printed at start)."),
    click.option("--api-key", default=None, envvar="TINYLM_API_KEY", metavar="KEY",
                 help="Require 'Authorization: Bearer KEY' on every endpoint but /health "
                      "and the chat page's files [env TINYLM_API_KEY]."),
    click.option("--model-name", default=None, metavar="NAME",
                 help="The model id clients send [default: the --model folder or file "
                      "name]."),
    click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
                 help="Sequences decoded together in one step (a request's n choices "
                      "count n)."),
    click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
                 help="Requests that may wait for a free slot; beyond them: 429."),
    click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                 help="The most new tokens one request may ask for [default: the context]."),
    click.option("--context", type=click.IntRange(min=2), default=None,
                 help="Prompt + completion tokens per request [default: the model's "
                      "max_positions]."),
    click.option("--max-body", type=click.IntRange(min=1024), default=1 << 20,
                 show_default=True, help="The largest request body in bytes; beyond it: 413."))


@click.command(name="serve")
@model_options
@server_options
@click.option("--chat-template", default=None, metavar="NAME|FILE",
              help="The chat template of /v1/chat/completions: plain, chatml or a JSON file "
                   "[default: the model's chat_template.json or GGUF template, else plain].")
def serve_command(model: ModelSource, server, chat_template):
    """Serve --model over the OpenAI API (and a chat page at /).

    Ctrl-C (SIGINT) or SIGTERM stops it gracefully: it stops listening, ends the open
    requests and exits 0 (SIGINT too when the shell started it with SIGINT ignored,
    as a non-interactive shell does a background job)."""
    import dataclasses

    from tinylm.prompts import ChatTemplate
    from tinylm.serve import Server
    from tinylm.train import auto_threads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    lm, tokenizer = model.load()
    template = ChatTemplate.resolve(chat_template, model.path,
                                    log=lambda m: click.echo(m, err=True))
    config = dataclasses.replace(server, model_name=server.model_name
                                 or _default_name(model.path))
    running = Server(lm, tokenizer, config, template=template, precision=model.precision(),
                     threads=auto_threads(lm, model.device))

    def ready(s):
        click.echo(f"tinylm serve: {s.url} (model {config.model_name!r}, chat page at "
                   f"{s.url}/, API at {s.url}/v1); Ctrl-C to stop", err=True)

    running.serve_forever(on_ready=ready)
