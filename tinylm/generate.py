"""Text generation: KV-cache decoding and the samplers.

    ids = tokenizer.encode("ROMEO:")
    new = sample(model, ids, max_new_tokens=200, temperature=0.8, top_k=200, seed=1)
    print(tokenizer.decode(ids + new))

    out = generate(model, [ids_a, ids_b], max_new_tokens=50, top_p=0.9, seed=1,
                   stop=["\\n\\n"], tokenizer=tokenizer)
    out.tokens[0], out.logprobs[0]          # per prompt: new ids, their log-probs

A decoder runs the (left-padded) prompts once, filling a ``KVCache``, then feeds one
new token per row per step. Left padding keeps every row's last token in the last
column; the attention mask hides the padding and each row's positions count its own
tokens only (0, 1, ... from its first real token), so a padded row decodes exactly as
it would alone. When a row's context would pass the model's ``max_positions``, the
cache is dropped and the last ``max_positions`` tokens are run again (the sliding
window of the old full-recompute sampler). An encoder-decoder encodes the prompts
once and decodes from its decoder-start token with a cache. An encoder (BERT) does
not generate text.

Each step's logits (B, vocab) go through pure, vectorised functions, in the order
transformers applies them: repetition penalty, frequency/presence penalties,
temperature, top-k, top-p, min-p; then argmax (temperature 0) or a draw from the
softmax with a ``numpy.random.Generator`` (one ``seed`` gives the same tokens).

Also here: ``beam_search`` (transformers' algorithm, length penalty and early
stopping), ``speculative_greedy`` (a draft model proposes, the target verifies; the
output is the target's greedy output) and ``TextStream`` (bytes of tokens -> text that
is safe to print: split UTF-8 characters and possible stop strings wait).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tinylm import backend
from tinylm.autograd import no_grad
from tinylm.errors import TinyLMError

# --------------------------------------------------------------------------- samplers
# Every function takes logits (B, V) float and returns new logits (B, V); a removed
# token gets -inf. None of them loops over the batch or the vocabulary.


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(B, V) -> log-probabilities (B, V); -inf stays -inf."""
    m = logits.max(axis=-1, keepdims=True)
    shifted = logits - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """logits / temperature (temperature > 0)."""
    return logits / temperature


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep each row's ``k`` largest logits (and any tied with the k-th)."""
    V = logits.shape[-1]
    if k >= V:
        return logits
    kth = np.partition(logits, V - k, axis=-1)[:, V - k: V - k + 1]  # (B, 1)
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus sampling: keep the most probable tokens whose probabilities add up to at
    least ``p`` — token i stays when the mass of the tokens strictly more probable than
    it is below ``p`` (so the top token always stays, and ties stay together).

    Example: probs (0.5, 0.3, 0.2), p=0.6 keeps the first two (0.5 < 0.6 before the
    second; 0.8 >= 0.6 before the third)."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)  # (B, V)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)  # (B, V) descending
    before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass ahead of each, (B, V)
    n_keep = (before < p).sum(axis=-1, keepdims=True).clip(min=1)  # (B, 1)
    cutoff = np.take_along_axis(sorted_p, n_keep - 1, axis=-1)  # (B, 1) smallest kept
    return np.where(probs < cutoff, -np.inf, logits)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least ``min_p`` x the top token's."""
    if min_p <= 0:
        return logits
    probs = softmax(logits)
    return np.where(probs < min_p * probs.max(axis=-1, keepdims=True), -np.inf, logits)


def repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor (CTRL): for every token already in
    the context (``seen`` (B, V) bool), a positive logit is divided by ``penalty`` and
    a negative one multiplied by it."""
    if penalty == 1.0:
        return logits
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def frequency_penalty(logits: np.ndarray, counts: np.ndarray, frequency: float = 0.0,
                      presence: float = 0.0) -> np.ndarray:
    """OpenAI's penalties: logit - frequency * count - presence * (count > 0), where
    ``counts`` (B, V) counts each token among the generated ones."""
    if not frequency and not presence:
        return logits
    return logits - frequency * counts - presence * (counts > 0)


@dataclass
class SamplingConfig:
    """How to pick the next token; temperature 0 is greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def check(self) -> None:
        if self.temperature < 0:
            raise TinyLMError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise TinyLMError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise TinyLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise TinyLMError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise TinyLMError(f"repetition_penalty must be > 0 (1 = none), "
                              f"got {self.repetition_penalty}")


