"""The OpenAI API's shapes: request validation, response and chunk objects, errors.

    spec = ServedModel(name, tokenizer, template, eos, vocab_size, limits)
    req = parse_completion(body, spec)          # or parse_chat; APIError on a bad field
    req.prompts, req.max_tokens, req.sampling ...
    completion_object(req, choices, usage)      # the JSON the client reads

Requests are checked field by field, each against its JSON type and range: a bad one
is a 400 whose error object names the field (``param``), as OpenAI's does. Fields
tinylm has no use for but clients send anyway (``user``, ``metadata``, ``store``)
are ignored; a field it does not know, or one it cannot honour (``tools``,
``logit_bias``, ``echo``, ``suffix``, ``best_of``), is a 400 rather than a silent
difference. Beyond OpenAI's fields, ``top_k`` and ``min_p`` are taken (as vLLM and
llama.cpp's server take them).

Token counts: ``max_tokens`` (``max_completion_tokens`` in chat) defaults to 16 for
completions (OpenAI's default) and to the rest of the context for chat, at most the
server's cap; prompt + max_tokens must fit the context, else a 400 with code
``context_length_exceeded``. Text prompts may spell special tokens (a completion's
prompt is the model's input as is: ``<|endoftext|>`` is that token); chat message
contents may not (they would forge the template's markup): a 400.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the statuses in
``APIError``'s docstring.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field

from tinylm.errors import TinyLMError
from tinylm.sampling import SamplingConfig

IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                     "prompt_cache_key", "safety_identifier", "modalities"})
UNSUPPORTED = frozenset({"tools", "tool_choice", "functions", "function_call", "logit_bias",
                         "echo", "suffix", "best_of", "audio", "prediction",
                         "reasoning_effort", "web_search_options", "verbosity"})
COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
          "presence_penalty", "frequency_penalty", "logprobs", "stream", "stream_options",
          "top_k", "min_p")
COMPLETION_FIELDS = frozenset(COMMON + ("prompt",))
CHAT_FIELDS = frozenset(COMMON + ("messages", "max_completion_tokens", "top_logprobs",
                                  "response_format"))
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_N = 128  # OpenAI's limit on n
MAX_STOP = 4  # ... on stop strings
MAX_LOGPROBS = {"completion": 5, "chat": 20}  # ... on top alternatives
DEFAULT_COMPLETION_TOKENS = 16


class APIError(TinyLMError):
    """An error the client gets as ``{"error": {...}}`` with HTTP ``status``: 400 a bad
    field (``param`` names it), 401 a missing or wrong API key, 404 an unknown model
    or path, 405 a wrong method, 413 a body too large, 429 the queue is full, 503 the
    server cannot decode now (shutting down, the model failed)."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
             404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
             501: "invalid_request_error", 505: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def json(self) -> bytes:
        return json.dumps(self.body()).encode("utf-8")


def error_json(status: int, message: str, code: str | None = None) -> bytes:
    return APIError(status, message, code=code).json()


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Limits:
    """What one request may ask: ``context`` positions (prompt + completion),
    ``max_tokens`` new tokens at most, ``max_n`` choices (the batch's rows)."""

    context: int
    max_tokens: int
    max_n: int = 16


@dataclass(frozen=True)
class ServedModel:
    """What validation needs to know of the model: its ``name`` (the id clients
    send), ``tokenizer``, chat ``template``, ``eos`` ids, ``vocab_size``, ``limits``."""

    name: str
    tokenizer: object
    template: object
    eos: frozenset
    vocab_size: int
    limits: Limits


@dataclass
class Parsed:
    """A validated request: one or more ``prompts`` (ids) each continued ``n`` times."""

    kind: str  # "completion" or "chat"
    prompts: list
    max_tokens: int
    sampling: SamplingConfig
    n: int = 1
    stop: tuple = ()
    eos: frozenset = frozenset()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k
    stream: bool = False
    include_usage: bool = False
    prompt_text: list = field(default_factory=list)  # per prompt, for text_offset


# --------------------------------------------------------------------------- fields

_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float),
               "boolean": (bool,), "object": (dict,), "array": (list,)}
_A = {"string": "a string", "integer": "an integer", "number": "a number",
      "boolean": "a boolean", "object": "an object", "array": "an array"}


def _type_name(value) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
            dict: "an object", list: "an array", type(None): "null"}.get(type(value),
                                                                       type(value).__name__)


