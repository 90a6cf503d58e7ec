"""``tinylm serve``: an OpenAI-compatible HTTP server with continuous batching.

    from tinylm.serve import Server, ServerConfig
    with Server(model, tokenizer, ServerConfig(port=0, max_batch=16)).start() as s:
        ...  # point any OpenAI client at f"{s.url}/v1"

The files, top down: ``server`` (the parts put together, start / close), ``app``
(routes, the API key, requests to jobs and back), ``api`` (the OpenAI request
checks, response objects, errors), ``http`` (the asyncio HTTP/1.1 server),
``engine`` (the scheduler thread: continuous batching), ``cache`` (the per-row KV
cache the batch decodes with), ``text`` (a choice's text as its tokens come),
``static/`` (the chat page at ``/``).
"""

from tinylm.serve.server import Server, ServerConfig  # noqa: F401
