"""Text generation: KV-cache decoding, beam search, speculative decoding, streaming.

    ids = tokenizer.encode("ROMEO:")
    new = sample(model, ids, max_new_tokens=200, temperature=0.8, top_k=200, seed=1)
    print(tokenizer.decode(ids + new, skip_special_tokens=True))

    out = generate(model, ["ROMEO:", "JULIET:"], 50, tokenizer=tokenizer, seed=1,
                   sampling=SamplingConfig(top_p=0.9), stop=["\\n\\n"])
    out.tokens[0], out.logprobs[0]          # per prompt: new ids, their log-probs

A prompt is a list of token ids, or text when ``tokenizer=`` is given to encode it.
How the next token is picked is one ``SamplingConfig`` (``tinylm.sampling``), given as
``sampling=`` or as its fields' keywords (``temperature=0.8, top_k=200``). A row ends
at ``max_new_tokens``, at a stop string, or at an end-of-sequence id: by default the
model config's ``eos_token_id``, else the tokenizer's end-of-text token
(``default_eos_ids``); ``eos_id=`` chooses others and ``eos_id=()`` none.

A decoder runs the (left-padded) prompts once, filling a ``KVCache``, then feeds one
new token per row per step. Left padding keeps every row's last token in the last
column; the attention mask hides the padding and each row's positions count its own
tokens only (0, 1, ... from its first real token), so a padded row decodes exactly as
it would alone. When a row's context would pass the model's ``max_positions``, the
cache is dropped and the last ``max_positions`` tokens are run again (a sliding
window; a prompt/prefix-tuning adapter's virtual tokens take their share of it).
An encoder-decoder encodes the prompts once and decodes from its decoder-start
token with a cache. An encoder (BERT) does not generate text.

Also here: ``beam_search`` (transformers' algorithm, length penalty and early
stopping), ``speculative_sample`` / ``speculative_greedy`` (a draft model proposes,
the target verifies; the output is distributed as the target's own; either model
may carry a prompt/prefix-tuning adapter) and
``TextStream`` (bytes of tokens -> text that is safe to print: split UTF-8 characters
and possible stop strings wait).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from dataclasses import dataclass, field

import numpy as np

from tinylm import backend
from tinylm.autograd import no_grad
from tinylm.errors import ConfigError, TinyLMError
from tinylm.ops.nn import log_softmax_array, softmax_array
from tinylm.sampling import SamplingConfig, TokenHistory, pick, process_logits

# the texts of end-of-text tokens, looked up in the tokenizer when the config has no eos
END_OF_TEXT = ("<|endoftext|>", "</s>")

# --------------------------------------------------------------------------- inputs


def as_prompt_rows(prompts, tokenizer=None) -> list:
    """``prompts`` as a list of rows of int ids. A prompt is a sequence of token ids,
    or text (a str) that ``tokenizer`` encodes; ``prompts`` is one prompt or a list of
    them. Every row must have a token."""
    if not isinstance(prompts, (str, bytes, bytearray)) and not hasattr(prompts, "__len__"):
        raise TinyLMError(f"a prompt is text or a list of token ids, not "
                          f"{type(prompts).__name__}")
    one = _is_one_prompt(prompts)
    rows = [_prompt_ids(p, tokenizer) for p in ([prompts] if one else prompts)]
    if not rows or any(not r for r in rows):
        raise TinyLMError("give at least one prompt token to continue from, in every prompt")
    return rows


def _is_one_prompt(prompts) -> bool:
    if isinstance(prompts, (str, bytes, bytearray)):
        return True
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 1
    first = prompts[0] if len(prompts) else None
    return (first is not None and not isinstance(first, (str, bytes, bytearray))
            and np.ndim(first) == 0)


def _prompt_ids(prompt, tokenizer) -> list:
    if isinstance(prompt, (bytes, bytearray)):
        raise TinyLMError("a prompt is text (str) or token ids, not bytes; decode the bytes")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TinyLMError("the prompt is text: pass tokenizer= to encode it, or give "
                              "its token ids (tokenizer.encode(text))")
        return tokenizer.encode(prompt)
    if isinstance(prompt, np.ndarray) and prompt.dtype.kind in "iu":
        return prompt.reshape(-1).tolist()
    try:
        return [operator.index(i) for i in prompt]
    except TypeError:
        bad = next((i for i in prompt if not hasattr(i, "__index__")), prompt)
        raise TinyLMError(f"a prompt is text or a list of integer token ids; it holds "
                          f"{bad!r}") from None


def _id_set(ids) -> frozenset:
    try:
        return frozenset([operator.index(ids)] if np.ndim(ids) == 0
                         else [operator.index(i) for i in ids])
    except TypeError:
        raise TinyLMError(f"eos_id takes a token id or a collection of them, not "
                          f"{ids!r}") from None


def default_eos_ids(model, tokenizer=None) -> frozenset:
    """The ids that end a generation unless told otherwise: the model config's
    ``eos_token_id`` (an id or a list, as Llama 3's), else the tokenizer's end-of-text
    token (``<|endoftext|>`` or ``</s>``), else none."""
    eos = getattr(model.config, "eos_token_id", None)
    if eos is not None:
        return _id_set(eos)
    for text in END_OF_TEXT if tokenizer is not None else ():
        i = tokenizer.token_to_id(text)
        if i is not None:
            return frozenset([i])
    return frozenset()


def resolve_eos(model, eos_id=None, tokenizer=None) -> frozenset:
    """``eos_id`` as a set (``()``: none), or the model's default when it is None."""
    return default_eos_ids(model, tokenizer) if eos_id is None else _id_set(eos_id)


def stop_strings(stop) -> list:
    """``stop`` (a string or a collection of them) as a list; an empty or non-string
    stop is an error (an empty one would end every row at once)."""
    stop = [stop] if isinstance(stop, str) else list(stop or ())
    for s in stop:
        if not isinstance(s, str) or not s:
            raise TinyLMError(f"a stop string must be non-empty text, got {s!r}")
    return stop


def _check_count(name: str, value, least: int = 0) -> None:
    if isinstance(value, bool) or not hasattr(value, "__index__") or value < least:
        raise TinyLMError(f"{name} must be an integer >= {least}, got {value!r}")


def _generating_kind(model) -> str:
    from tinylm.objectives import model_kind

    kind = model_kind(model)
    if kind not in ("decoder", "encoder-decoder"):
        raise TinyLMError(f"{type(model).__name__} is an {kind or 'unknown kind of'} model and "
                          f"does not generate text; sample from a decoder (gpt2, llama) or "
                          f"an encoder-decoder (t5)")
    return kind


@contextlib.contextmanager
def inference(*models):
    """Eval mode and no autograd inside the block; each model's mode is restored after."""
    states = [(m, m.training) for m in models]
    for m, _ in states:
        m.eval()
    try:
        with no_grad():
            yield
    finally:
        for m, was in states:
            m.train(was)


# --------------------------------------------------------------------------- steppers


def left_pad(rows, pad_id: int = 0):
    """Lists of ids -> (ids (B, T), mask (B, T), positions (B, T)), left-padded: each
    row's positions are 0.. from its first real token (padding gets 0)."""
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):] = r
            mask[i, T - len(r):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (B, T)
    return ids, mask, positions


def token_window(model) -> int:
    """How many tokens of context a decoder takes: its ``max_positions`` less the
    positions its prompt/prefix-tuning adapter puts in front (0: no limit)."""
    limit = model.config.max_positions
    if not limit:
        return 0
    virtual = virtual_positions(model)
    if virtual >= limit:
        raise TinyLMError(f"the adapter's {virtual} virtual tokens fill max_positions={limit}; "
                          f"use fewer num_virtual_tokens")
    return limit - virtual


def _last_logits(out) -> np.ndarray:
    return backend.to_numpy(out.logits.data[:, -1]).astype(np.float64)  # (B, V)


class _DecoderStepper:
    """Runs a decoder-only model over growing rows with a KV cache."""

    def __init__(self, model, rows):
        self.model = model
        self.limit = token_window(model)
        self.rows = [list(r) for r in rows]  # the whole context of each row
        self.cache = self.mask = self.next_pos = None

    def prefill(self):
        from tinylm.nn import KVCache

        rows = [r[-self.limit:] if self.limit else r for r in self.rows]
        ids, mask, positions = left_pad(rows)
        self.cache, self.mask = KVCache(), mask
        self.padded = not mask.all()  # no padding: default positions, no mask (faster)
        self.lengths = np.array([len(r) for r in rows])
        self.next_pos = positions[:, -1] + 1  # (B,)
        from tinylm.models.logits_at import logits_at  # the last column only: left-padded

        logits = logits_at(self.model, ids, np.full(len(rows), ids.shape[1] - 1),
                           attention_mask=mask if self.padded else None, cache=self.cache,
                           positions=positions if self.padded else None)
        return backend.to_numpy(logits).astype(np.float64)  # (B, V)

    def step(self, tokens):
        for row, token in zip(self.rows, tokens):
            row.append(int(token))
        if self.limit and int(self.lengths.max()) + 1 > self.limit:
            return self.prefill()  # window slides: recompute the last `limit` tokens
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        pos = self.next_pos[:, None] if self.padded else None  # (B, 1)
        out = self.model(np.asarray(tokens)[:, None],
                         attention_mask=self.mask if self.padded else None,
                         cache=self.cache, positions=pos)
        self.next_pos = self.next_pos + 1
        self.lengths = self.lengths + 1
        return _last_logits(out)

    def reorder(self, index):
        """Keep rows ``index`` (beam search's surviving beams)."""
        self.cache.reorder(index)
        self.rows = [list(self.rows[i]) for i in index]
        self.mask, self.next_pos, self.lengths = (
            self.mask[index], self.next_pos[index], self.lengths[index])


class _EncoderDecoderStepper:
    """Encodes the prompts once, then decodes from the decoder-start token with a cache."""

    def __init__(self, model, rows):
        from tinylm.nn import KVCache

        self.model = model
        limit = model.config.max_positions
        ids, self.enc_mask, _ = left_pad([r[-limit:] if limit else r for r in rows])
        self.memory, _ = model.encode(ids, self.enc_mask)  # (B, S, d)
        self.cache, self.batch = KVCache(), len(rows)

    def prefill(self):
        start = self.model.config.decoder_start_token_id
        return self._run(np.full((self.batch, 1), start, dtype=np.int64))

    def step(self, tokens):
        return self._run(np.asarray(tokens)[:, None])

    def reorder(self, index):
        self.cache.reorder(index)
        self.memory = self.memory[index]
        self.enc_mask = self.enc_mask[index]

    def _run(self, ids):
        out = self.model(decoder_ids=ids, memory=self.memory, attention_mask=self.enc_mask,
                         cache=self.cache)
        return _last_logits(out)


def _stepper(model, kind: str, rows):
    return (_DecoderStepper if kind == "decoder" else _EncoderDecoderStepper)(model, rows)


# --------------------------------------------------------------------------- sampling


@dataclass
class Generation:
    """What ``generate`` returns, one entry per prompt: the new token ids, their
    log-probabilities under the model (before any sampling transform), and why the row
    stopped ("eos", "stop", "length")."""

    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reasons: list = field(default_factory=list)


@dataclass(frozen=True)
class Ending:
    """What ends a row before ``max_new_tokens``: one of the ``eos`` ids (the token is
    kept), or one of the ``stop`` strings in the text of its new tokens (decoded with
    ``tokenizer``; the token that completed it is kept: cut the text at the string)."""

    eos: frozenset = frozenset()
    stop: tuple = ()
    tokenizer: object = None

    def reason(self, tokens: list) -> str | None:
        """"eos", "stop" or None for a row whose new tokens are ``tokens``."""
        if tokens[-1] in self.eos:
            return "eos"
        if self.stop and _hits_stop(self.tokenizer, tokens, self.stop):
            return "stop"
        return None


def _ending(model, eos_id, stop, tokenizer) -> Ending:
    stop = stop_strings(stop)
    if stop and tokenizer is None:
        raise TinyLMError("stop strings need the tokenizer= to decode with")
    return Ending(resolve_eos(model, eos_id, tokenizer), tuple(stop), tokenizer)


def _prompt_history(cfg, model, kind: str, rows) -> TokenHistory:
    """The penalties' history, primed as transformers does: with the decoder's input
    ids (the prompt for a decoder, the decoder-start token for an encoder-decoder)."""
    history = TokenHistory(cfg, len(rows), model.config.vocab_size)
    for i, r in enumerate(rows):
        history.see(i, r if kind == "decoder" else [model.config.decoder_start_token_id])
    return history


def generate(model, prompts, max_new_tokens: int = 200, *,
             sampling: SamplingConfig | None = None, eos_id=None, stop=(), tokenizer=None,
             seed=None, on_token=None, **sampling_options) -> Generation:
    """Continue each prompt (a list of ids or, with ``tokenizer``, text; or a list of
    such prompts) by up to ``max_new_tokens`` tokens, picked as ``sampling`` (a
    ``SamplingConfig``) or the ``sampling_options`` keywords say.

    A row stops at an ``eos_id`` (an int or a set of ints; None: ``default_eos_ids``,
    the model config's; ``()``: none; the eos token is kept) or when its decoded new
    text contains one of the ``stop`` strings (needs ``tokenizer``). ``seed``: an int,
    None, or a ``numpy.random.Generator`` to draw from. ``on_token(row, token_id,
    logprob)`` is called as each token is chosen (streaming)."""
    kind = _generating_kind(model)
    cfg = SamplingConfig.build(sampling, **sampling_options)
    _check_count("max_new_tokens", max_new_tokens)
    rows = as_prompt_rows(prompts, tokenizer)
    ending = _ending(model, eos_id, stop, tokenizer)
    rng = np.random.default_rng(seed)
    result = Generation([[] for _ in rows], [[] for _ in rows], ["length"] * len(rows))
    history = _prompt_history(cfg, model, kind, rows)
    done = np.zeros(len(rows), dtype=bool)
    V = model.config.vocab_size
    with inference(model):
        stepper = _stepper(model, kind, rows)
        logits = stepper.prefill() if max_new_tokens > 0 else None
        for t in range(max_new_tokens):
            logits = logits[:, :V]
            tokens = pick(history.process(logits, cfg), cfg.temperature, rng)
            logp = log_softmax_array(logits)[np.arange(len(rows)), tokens]  # (B,)
            _record(result, done, tokens, logp, ending, on_token)
            history.add(tokens)
            if done.all() or t == max_new_tokens - 1:
                break
            logits = stepper.step(tokens)
    return result


def _record(result: Generation, done, tokens, logp, ending: Ending, on_token) -> None:
    """Append each running row's new token; mark the rows that end with it."""
    for i in np.flatnonzero(~done):
        tok, lp = int(tokens[i]), float(logp[i])
        result.tokens[i].append(tok)
        result.logprobs[i].append(lp)
        if on_token is not None:
            on_token(int(i), tok, lp)
        reason = ending.reason(result.tokens[i])
        if reason:
            done[i], result.finish_reasons[i] = True, reason


def _hits_stop(tokenizer, tokens, stop) -> bool:
    """Whether the text of ``tokens`` contains a stop string. Only the tail that the
    last token could have completed is decoded: a string of n bytes spans at most n
    tokens (each token is at least one byte)."""
    n = max(len(s.encode("utf-8")) for s in stop)
    tail = tokenizer.decode_bytes(tokens[-n:]).decode("utf-8", errors="replace")
    return any(s in tail for s in stop)


def cut_at_stop(text: str, stop) -> str:
    """``text`` up to (not including) the first stop string in it."""
    stop = [stop] if isinstance(stop, str) else list(stop or ())
    hits = [text.find(s) for s in stop if s and s in text]
    return text[:min(hits)] if hits else text


def sample(model, ids, max_new_tokens: int = 200, *, seed=None,
           rng: np.random.Generator | None = None, **options) -> list:
    """The ids of up to ``max_new_tokens`` tokens sampled after ``ids`` (one prompt:
    ids, or text with ``tokenizer=``); it stops at the model's eos as ``generate``
    does. ``options``: any other keyword of ``generate`` (``sampling=``,
    ``temperature=``, ``top_k=``, ``eos_id=``, ``stop=``, ``tokenizer=`` ...);
    ``rng``: a Generator to draw from (the same as passing it as ``seed``)."""
    if rng is not None and seed is not None:
        raise TinyLMError("give seed= or rng=, not both")
    rows = as_prompt_rows(ids, options.get("tokenizer"))
    if len(rows) != 1:
        raise TinyLMError(f"sample continues one prompt, got {len(rows)}; use generate")
    return generate(model, rows, max_new_tokens, seed=rng if rng is not None else seed,
                    **options).tokens[0]


# --------------------------------------------------------------------------- streaming


class TextStream:
    """Turns the bytes of tokens, as they come, into text that is safe to print now.

        stream = TextStream(stop=["\\n\\n"])
        for token in tokens:
            print(stream.feed(tokenizer.decode_bytes([token])), end="")
        print(stream.finish(), end="")

    Bytes that end in the middle of a UTF-8 character wait for the rest of it; text
    that could be the start of a stop string waits until it is clearly not one; a stop
    string ends the stream (it and what follows are never printed)."""

    def __init__(self, stop=()):
        import codecs

        self.stop = [s for s in ([stop] if isinstance(stop, str) else list(stop or ())) if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(data)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.stopped, self._pending = True, ""
            return text[:min(hits)]
        hold = max((k for s in self.stop for k in range(1, len(s))
                    if text.endswith(s[:k])), default=0)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def finish(self) -> str:
        """What is still held back (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text


# --------------------------------------------------------------------------- beam search

_NEG = -1.0e9  # transformers' "impossible" score


@dataclass
class BeamResult:
    """Per prompt: the best finished sequence's new tokens and its length-penalised
    score (sum of log-probs / generated_length ** length_penalty)."""

    tokens: list = field(default_factory=list)
    scores: list = field(default_factory=list)


def check_beam_options(num_beams, length_penalty, early_stopping) -> None:
    """``ConfigError`` for beam-search options out of range (NaN included)."""
    p = []
    if isinstance(num_beams, bool) or not hasattr(num_beams, "__index__") or num_beams < 1:
        p.append(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not math.isfinite(length_penalty):
        p.append(f"length_penalty must be a finite number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        p.append(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if p:
        raise ConfigError("invalid beam search: " + "; ".join(p))


class _Beams:
    """A beam search's state over B prompts with K beams each: the running beams and
    their summed log-probs, and the best K finished hypotheses per prompt."""

    def __init__(self, B, K, V, max_new_tokens, eos, length_penalty, early_stopping):
        self.B, self.K, self.V, self.n = B, K, V, max_new_tokens
        self.eos, self.length_penalty, self.early_stopping = eos, length_penalty, early_stopping
        L = max(max_new_tokens, 1)
        self.M = max(2, 1 + len(eos)) * K  # candidates looked at per prompt and step
        self.run_seq = np.zeros((B, K, L), np.int64)
        self.run_score = np.full((B, K), _NEG)
        self.run_score[:, 0] = 0.0  # one live beam at first, so the K beams differ
        self.fin_seq = np.zeros((B, K, L), np.int64)
        self.fin_score = np.full((B, K), _NEG)
        self.fin_len = np.zeros((B, K), np.int64)
        self.fin_done = np.zeros((B, K), bool)
        self.open = np.ones((B, 1), bool)  # an open beam could still beat the finished
        self.b_idx = np.arange(B)[:, None]

    def step(self, logits, cur: int):
        """Advance by the (B*K, V) ``logits`` at step ``cur``; returns the rows the
        surviving beams come from (to reorder the cache), or None when it is over."""
        B, K, V = self.B, self.K, self.V
        logp = log_softmax_array(logits).reshape(B, K, V) + self.run_score[:, :, None]
        flat = logp.reshape(B, K * V)
        idx = np.argsort(-flat, axis=-1, kind="stable")[:, :self.M]  # (B, M)
        cand_lp = np.take_along_axis(flat, idx, axis=-1)  # (B, M) descending
        beam, tok = idx // V, idx % V  # (B, M)
        cand_seq = self.run_seq[self.b_idx, beam]  # (B, M, L)
        cand_seq[:, :, cur] = tok
        hits = np.isin(tok, self.eos) | (cur + 1 >= self.n)  # (B, M)
        # the best K unfinished continuations keep running
        keep_lp = cand_lp + hits * _NEG
        sel = np.argsort(-keep_lp, axis=-1, kind="stable")[:, :K]  # (B, K)
        self.run_seq = cand_seq[self.b_idx, sel]
        self.run_score = np.take_along_axis(keep_lp, sel, axis=-1)
        origin = (np.take_along_axis(beam, sel, axis=-1) + self.b_idx * K).reshape(-1)
        self._finish(cand_seq, cand_lp, hits & (np.arange(self.M) < K)[None, :], cur)
        self._close(cur)
        all_full = self.fin_done.all() and self.early_stopping is True
        return None if not self.open.any() or all_full or hits.all() else origin

    def _finish(self, cand_seq, cand_lp, just, cur: int) -> None:
        """The candidates that ended (``just``, among the first K) join the hypotheses."""
        B, M = self.B, self.M
        score = cand_lp / float(cur + 1) ** self.length_penalty
        full = self.fin_done.all(axis=1, keepdims=True) & (self.early_stopping is True)
        score = score + full * _NEG + (~self.open) * _NEG + (~just) * _NEG
        m_seq = np.concatenate([self.fin_seq, cand_seq], axis=1)
        m_score = np.concatenate([self.fin_score, score], axis=1)
        m_len = np.concatenate([self.fin_len, np.full((B, M), cur + 1)], axis=1)
        m_done = np.concatenate([self.fin_done, just], axis=1)
        best = np.argsort(-m_score, axis=-1, kind="stable")[:, :self.K]
        self.fin_seq = m_seq[self.b_idx, best]
        self.fin_score = np.take_along_axis(m_score, best, -1)
        self.fin_len = np.take_along_axis(m_len, best, -1)
        self.fin_done = np.take_along_axis(m_done, best, -1)

    def _close(self, cur: int) -> None:
        """A prompt closes when its best running beam cannot beat its worst finished
        one (at the current length; "never": at the longest, when the penalty > 0)."""
        n_gen = cur + 1
        if self.early_stopping == "never" and self.length_penalty > 0:
            n_gen = self.n
        best_running = self.run_score[:, :1] / float(n_gen) ** self.length_penalty
        worst_fin = np.where(self.fin_done, self.fin_score.min(axis=1, keepdims=True), _NEG)
        self.open &= (best_running > worst_fin).any(axis=1, keepdims=True)

    def last_tokens(self, cur: int) -> np.ndarray:
        return self.run_seq[:, :, cur].reshape(-1)  # (B*K,)

    def result(self) -> BeamResult:
        tokens = [self.fin_seq[b, 0, :self.fin_len[b, 0]].tolist() for b in range(self.B)]
        return BeamResult(tokens, [float(s) for s in self.fin_score[:, 0]])


def beam_search(model, prompts, max_new_tokens: int = 20, *, num_beams: int = 4,
                length_penalty: float = 1.0, early_stopping=False, eos_id=None,
                tokenizer=None) -> BeamResult:
    """Deterministic beam search, step for step the algorithm of transformers'
    ``generate(num_beams=..., do_sample=False)``; prompts as ``generate`` takes them,
    and ``eos_id`` too (None: the model's default; ``()``: none).

    Every step, each prompt's ``num_beams`` running beams offer their ``2 num_beams``
    best continuations (log-probs summed along the beam). A continuation that ends in
    an eos id or reaches ``max_new_tokens`` is a finished hypothesis, scored
    sum / length ** length_penalty, if it ranks among the first ``num_beams``; the best
    ``num_beams`` unfinished ones keep running (the KV cache is reordered to follow
    them). The search stops at ``max_new_tokens``, or when no running beam can beat
    the finished ones: ``early_stopping=True`` as soon as ``num_beams`` hypotheses are
    finished; False: when the best running score, penalised at its current length, is
    below the worst finished one; "never": the same, at the longest length when
    ``length_penalty > 0``."""
    kind = _generating_kind(model)
    check_beam_options(num_beams, length_penalty, early_stopping)
    _check_count("max_new_tokens", max_new_tokens)
    rows = as_prompt_rows(prompts, tokenizer)
    limit = model.config.max_positions
    window = token_window(model) if kind == "decoder" else 0
    if window and max(map(len, rows)) + max_new_tokens > window:
        extra = f" less its {limit - window} virtual tokens" if window < limit else ""
        raise TinyLMError(f"beam search keeps the whole context: prompt + max_new_tokens must "
                          f"fit the model's max_positions={limit}{extra}")
    if max_new_tokens == 0:
        return BeamResult([[] for _ in rows], [0.0] * len(rows))
    eos = np.array(sorted(resolve_eos(model, eos_id, tokenizer)), dtype=np.int64)
    V = model.config.vocab_size
    beams = _Beams(len(rows), num_beams, V, max_new_tokens, eos, length_penalty,
                   early_stopping)
    with inference(model):
        stepper = _stepper(model, kind, [r for r in rows for _ in range(num_beams)])
        logits = stepper.prefill()
        for cur in range(max_new_tokens):
            origin = beams.step(logits[:, :V], cur)
            if origin is None:
                break
            stepper.reorder(origin)
            logits = stepper.step(beams.last_tokens(cur))
    return beams.result()


# --------------------------------------------------------------------------- speculative


@dataclass
class SpeculativeResult:
    """The new tokens, and how many draft tokens the target accepted of those proposed."""

    tokens: list = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0


def speculative_greedy(target, draft, prompt, max_new_tokens: int = 200, *, k: int = 4,
                       eos_id=None, tokenizer=None) -> SpeculativeResult:
    """Greedy decoding of ``target`` sped up by a small ``draft`` model (same vocabulary):
    the draft proposes ``k`` tokens one at a time, the target scores all of them in one
    forward, and the longest prefix on which the draft agrees with the target's argmax
    is kept, plus the target's own next token. The output is the target's greedy output.
    ``speculative_sample`` is the sampling form."""
    return speculative_sample(target, draft, prompt, max_new_tokens, k=k, eos_id=eos_id,
                              tokenizer=tokenizer, sampling=SamplingConfig(temperature=0.0))


def speculative_accept(p, q, proposal, rng) -> tuple:
    """The acceptance rule of speculative sampling (Leviathan et al. 2023; Chen et al.
    2023), which makes the output distributed exactly as the target's.

    ``p``: (n+1, V) target probabilities at each proposed position and one past them;
    ``q``: (n, V) the draft's probabilities the proposal was sampled from. Draft token
    x_j is kept with probability min(1, p_j[x_j] / q_j[x_j]); at the first rejection the
    token is drawn from the residual max(0, p_j - q_j) (normalised) and the rest is
    dropped; when all are kept, one more token is drawn from p_n. Returns (tokens,
    number of draft tokens accepted).

    >>> p = np.array([[0.0, 1.0], [0.5, 0.5]]); q = np.array([[1.0, 0.0]])
    >>> speculative_accept(p, q, [0], np.random.default_rng(0))  # p never picks 0
    ([1], 0)
    """
    for j, x in enumerate(proposal):
        if rng.random() * q[j, x] < p[j, x]:  # u < p/q without dividing by q = 0
            continue
        residual = np.maximum(p[j] - q[j], 0.0)
        total = residual.sum()
        residual = p[j] if total <= 0 else residual / total
        return list(proposal[:j]) + [int(rng.choice(len(residual), p=residual))], j
    n = len(proposal)
    return list(proposal) + [int(rng.choice(p.shape[1], p=p[n]))], n


class _Speculation:
    """Both models' KV caches over one growing context. Each cache holds the context
    minus the tokens it has not been fed yet (fed at its next call); rejected
    positions are cropped from it.

    A cache may start with positions that are no tokens of the context: a prompt- or
    prefix-tuning adapter's P virtual tokens, put in on the first forward. Each
    model's count of them is measured then (cache length - tokens fed), so feeding
    and cropping count the context's tokens only, and the model's own positions
    (the cache's) stay P.. for the real tokens."""

    def __init__(self, target, draft, ctx, cfg: SamplingConfig, rng, context: int = 0):
        from tinylm.nn import KVCache

        self.target, self.draft, self.cfg, self.rng = target, draft, cfg, rng
        self.V = target.config.vocab_size
        self.caches = {"target": KVCache(), "draft": KVCache()}
        self.fed = {"target": 0, "draft": 0}  # context tokens in each cache
        self.virtual = {"target": None, "draft": None}  # P, measured at the first forward
        self.context = context  # the most context tokens a model is fed (to fit)
        self.ctx = list(ctx)
        self.result = SpeculativeResult()

    def _forward(self, which: str, seq: list):
        """Feed ``which`` model the tokens of ``seq`` its cache lacks; its output."""
        model, cache = getattr(self, which), self.caches[which]
        out = model(np.array([seq[self.fed[which]:]]), cache=cache)
        self.fed[which] = len(seq)
        if self.virtual[which] is None:
            self.virtual[which] = cache.length - len(seq)
            _check_fits(model, which, self.virtual[which], self.context)
        return out

    def _crop(self, which: str, n: int) -> None:
        """Keep the first ``n`` context tokens (and any virtual positions) in the cache."""
        if self.virtual[which] is not None and self.fed[which] > n:
            self.caches[which].crop(self.virtual[which] + n)
            self.fed[which] = n

    def _probs(self, logits) -> np.ndarray:
        """(n, V) logits -> the probabilities sampling draws from (temperature, filters)."""
        return softmax_array(process_logits(np.asarray(logits, np.float64), self.cfg))

    def propose(self, n: int):
        """The draft's ``n`` tokens, one at a time, and the (n, V) probabilities each
        was drawn from (empty when greedy)."""
        proposal, q = [], []
        for _ in range(n):
            logits = self._forward("draft", self.ctx + proposal).logits
            row = backend.to_numpy(logits.data[0, -1:, :self.V])  # (1, V)
            if self.cfg.greedy:
                proposal.append(int(row.argmax()))
            else:
                q.append(self._probs(row)[0])
                proposal.append(int(self.rng.choice(self.V, p=q[-1])))
        return proposal, np.array(q)

    def round(self, n: int) -> list:
        """Propose ``n`` tokens, verify them with one forward of the target; returns the
        tokens to append (the accepted drafts and one of the target's own)."""
        proposal, q = self.propose(n)
        out = self._forward("target", self.ctx + proposal)
        rows = backend.to_numpy(out.logits.data[0])[-(n + 1):, :self.V]  # (n+1, V) the
        # target at each proposed position and one past them
        if self.cfg.greedy:
            choice = rows.argmax(axis=-1)  # (n+1,) target's picks
            agree = int(np.cumprod(choice[:n] == np.array(proposal)).sum())
            new = proposal[:agree] + [int(choice[agree])]
        else:
            new, agree = speculative_accept(self._probs(rows), q, proposal, self.rng)
        self.result.proposed += n
        self.result.accepted += int(agree)
        for which in ("target", "draft"):  # keep context + accepted drafts
            self._crop(which, len(self.ctx) + agree)
        return new


def virtual_positions(model) -> int:
    """How many positions the model's active adapters put in front of the tokens in a
    KV cache (prompt / prefix tuning's ``num_virtual_tokens``); 0 without any."""
    from tinylm.peft.base import adapter_sets

    total = 0
    for _, _, adapters in adapter_sets(model):
        adapter = None if adapters.disabled else adapters.adapters().get(adapters.active)
        if adapter is not None and not adapter.merged:
            total += int(getattr(adapter, "num_virtual_tokens", 0) or 0)
    return total


def _check_fits(model, which: str, virtual: int, context: int) -> None:
    """The ``context`` tokens plus ``virtual`` positions must fit max_positions."""
    limit = model.config.max_positions
    if limit and context and virtual + context > limit:
        extra = (f" + the {which} model's {virtual} virtual tokens (prompt/prefix tuning)"
                 if virtual else "")
        raise TinyLMError(f"prompt + max_new_tokens + k{extra} must fit max_positions="
                          f"{limit} of the {which} model; ask for fewer new tokens or a smaller k")


def _check_speculative(target, draft, n_prompt: int, max_new_tokens, k) -> int:
    """Refuses what speculative decoding cannot do; returns the context length both
    models must fit (virtual tokens aside)."""
    from tinylm.objectives import model_kind

    for m in (target, draft):
        if model_kind(m) != "decoder":
            raise TinyLMError("speculative decoding needs two decoder-only models")
    _check_count("k (draft tokens per step)", k, least=1)
    _check_count("max_new_tokens", max_new_tokens)
    if draft.config.vocab_size != target.config.vocab_size:
        raise TinyLMError(f"the draft model's vocab_size ({draft.config.vocab_size}) differs "
                          f"from the target's ({target.config.vocab_size}); the draft must "
                          f"share the target's tokenizer")
    context = n_prompt + max_new_tokens + k
    for which, m in (("target", target), ("draft", draft)):
        _check_fits(m, which, virtual_positions(m), context)
    return context


def speculative_sample(target, draft, prompt, max_new_tokens: int = 200, *, k: int = 4,
                       sampling: SamplingConfig | None = None, seed=None, eos_id=None,
                       tokenizer=None, **sampling_options) -> SpeculativeResult:
    """Sample from ``target`` with a ``draft`` model proposing ``k`` tokens at a time;
    the tokens are distributed exactly as sampling the target alone with the same
    temperature, top-k, top-p and min-p would give (``speculative_accept``; the
    penalties, which depend on every token so far, are not supported). ``sampling`` /
    ``sampling_options``, ``seed``, ``eos_id`` and ``tokenizer`` as in ``generate``;
    temperature 0 is greedy (``speculative_greedy``)."""
    cfg = SamplingConfig.build(sampling, **sampling_options)
    if cfg.penalised:
        raise ConfigError("speculative sampling takes temperature, top_k, top_p and min_p; "
                          "leave out the repetition, frequency and presence penalties")
    rows = as_prompt_rows(prompt, tokenizer)
    if len(rows) != 1:
        raise TinyLMError(f"speculative decoding continues one prompt, got {len(rows)}")
    context = _check_speculative(target, draft, len(rows[0]), max_new_tokens, k)
    eos = resolve_eos(target, eos_id, tokenizer)
    run = _Speculation(target, draft, rows[0], cfg, np.random.default_rng(seed), context)
    n0, ctx = len(rows[0]), run.ctx
    done = max_new_tokens == 0
    with inference(target, draft):
        while not done:
            for tok in run.round(min(k, max_new_tokens - (len(ctx) - n0))):
                ctx.append(tok)
                done = tok in eos or len(ctx) - n0 >= max_new_tokens
                if done:
                    break
    run.result.tokens = ctx[n0:]
    return run.result