def process_logits(logits: np.ndarray, cfg: SamplingConfig, seen=None, counts=None):
    """The pipeline, in transformers' order: penalties, temperature, top-k, top-p, min-p."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, cfg.repetition_penalty)
    if counts is not None:
        logits = frequency_penalty(logits, counts, cfg.frequency_penalty, cfg.presence_penalty)
    if cfg.temperature == 0:
        return logits
    logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p is not None:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


def pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """(B, V) processed logits -> (B,) token ids: argmax when temperature is 0, else one
    draw per row by inverse CDF with one uniform per row (vectorised)."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    probs = softmax(logits)  # (B, V)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]  # (B, 1)
    return np.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1)


# --------------------------------------------------------------------------- decoding


@dataclass
class Generation:
    """What ``generate`` returns, one entry per prompt: the new token ids, their
    log-probabilities under the model (before any sampling transform), and why the row
    stopped ("eos", "stop", "length")."""

    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reasons: list = field(default_factory=list)


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


def _last_logits(out) -> np.ndarray:
    return backend.to_numpy(out.logits.data[:, -1]).astype(np.float64)  # (B, V)


class _DecoderStepper:
    """Runs a decoder-only model over growing rows with a KV cache."""

    def __init__(self, model, rows):
        self.model = model
        self.limit = model.config.max_positions
        self.cache = self.mask = self.next_pos = None

    def prefill(self, rows):
        from tinylm.nn import KVCache

        rows = [r[-self.limit:] if self.limit else r for r in rows]
        ids, mask, positions = left_pad(rows)
        self.cache, self.mask = KVCache(), mask
        self.padded = not mask.all()  # no padding: default positions, no mask (faster)
        self.lengths = np.array([len(r) for r in rows])
        self.next_pos = positions[:, -1] + 1  # (B,)
        out = self.model(ids, attention_mask=mask if self.padded else None, cache=self.cache,
                         positions=positions if self.padded else None)
        return _last_logits(out)

    def step(self, rows, tokens):
        if self.limit and int(self.lengths.max()) + 1 > self.limit:
            return self.prefill(rows)  # window slides: recompute the last `limit` tokens
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
        self.cache = KVCache()

    def prefill(self, rows):
        start = self.model.config.decoder_start_token_id
        return self._run(np.full((len(rows), 1), start, dtype=np.int64))

    def step(self, rows, tokens):
        return self._run(np.asarray(tokens)[:, None])

    def reorder(self, index):
        self.cache.reorder(index)
        self.memory = self.memory[index]
        self.enc_mask = self.enc_mask[index]

    def _run(self, ids):
        out = self.model(decoder_ids=ids, memory=self.memory, attention_mask=self.enc_mask,
                         cache=self.cache)
        return _last_logits(out)


def _as_rows(prompts) -> list:
    if len(prompts) and np.ndim(prompts[0]) == 0:
        prompts = [prompts]  # one prompt of ids
    return [[int(i) for i in p] for p in prompts]


