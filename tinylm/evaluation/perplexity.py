"""Perplexity two ways: lm-eval's rolling windows and Hugging Face's strided sliding window.

    docs = read_documents("wiki.test.jsonl")                   # or a .txt: one document
    rolling_perplexity(model, encoder, docs)                    # lm-eval's loglikelihood_rolling
    strided_perplexity(model, encoder, docs, max_length=1024, stride=512)   # HF's recipe

Rolling (lm-eval's ``loglikelihood_rolling``, context_len 1): each document is encoded
alone (with the BOS the tokenizer adds), its first token predicted from the prefix
token, and a document longer than the model cut into disjoint windows of
``max_length`` predicted tokens, each window conditioned on the token before it. The
metrics are lm-eval's, over the sum LL of every document's log-likelihood:

    word_perplexity  exp(-LL / words),  words = len(re.split(r"\\s+", doc)) summed
    byte_perplexity  exp(-LL / bytes),  bytes = len(doc.encode("utf-8")) summed
    bits_per_byte    -LL / bytes / ln 2
    token_perplexity exp(-LL / tokens)

Strided (the "Perplexity of fixed-length models" page of the transformers docs): the
documents joined by "\\n\\n" are one token sequence; windows of ``max_length`` tokens
start every ``stride`` tokens, and each scores only the tokens that the previous window
did not (the others are context). The recipe averages as its code does: each window's
mean loss is weighted by its number of scored labels minus one (the label shift), so
``perplexity = exp(sum_w mean_w * (n_w - 1) / sum_w (n_w - 1))`` -- for the first
window exactly its token count, for the later ones one less than they score.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass

from tinylm.errors import TinyLMError
from tinylm.evaluation.loglik import model_window, score_requests, token_logprobs


@dataclass
class PerplexityReport:
    """What ``rolling_perplexity`` and ``strided_perplexity`` return (``to_dict`` for JSON)."""

    method: str
    documents: int
    tokens: int
    words: int
    bytes: int
    loglikelihood: float
    token_perplexity: float
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    max_length: int
    stride: int | None = None
    perplexity: float | None = None  # the strided recipe's own number

    def to_dict(self) -> dict:
        return asdict(self)


def read_documents(path, text_key: str = "text") -> list:
    """The documents of ``path``: a .jsonl file's ``text_key`` field, one per line; a
    .json array of strings or of objects with ``text_key``; anything else is one
    document, the whole file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise TinyLMError(f"{path} is not UTF-8 text (byte {e.start}); give a text file, "
                          f"or .jsonl / .json documents, saved as UTF-8") from None
    except OSError as e:
        raise TinyLMError(f"cannot read {path}: {e.strerror or e}; check the path and its "
                          f"permissions") from None
    lower = path.lower()
    if lower.endswith(".jsonl"):
        records = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                records.append(_document(_json(line, f"{path}:{n}"), text_key, f"{path}:{n}"))
        docs = records
    elif lower.endswith(".json"):
        data = _json(text, path)
        if not isinstance(data, list):
            raise TinyLMError(f"{path}: a .json data file is an array of documents")
        docs = [_document(d, text_key, f"{path}[{i}]") for i, d in enumerate(data)]
    else:
        docs = [text]
    if not docs or not any(docs):
        raise TinyLMError(f"{path} holds no text to score")
    return docs


def _json(text, where):
    try:
        return json.loads(text)
    except ValueError as e:
        raise TinyLMError(f"{where}: not valid JSON ({e})") from None


def _document(record, key, where) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise TinyLMError(f"{where}: expected a string or an object with a {key!r} string "
                          f"(pass --text-key to name another field)")
    return record[key]


def count_words(doc: str) -> int:
    """lm-eval's word count (``PerplexityTask.count_words``)."""
    return len(re.split(r"\s+", doc))


def _metrics(ll: float, tokens: int, docs) -> dict:
    words = sum(count_words(d) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return dict(tokens=tokens, words=words, bytes=nbytes, loglikelihood=ll,
                token_perplexity=math.exp(-ll / max(tokens, 1)),
                word_perplexity=math.exp(-ll / max(words, 1)),
                byte_perplexity=math.exp(-ll / max(nbytes, 1)),
                bits_per_byte=-ll / max(nbytes, 1) / math.log(2))


def rolling_perplexity(model, encoder, docs, max_length: int | None = None,
                       batch_size: int = 4, progress: bool = False) -> PerplexityReport:
    """lm-eval's rolling log-likelihood of each document, and its metrics (see above)."""
    L = model_window(model, max_length)
    ids = [encoder.encode(d) for d in docs]
    per_token = token_logprobs(model, ids, encoder.prefix_token, batch_size=batch_size,
                               progress=progress, max_length=L)
    ll = float(sum(float(lp.sum()) for lp in per_token))
    tokens = sum(len(i) for i in ids)
    return PerplexityReport(method="rolling", documents=len(docs), max_length=L,
                            **_metrics(ll, tokens, docs))


def strided_windows(n: int, max_length: int, stride: int):
    """[(begin, end, scored)] of Hugging Face's recipe over n tokens: window
    ids[begin:end], whose last ``scored`` labels count (the first window's first
    token has no prediction, so it scores ``end - 1`` tokens)."""
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return windows


def strided_perplexity(model, encoder, docs, max_length: int | None = None,
                       stride: int | None = None, batch_size: int = 4,
                       progress: bool = False) -> PerplexityReport:
    """Hugging Face's strided sliding-window perplexity of the documents joined by a
    blank line (see the module docstring for its weighting); the other metrics are
    over the exact per-token sum of the scored tokens."""
    L = model_window(model, max_length)
    stride = L if stride is None else int(stride)
    if not 1 <= stride <= L:
        raise TinyLMError(f"--stride must be between 1 and --max-length ({L}), got {stride}")
    text = "\n\n".join(docs)
    ids = encoder.encode(text)
    if len(ids) < 2:
        raise TinyLMError("the text has fewer than 2 tokens: nothing to predict")
    # a last window of one token (stride = max_length) scores nothing: the recipe's
    # weight for it is 0
    windows = [w for w in strided_windows(len(ids), L, stride) if w[1] - w[0] > 1 or w[0] == 0]
    # the window's first token is never a label (with stride = max_length, every window's)
    requests = [(ids[begin:max(end - n, begin + 1)], ids[max(end - n, begin + 1):end])
                for begin, end, n in windows]
    scored = score_requests(model, requests, batch_size, progress, L)
    weights = [n - 1 for _, _, n in windows]  # the recipe's num_valid_tokens - batch_size
    nll_sum = sum(-float(lp.mean()) * w for (lp, _), w in zip(scored, weights))
    n_tokens = sum(weights)
    ll = float(sum(float(lp.sum()) for lp, _ in scored))
    tokens = sum(len(c) for _, c in requests)
    ppl = math.exp(nll_sum / n_tokens) if n_tokens > 0 else math.exp(-ll / tokens)
    return PerplexityReport(method="strided", documents=len(docs), max_length=L, stride=stride,
                            perplexity=ppl, **_metrics(ll, tokens, [text]))