def read_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying why it is not one."""
    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {_type_name(body)}",
                       code="invalid_json")
    return body


def check_fields(body: dict, known: frozenset) -> None:
    for name in body:
        if name in UNSUPPORTED and body[name] not in (None, False, [], {}):
            raise bad(name, f"tinylm serve does not support {name!r}; leave it out",
                      "unsupported_parameter")
        if name not in known and name not in IGNORED and name not in UNSUPPORTED:
            raise bad(name, f"unrecognized request argument supplied: {name}",
                      "unknown_parameter")


def get(body: dict, name: str, kind: str, default=None, low=None, high=None, param=None):
    """``body[name]`` checked to be of JSON type ``kind`` (null: ``default``) and
    within [low, high]."""
    param = param or name
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, _JSON_TYPES[kind]) and (kind == "boolean" or not isinstance(value, bool))
    if not ok:
        raise bad(param, f"{param!r} must be {_A[kind]}, got "
                         f"{_type_name(value)}", "invalid_type")
    if kind == "number" and not math.isfinite(value):
        raise bad(param, f"{param!r} must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        span = (f"between {low} and {high}" if low is not None and high is not None
                else f">= {low}" if low is not None else f"<= {high}")
        raise bad(param, f"{param!r} must be {span}, got {value}")
    return value


def _sampling(body: dict) -> SamplingConfig:
    top_p = get(body, "top_p", "number", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p", "'top_p' must be > 0 (use temperature 0 for greedy decoding)")
    return SamplingConfig(
        temperature=float(get(body, "temperature", "number", 1.0, 0.0, 2.0)),
        top_p=None if top_p >= 1 else float(top_p),
        top_k=_top_k(body),
        min_p=None if body.get("min_p") is None else float(get(body, "min_p", "number",
                                                                None, 0.0, 1.0)),
        presence_penalty=float(get(body, "presence_penalty", "number", 0.0, -2.0, 2.0)),
        frequency_penalty=float(get(body, "frequency_penalty", "number", 0.0, -2.0, 2.0)))


def _top_k(body: dict):
    """vLLM's ``top_k``: -1 or 0 is off."""
    k = get(body, "top_k", "integer", None, -1)
    return None if k is None or k <= 0 else k


def _stop(body: dict) -> tuple:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"'stop' must be a string or an array of strings, got "
                          f"{_type_name(stop)}", "invalid_type")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}")
    if any(not s for s in stops):
        raise bad("stop", "a stop string must not be empty")
    return tuple(stops)


def _stream(body: dict) -> tuple:
    stream = get(body, "stream", "boolean", False)
    options = get(body, "stream_options", "object", None)
    if options is not None and not stream:
        raise bad("stream_options", "'stream_options' goes with 'stream': true")
    include = False
    if options:
        unknown = sorted(set(options) - {"include_usage", "include_obfuscation"})
        if unknown:
            raise bad("stream_options", f"unknown stream option {unknown[0]!r}")
        include = get(options, "include_usage", "boolean", False,
                      param="stream_options.include_usage")
    return stream, include


def _common(body: dict, served: ServedModel) -> dict:
    model = get(body, "model", "string")
    if model is None:
        raise bad("model", "you must provide a model parameter", "missing_required_parameter")
    if model != served.name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                            f"{served.name!r} (GET /v1/models)", "model", "model_not_found")
    stream, include = _stream(body)
    n = get(body, "n", "integer", 1, 1, MAX_N)
    if n > served.limits.max_n:
        raise bad("n", f"'n' is {n}, but this server decodes at most {served.limits.max_n} "
                       f"sequences at once (tinylm serve --max-batch); ask for fewer")
    return dict(sampling=_sampling(body), n=n, stop=_stop(body),
                seed=get(body, "seed", "integer", None, 0), stream=stream, include_usage=include)


def _max_tokens(body: dict, name: str, prompts: list, served: ServedModel, default) -> int:
    lim = served.limits
    longest = max(len(p) for p in prompts)
    room = lim.context - longest
    prompt_param = "messages" if name == "max_completion_tokens" else "prompt"
    if room < 1:
        raise bad(prompt_param, f"this model's maximum context length is {lim.context} "
                                f"tokens and the prompt has {longest}; shorten it",
                  "context_length_exceeded")
    value = get(body, name, "integer", None, 1, lim.max_tokens)
    if value is None:
        return min(default if default is not None else lim.max_tokens, room, lim.max_tokens)
    if value > room:
        raise bad(name, f"this model's maximum context length is {lim.context} tokens; the "
                        f"prompt has {longest} and {name} asks for {value}: lower {name} to "
                        f"{room} or shorten the prompt", "context_length_exceeded")
    return value


# --------------------------------------------------------------------------- completions


def parse_completion(body: dict, served: ServedModel) -> Parsed:
    """POST /v1/completions' body -> ``Parsed`` (or a 400 naming the field)."""
    check_fields(body, COMPLETION_FIELDS)
    common = _common(body, served)
    prompts, texts = _prompts(body.get("prompt"), served)
    logprobs = get(body, "logprobs", "integer", None, 0, MAX_LOGPROBS["completion"])
    max_tokens = _max_tokens(body, "max_tokens", prompts, served, DEFAULT_COMPLETION_TOKENS)
    return Parsed("completion", prompts, max_tokens, eos=served.eos, logprobs=logprobs,
                  prompt_text=texts, **common)


