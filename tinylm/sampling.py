"""Choosing the next token: ``SamplingConfig`` and the logit processors it drives.

    cfg = SamplingConfig(temperature=0.8, top_k=200, top_p=0.95)   # checked here
    logits = process_logits(logits, cfg)        # (B, V) -> (B, V), removed tokens -inf
    tokens = pick(logits, cfg.temperature, rng)  # (B,) ids

Every processor takes logits (B, V) float and returns new logits (B, V); a removed
token gets -inf. None of them loops over the batch or the vocabulary. They run in the
order transformers applies them: repetition penalty, frequency/presence penalties,
temperature, top-k, top-p, min-p; then argmax (temperature 0) or a draw from the
softmax with a ``numpy.random.Generator`` (one seed gives the same tokens).

``SamplingConfig`` is built once, where the options come in (``tinylm generate``'s
flags, a caller's keywords), and passed down whole; an invalid value (NaN included) is
a ``ConfigError`` when it is built, never empty output later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from tinylm.config_files import check_known_fields, field_type_problems, non_finite_problems
from tinylm.errors import ConfigError
from tinylm.ops.nn import softmax_array

_TYPES = {"int": (int,), "float": (int, float)}


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token; temperature 0 is greedy (argmax). ``None`` turns a
    filter off; ``repetition_penalty`` 1 and the other penalties 0 are no penalty."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):  # NumPy scalars as Python numbers
            value = getattr(self, f.name)
            if isinstance(value, (np.integer, np.floating)):
                object.__setattr__(self, f.name, value.item())
        self.check()

    def check(self) -> None:
        """Raise ``ConfigError`` naming every invalid field (a NaN or infinite float,
        a wrong type, a value out of range)."""
        problems = field_type_problems(self, _TYPES)
        if not problems:
            problems = non_finite_problems(self)
        if not problems:
            problems = self._range_problems()
        if problems:
            raise ConfigError("invalid sampling: " + "; ".join(problems))

    def _range_problems(self) -> list:
        p = []
        if self.temperature < 0:
            p.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            p.append(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            p.append(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            p.append(f"repetition_penalty must be > 0 (1 = none), got {self.repetition_penalty}")
        return p

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether a penalty depends on the tokens so far."""
        return (self.repetition_penalty != 1.0 or bool(self.frequency_penalty)
                or bool(self.presence_penalty))

    @classmethod
    def build(cls, sampling=None, **options) -> "SamplingConfig":
        """``sampling`` (a ``SamplingConfig``), or one made of the keyword ``options``
        (temperature=..., top_k=...), not both: what the functions that take either
        call. An unknown keyword is a ``ConfigError`` that lists the known ones."""
        if sampling is not None and options:
            raise ConfigError(f"give sampling= or the sampling keywords "
                              f"({', '.join(sorted(options))}), not both")
        if sampling is not None:
            if not isinstance(sampling, cls):
                raise ConfigError(f"sampling= takes a SamplingConfig, not "
                                  f"{type(sampling).__name__}")
            return sampling
        check_known_fields(cls, options, "sampling option")
        return cls(**options)


# --------------------------------------------------------------------------- processors


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


TOP_P_HEAD = 64  # probabilities per row that top_p_filter sorts at first


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus sampling: keep the most probable tokens whose probabilities add up to at
    least ``p`` — token i stays when the mass of the tokens strictly more probable than
    it is below ``p`` (so the top token always stays, and ties stay together).

    Example: probs (0.5, 0.3, 0.2), p=0.6 keeps the first two (0.5 < 0.6 before the
    second; 0.8 >= 0.6 before the third).

    Only the head of each row's sorted order matters, and its cumulative mass passes
    ``p`` after a few dozen tokens for most distributions; sorting all V probabilities
    (GPT-2's 50257, 16 rows: about 70 ms on one core, more than a decode step's
    forward) is not needed. So this takes the m + 1 largest probabilities of each row
    (``np.partition``, linear time), sorts only those, and repeats with 4m for the rows
    whose head does not reach ``p`` (up to the whole vocabulary: the full sort). The
    result is the full sort's, bit for bit: the sorted m + 1 largest are the first
    m + 1 of the full sorted order (which index a tie comes from does not matter: the
    cut depends on values only); ``np.cumsum`` adds in order, so the head's partial
    sums are the full ones; and the mass ahead of a position never decreases along the
    sorted order (rounding is monotone), so once it reaches ``p`` no later one is kept."""
    if p >= 1.0:
        return logits
    probs = softmax_array(logits)  # (B, V)
    V = probs.shape[-1]
    cutoff = np.empty((probs.shape[0], 1))  # (B, 1) each row's smallest kept probability
    todo, m = np.arange(probs.shape[0]), TOP_P_HEAD
    while len(todo):
        rows = probs[todo]
        if m + 1 >= V:
            head = -np.sort(-rows, axis=-1)  # (n, V) the full sort, descending
        else:
            head = -np.sort(np.partition(-rows, m, axis=-1)[:, :m + 1], axis=-1)  # (n, m+1)
        before = np.cumsum(head, axis=-1) - head  # mass ahead of each
        done = (before[:, -1] >= p) | (m + 1 >= V)  # the cut is inside the head
        n_keep = (before[done] < p).sum(axis=-1, keepdims=True).clip(min=1)
        cutoff[todo[done]] = np.take_along_axis(head[done], n_keep - 1, axis=-1)
        todo, m = todo[~done], 4 * m
    return np.where(probs < cutoff, -np.inf, logits)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least ``min_p`` x the top token's."""
    if min_p <= 0:
        return logits
    probs = softmax_array(logits)
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


def process_logits(logits: np.ndarray, cfg: SamplingConfig, seen=None, counts=None):
    """The pipeline, in transformers' order: penalties, temperature, top-k, top-p, min-p.
    ``seen`` and ``counts`` (B, V) feed the penalties (None: that penalty is skipped)."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, cfg.repetition_penalty)
    if counts is not None:
        logits = frequency_penalty(logits, counts, cfg.frequency_penalty, cfg.presence_penalty)
    if cfg.greedy:
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
    probs = softmax_array(logits)  # (B, V)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]  # (B, 1)
    return np.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1)


class TokenHistory:
    """What the penalties need to know of each row: which tokens it has seen (the
    repetition penalty, over the decoder's input ids, as transformers) and how often
    each was generated (frequency and presence). Only what ``cfg`` uses is kept."""

    def __init__(self, cfg: SamplingConfig, batch: int, vocab: int):
        self.seen = (np.zeros((batch, vocab), dtype=bool)
                     if cfg.repetition_penalty != 1.0 else None)
        self.counts = (np.zeros((batch, vocab), dtype=np.int64)
                       if cfg.frequency_penalty or cfg.presence_penalty else None)

    def see(self, row: int, ids) -> None:
        """Mark ``ids`` as in row ``row``'s context (the prompt), without counting them."""
        if self.seen is not None:
            self.seen[row, list(ids)] = True

    def add(self, tokens: np.ndarray) -> None:
        """One new token per row, (B,)."""
        rows = np.arange(len(tokens))
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1

    def process(self, logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
        return process_logits(logits, cfg, self.seen, self.counts)