def generate(model, prompts, max_new_tokens: int = 200, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, eos_id=None, stop=(), tokenizer=None,
             seed: int | None = None, rng: np.random.Generator | None = None,
             on_token=None) -> Generation:
    """Continue each prompt (a list of ids, or a list of such lists) by up to
    ``max_new_tokens`` tokens.

    A row stops at ``eos_id`` (an int or a set of ints; the eos token is kept) or when
    its decoded new text contains one of the ``stop`` strings (needs ``tokenizer``;
    the token that completed it is kept: cut the text at the string). ``on_token(row,
    token_id, logprob)`` is called as each token is chosen (streaming)."""
    from tinylm.objectives import model_kind

    kind = model_kind(model)
    if kind not in ("decoder", "encoder-decoder"):
        raise TinyLMError(f"{type(model).__name__} is an {kind or 'unknown kind of'} model and "
                          f"does not generate text; sample from a decoder (gpt2, llama) or "
                          f"an encoder-decoder (t5)")
    cfg = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty,
                         frequency_penalty, presence_penalty)
    cfg.check()
    stop = [stop] if isinstance(stop, str) else list(stop or ())
    if stop and tokenizer is None:
        raise TinyLMError("stop strings need the tokenizer= to decode with")
    rows = _as_rows(prompts)
    if not rows or any(not r for r in rows):
        raise TinyLMError("give at least one prompt token to continue from, in every prompt")
    eos = set() if eos_id is None else ({int(eos_id)} if np.ndim(eos_id) == 0
                                        else {int(e) for e in eos_id})
    rng = rng if rng is not None else np.random.default_rng(seed)
    B, V = len(rows), model.config.vocab_size
    result = Generation([[] for _ in rows], [[] for _ in rows], ["length"] * B)
    need_seen = cfg.repetition_penalty != 1.0
    need_counts = bool(cfg.frequency_penalty or cfg.presence_penalty)
    seen = np.zeros((B, V), dtype=bool) if need_seen else None
    counts = np.zeros((B, V), dtype=np.int64) if need_counts else None
    if need_seen:  # transformers penalises the decoder's input ids
        if kind == "decoder":
            for i, r in enumerate(rows):
                seen[i, r] = True
        else:
            seen[:, model.config.decoder_start_token_id] = True
    done = np.zeros(B, dtype=bool)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            stepper = (_DecoderStepper if kind == "decoder" else _EncoderDecoderStepper)(
                model, rows)
            context = [list(r) for r in rows] if kind == "decoder" else [[] for _ in rows]
            logits = stepper.prefill(context) if max_new_tokens > 0 else None
            for t in range(max_new_tokens):
                logits = logits[:, :V]
                raw_logp = log_softmax(logits)  # (B, V)
                tokens = pick(process_logits(logits, cfg, seen, counts), cfg.temperature, rng)
                chosen_logp = raw_logp[np.arange(B), tokens]
                for i in np.flatnonzero(~done):
                    tok = int(tokens[i])
                    result.tokens[i].append(tok)
                    result.logprobs[i].append(float(chosen_logp[i]))
                    if on_token is not None:
                        on_token(int(i), tok, float(chosen_logp[i]))
                    if tok in eos:
                        done[i], result.finish_reasons[i] = True, "eos"
                    elif stop and _hits_stop(tokenizer, result.tokens[i], stop):
                        done[i], result.finish_reasons[i] = True, "stop"
                if need_seen:
                    seen[np.arange(B), tokens] = True
                if need_counts:
                    counts[np.arange(B), tokens] += 1
                if done.all() or t == max_new_tokens - 1:
                    break
                for i, tok in enumerate(tokens):
                    context[i].append(int(tok))
                logits = stepper.step(context, tokens)
    finally:
        model.train(was_training)
    return result


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
    hits = [text.find(s) for s in stop if s in text]
    return text[:min(hits)] if hits else text


def sample(model, ids, max_new_tokens: int = 200, temperature: float = 1.0,
           top_k: int | None = None, seed: int | None = None, eos_id: int | None = None,
           rng: np.random.Generator | None = None, **options) -> list:
    """The ids of ``max_new_tokens`` sampled tokens after ``ids`` (one prompt), fewer if
    ``eos_id`` comes. ``options``: any other keyword of ``generate``."""
    out = generate(model, [list(ids)], max_new_tokens, temperature=temperature, top_k=top_k,
                   seed=seed, eos_id=eos_id, rng=rng, **options)
    return out.tokens[0]


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