def _prompts(prompt, served: ServedModel):
    """(ids per prompt, text per prompt (None for ids)) of a completion's ``prompt``:
    a string, an array of strings, an array of token ids or an array of such arrays."""
    if prompt is None:
        raise bad("prompt", "you must provide a prompt", "missing_required_parameter")
    items = [prompt] if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)) else prompt
    if not isinstance(items, list) or not items:
        raise bad("prompt", "'prompt' must be a string, an array of strings or of token ids",
                  "invalid_type")
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            ids.append(_encode(served, item, "prompt", allowed="all") or _start(served))
            texts.append(item)
        elif isinstance(item, list) and item and all(_is_id(t) for t in item):
            bad_id = next((t for t in item if not 0 <= t < served.vocab_size), None)
            if bad_id is not None:
                raise bad("prompt", f"token id {bad_id} is outside the vocabulary "
                                    f"(0 .. {served.vocab_size - 1})")
            ids.append(list(item))
            texts.append(None)
        else:
            raise bad("prompt", "'prompt' must be a string, an array of strings, an array of "
                                "token ids or an array of such arrays", "invalid_type")
    return ids, texts


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _start(served: ServedModel) -> list:
    """The prompt of an empty string: the end-of-text token (a document's start)."""
    from tinylm.objectives import EOT

    eot = served.tokenizer.token_to_id(EOT)
    if eot is None:
        raise bad("prompt", "the prompt is empty and this tokenizer has no end-of-text token "
                            "to start from; give some text")
    return [eot]


def _encode(served: ServedModel, text: str, param: str, allowed) -> list:
    from tinylm.tokenizers import TokenizerError

    try:
        return served.tokenizer.encode(text, allowed_special=allowed)
    except TokenizerError as e:
        raise bad(param, f"{param} cannot be encoded: {e}") from None


# --------------------------------------------------------------------------- chat


def parse_chat(body: dict, served: ServedModel) -> Parsed:
    """POST /v1/chat/completions' body -> ``Parsed``: the messages rendered with the
    model's chat template and encoded (its markup's special tokens as such)."""
    check_fields(body, CHAT_FIELDS)
    common = _common(body, served)
    fmt = get(body, "response_format", "object", None)
    if fmt and fmt.get("type") != "text":
        raise bad("response_format", "tinylm serve writes text only: response_format "
                                     "{\"type\": \"text\"}", "unsupported_parameter")
    messages = _messages(body.get("messages"), served)
    template = served.template
    text = template.render(messages, add_generation_prompt=True)
    prompt = _encode(served, text, "messages", allowed=template.special_tokens(served.tokenizer))
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad("max_tokens", "give max_tokens or max_completion_tokens, not both")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _max_tokens(body, name, [prompt], served, None)
    common["stop"] = tuple(template.stop) + common["stop"]
    return Parsed("chat", [prompt], max_tokens, eos=served.eos | _markup_eos(served),
                  logprobs=_chat_logprobs(body), prompt_text=[None], **common)


def _messages(messages, served: ServedModel) -> list:
    if messages is None:
        raise bad("messages", "you must provide messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty array of {role, content}",
                  "invalid_type")
    specials = list(served.tokenizer.special_tokens)
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got "
                                       f"{role!r}")
        content = _content(m.get("content"), f"{where}.content")
        hit = next((s for s in specials if s in content), None)
        if hit is not None:
            raise bad(f"{where}.content", f"{where}.content holds the special token {hit!r}, "
                                          f"which would forge the chat markup; take it out")
        out.append({"role": ROLES[role], "content": content})
    return out


def _content(content, where: str) -> str:
    """A message's content: a string, or an array of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad(where, f"{where}: tinylm serve reads text parts "
                                 f"({{\"type\": \"text\", \"text\": ...}}) only",
                          "unsupported_parameter")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(where, f"{where} must be a string or an array of text parts, got "
                     f"{_type_name(content)}", "invalid_type")


def _chat_logprobs(body: dict):
    want = get(body, "logprobs", "boolean", False)
    top = get(body, "top_logprobs", "integer", None, 0, MAX_LOGPROBS["chat"])
    if top is not None and not want:
        raise bad("top_logprobs", "'top_logprobs' goes with 'logprobs': true")
    return (top or 0) if want else None


def _markup_eos(served: ServedModel) -> frozenset:
    """The template's stop strings that are special tokens (ChatML's ``<|im_end|>``):
    their ids end a reply, since decoded text leaves special tokens out."""
    tok = served.tokenizer
    return frozenset(tok.special_tokens[s] for s in served.template.stop
                     if s in tok.special_tokens)


# --------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer, tokens, logprobs, tops, offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object of a choice's tokens."""
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)
    top = None
    if tops is not None and any(tops):
        top = [{token_text(tokenizer, i): lp for i, lp in alts} for alts in tops]
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tokenizer, tokens, logprobs, tops) -> dict:
    """The chat ``logprobs`` object: one entry per token with its top alternatives."""
    def entry(t, lp):
        return {"token": token_text(tokenizer, t), "logprob": lp,
                "bytes": list(tokenizer.decode_bytes([t]))}

    content = [dict(entry(t, lp), top_logprobs=[entry(i, a) for i, a in (alts or [])])
               for t, lp, alts in zip(tokens, logprobs, tops or [None] * len(tokens))]
    return {"content": content, "refusal": None}