def beam_search(model, prompts, max_new_tokens: int = 20, *, num_beams: int = 4,
                length_penalty: float = 1.0, early_stopping=False, eos_id=None) -> BeamResult:
    """Deterministic beam search, step for step the algorithm of transformers'
    ``generate(num_beams=..., do_sample=False)``.

    Every step, each prompt's ``num_beams`` running beams offer their ``2 num_beams``
    best continuations (log-probs summed along the beam). A continuation that ends in
    ``eos_id`` or reaches ``max_new_tokens`` is a finished hypothesis, scored
    sum / length ** length_penalty, if it ranks among the first ``num_beams``; the best
    ``num_beams`` unfinished ones keep running (the KV cache is reordered to follow
    them). The search stops at ``max_new_tokens``, or when no running beam can beat
    the finished ones: ``early_stopping=True`` as soon as ``num_beams`` hypotheses are
    finished; False: when the best running score, penalised at its current length, is
    below the worst finished one; "never": the same, at the longest length when
    ``length_penalty > 0``."""
    from tinylm.objectives import model_kind

    kind = model_kind(model)
    if kind not in ("decoder", "encoder-decoder"):
        raise TinyLMError(f"{type(model).__name__} is an {kind or 'unknown kind of'} model and "
                          f"does not generate text")
    if num_beams < 1:
        raise TinyLMError(f"num_beams must be >= 1, got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise TinyLMError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    rows = _as_rows(prompts)
    if not rows or any(not r for r in rows):
        raise TinyLMError("give at least one prompt token to continue from, in every prompt")
    limit = model.config.max_positions
    if kind == "decoder" and limit and max(map(len, rows)) + max_new_tokens > limit:
        raise TinyLMError(f"beam search keeps the whole context: prompt + max_new_tokens must "
                          f"fit the model's max_positions={limit}")
    eos = np.array(sorted(set() if eos_id is None else ({int(eos_id)} if np.ndim(eos_id) == 0
                                                        else {int(e) for e in eos_id})))
    B, K, V, L = len(rows), num_beams, model.config.vocab_size, max(max_new_tokens, 1)
    M = max(2, 1 + len(eos)) * K  # candidates looked at per prompt and step
    top_mask = np.arange(M) < K
    run_seq = np.zeros((B, K, L), np.int64)
    run_score = np.full((B, K), _NEG)
    run_score[:, 0] = 0.0  # one live beam at first, so the K beams do not start identical
    fin_seq = np.zeros((B, K, L), np.int64)
    fin_score = np.full((B, K), _NEG)
    fin_len = np.zeros((B, K), np.int64)
    fin_done = np.zeros((B, K), bool)
    open_ = np.ones((B, 1), bool)  # an open beam could still improve the finished ones
    b_idx = np.arange(B)[:, None]
    if max_new_tokens <= 0:
        return BeamResult([[] for _ in rows], [0.0] * B)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            beams = [r for r in rows for _ in range(K)]  # (B*K) rows, beam-major per prompt
            stepper = (_DecoderStepper if kind == "decoder" else _EncoderDecoderStepper)(
                model, beams)
            logits = stepper.prefill(beams if kind == "decoder" else [[]] * len(beams))
            for cur in range(max_new_tokens):
                logp = log_softmax(logits[:, :V]).reshape(B, K, V) + run_score[:, :, None]
                flat = logp.reshape(B, K * V)
                idx = np.argsort(-flat, axis=-1, kind="stable")[:, :M]  # (B, M)
                cand_lp = np.take_along_axis(flat, idx, axis=-1)  # (B, M) descending
                beam, tok = idx // V, idx % V  # (B, M)
                cand_seq = run_seq[b_idx, beam]  # (B, M, L)
                cand_seq[:, :, cur] = tok
                hits = np.isin(tok, eos) | (cur + 1 >= max_new_tokens)  # (B, M)
                # the best K unfinished continuations keep running
                keep_lp = cand_lp + hits * _NEG
                sel = np.argsort(-keep_lp, axis=-1, kind="stable")[:, :K]  # (B, K)
                run_seq = cand_seq[b_idx, sel]
                run_score = np.take_along_axis(keep_lp, sel, axis=-1)
                origin = (np.take_along_axis(beam, sel, axis=-1) + b_idx * K).reshape(-1)
                # the finished ones among the first K candidates join the hypotheses
                just = hits & top_mask[None, :]
                score = cand_lp / float(cur + 1) ** length_penalty
                full = fin_done.all(axis=1, keepdims=True) & (early_stopping is True)
                score = score + full * _NEG + (~open_) * _NEG + (~just) * _NEG
                m_seq = np.concatenate([fin_seq, cand_seq], axis=1)
                m_score = np.concatenate([fin_score, score], axis=1)
                m_len = np.concatenate([fin_len, np.full((B, M), cur + 1)], axis=1)
                m_done = np.concatenate([fin_done, just], axis=1)
                best = np.argsort(-m_score, axis=-1, kind="stable")[:, :K]
                fin_seq, fin_score = m_seq[b_idx, best], np.take_along_axis(m_score, best, -1)
                fin_len, fin_done = (np.take_along_axis(m_len, best, -1),
                                     np.take_along_axis(m_done, best, -1))
                n_gen = cur + 1
                if early_stopping == "never" and length_penalty > 0:
                    n_gen = max_new_tokens
                best_running = run_score[:, :1] / float(n_gen) ** length_penalty
                worst_fin = np.where(fin_done, fin_score.min(axis=1, keepdims=True), _NEG)
                open_ &= (best_running > worst_fin).any(axis=1, keepdims=True)
                all_full = fin_done.all() and early_stopping is True
                if not open_.any() or all_full or hits.all():
                    break
                stepper.reorder(origin)
                logits = stepper.step(None, run_seq[:, :, cur].reshape(-1))
    finally:
        model.train(was_training)
    tokens = [fin_seq[b, 0, :fin_len[b, 0]].tolist() for b in range(B)]
    return BeamResult(tokens, [float(s) for s in fin_score[:, 0]])


# --------------------------------------------------------------------------- speculative


@dataclass
class SpeculativeResult:
    """The new tokens, and how many draft tokens the target accepted of those proposed."""

    tokens: list = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0


def speculative_greedy(target, draft, prompt, max_new_tokens: int = 200, *, k: int = 4,
                       eos_id=None) -> SpeculativeResult:
    """Greedy decoding of ``target`` sped up by a small ``draft`` model (same vocabulary):
    the draft proposes ``k`` tokens one at a time, the target scores all of them in one
    forward, and the longest prefix on which the draft agrees with the target's argmax
    is kept, plus the target's own next token. The output is the target's greedy output.
    ``speculative_sample`` is the sampling form."""
    return speculative_sample(target, draft, prompt, max_new_tokens, k=k, temperature=0.0,
                              eos_id=eos_id)


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


def _probs(logits, temperature: float):
    """softmax(logits / temperature) in float64 over the last axis."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def speculative_sample(target, draft, prompt, max_new_tokens: int = 200, *, k: int = 4,
                       temperature: float = 1.0, seed=None, rng=None,
                       eos_id=None) -> SpeculativeResult:
    """Sample from ``target`` at ``temperature`` with a ``draft`` model proposing ``k``
    tokens at a time; the tokens are distributed exactly as sampling the target alone
    would give (``speculative_accept``). temperature 0 is greedy (``speculative_greedy``).

    Both models keep a KV cache; rejected positions are cropped from it. Each cache
    holds the context minus the tokens it has not been fed yet (fed at its next call)."""
    from tinylm.nn import KVCache
    from tinylm.objectives import model_kind

    for m in (target, draft):
        if model_kind(m) != "decoder":
            raise TinyLMError("speculative decoding needs two decoder-only models")
    if k < 1:
        raise TinyLMError(f"k (draft tokens per step) must be >= 1, got {k}")
    if temperature < 0:
        raise TinyLMError(f"temperature must be >= 0, got {temperature}")
    greedy = temperature == 0
    rng = rng if rng is not None else np.random.default_rng(seed)
    if draft.config.vocab_size != target.config.vocab_size:
        raise TinyLMError(f"the draft model's vocab_size ({draft.config.vocab_size}) differs "
                          f"from the target's ({target.config.vocab_size}); the draft must "
                          f"share the target's tokenizer")
    ctx = [int(i) for i in prompt]
    if not ctx:
        raise TinyLMError("give at least one prompt token to continue from")
    for m in (target, draft):
        limit = m.config.max_positions
        if limit and len(ctx) + max_new_tokens + k > limit:
            raise TinyLMError(f"prompt + max_new_tokens + k must fit max_positions={limit} of "
                              f"both models")
    eos = set() if eos_id is None else ({int(eos_id)} if np.ndim(eos_id) == 0
                                        else {int(e) for e in eos_id})
    V = target.config.vocab_size
    t_cache, d_cache = KVCache(), KVCache()
    result = SpeculativeResult()
    n0 = len(ctx)
    states = [(m, m.training) for m in (target, draft)]
    for m, _ in states:
        m.eval()
    try:
        with no_grad():
            while len(ctx) - n0 < max_new_tokens:
                n = min(k, max_new_tokens - (len(ctx) - n0))
                proposal, q = [], []
                for _ in range(n):  # the draft: feed what it has not seen, pick a token
                    fresh = (ctx + proposal)[d_cache.length:]
                    logits = draft(np.array([fresh]), cache=d_cache).logits
                    row = backend.to_numpy(logits.data[0, -1, :V])
                    if greedy:
                        proposal.append(int(row.argmax()))
                    else:
                        q.append(_probs(row, temperature))
                        proposal.append(int(rng.choice(V, p=q[-1])))
                fresh = (ctx + proposal)[t_cache.length:]
                logits = backend.to_numpy(target(np.array([fresh]), cache=t_cache).logits.data[0])
                rows = logits[-(n + 1):, :V]  # (n+1, V) the target at each proposed position
                if greedy:
                    choice = rows.argmax(axis=-1)  # (n+1,) target's picks
                    agree = int(np.cumprod(choice[:n] == np.array(proposal)).sum())
                    new = proposal[:agree] + [int(choice[agree])]
                else:
                    new, agree = speculative_accept(_probs(rows, temperature), np.array(q),
                                                    proposal, rng)
                result.proposed += n
                result.accepted += int(agree)
                t_cache.crop(len(ctx) + agree)  # keep context + accepted drafts
                d_cache.crop(len(ctx) + agree)
                for tok in new:
                    ctx.append(tok)
                    if tok in eos or len(ctx) - n0 >= max_new_tokens:
                        result.tokens = ctx[n0:]
                        return result
    finally:
        for m, was in states:
            m.train(was)
    result.tokens = ctx[n0:]
    return result
