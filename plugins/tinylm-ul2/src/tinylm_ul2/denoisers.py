"""UL2's denoisers: what each one is, how long its pieces are, and batched noise masks.

A denoiser (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms", section 3.1)
turns a window of L tokens into (inputs, targets):

    R, X   span corruption, T5's (``random_spans_noise_mask``): n = round(rate L) noise
           tokens in k = round(n / mean_span) spans (each >= 1 token), alternating with
           k non-noise spans, starting with non-noise; every such mask equally likely.
           inputs  = the window with each noise span replaced by a sentinel
           targets = each sentinel followed by the span it hides
    S      sequential (prefix LM): inputs = the first L - n tokens, targets = the last
           n = round(rate L); or ``S:random``, a split point uniform in [1, L - 1]
           (T5's ``random_prefix_noise_mask``, which the paper's appendix code uses)

The paper's final mixture has seven: R (mean span 3 and 8, rate 0.15), S (rate 0.25)
and X (3 and 8 at rate 0.5, 64 at rate 0.15 and 0.5), written here as

    R:3:0.15,R:8:0.15,S:0.25,X:3:0.5,X:8:0.5,X:64:0.15,X:64:0.5

X is "extreme": long spans (>= 12 in the paper's definition) or a high rate (>= 30%);
the kind only picks the mode token the inputs start with, [R], [S] or [X].

The counts are T5's, deterministic given L (``tinylm.objectives.span_counts``); only
where the spans sit and how long each one is are random. ``noise_masks`` draws a whole
group of rows at once: choosing k - 1 cut points out of the n - 1 gaps uniformly is
T5's random permutation of (k - 1) ones among zeros, done for every row by one argsort.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tinylm.objectives import ObjectiveError, span_counts

PAPER_MIXTURE = "R:3:0.15,R:8:0.15,S:0.25,X:3:0.5,X:8:0.5,X:64:0.15,X:64:0.5"
KINDS = ("R", "S", "X")


class Denoiser(NamedTuple):
    """One denoiser: ``kind`` "R", "S" or "X"; ``mean_span`` (R, X; None for S);
    ``rate``: the fraction corrupted (R, X) or predicted (S); None for ``S:random``."""

    kind: str
    mean_span: float | None
    rate: float | None

    def __str__(self) -> str:
        if self.kind == "S":
            return "S:" + ("random" if self.rate is None else f"{self.rate:g}")
        return f"{self.kind}:{self.mean_span:g}:{self.rate:g}"

    # ---------------------------------------------------------------- lengths

    def counts(self, length: int) -> tuple:
        """(n noise / target tokens, k spans) for a window of ``length`` (S: k = 1;
        ``S:random``: n is the largest it can be, length - 1)."""
        if self.kind != "S":
            return span_counts(length, self.rate, self.mean_span)
        if self.rate is None:
            return length - 1, 1
        return min(max(int(round(length * self.rate)), 1), length - 1), 1

    def piece_lengths(self, length: int) -> tuple:
        """(inputs, targets) lengths, at most, for a window of ``length``: sentinels
        included, no mode token or end token."""
        n, k = self.counts(length)
        if self.kind == "S":
            return (length - 1 if self.rate is None else length - n), n
        return length - n + k, n + k

    def sequence_length(self, length: int) -> int:
        """inputs + targets of a window of ``length`` (the decoder form's sequence, no
        mode or end token): length + 2 k with sentinels, length for S."""
        return length if self.kind == "S" else length + 2 * self.counts(length)[1]


def parse(spec) -> tuple:
    """A tuple of ``Denoiser`` from a spec: "R:3:0.15,S:0.25,..." (see the module
    docstring), a list of such strings, or a list of [kind, mean_span, rate] /
    [ "S", rate ] lists. Errors say what a spec looks like."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if not items or any(isinstance(i, str) and not i.strip() for i in items):
        raise ObjectiveError(f"ul2 denoisers {spec!r}: give a comma-separated list such as "
                             f"{PAPER_MIXTURE!r}")
    return tuple(_one(i) for i in items)


def _one(item) -> Denoiser:
    parts = item.strip().split(":") if isinstance(item, str) else list(item)
    kind = str(parts[0]).strip().upper() if parts else ""
    example = "R:MEAN_SPAN:RATE, X:MEAN_SPAN:RATE, S:RATE or S:random"
    try:
        if kind == "S" and len(parts) == 2:
            if str(parts[1]).strip().lower() == "random":
                return Denoiser("S", None, None)
            d = Denoiser("S", None, float(parts[1]))
        elif kind in ("R", "X") and len(parts) == 3:
            d = Denoiser(kind, float(parts[1]), float(parts[2]))
        else:
            raise ValueError
    except (TypeError, ValueError):
        raise ObjectiveError(f"ul2 denoiser {item!r} is not {example}") from None
    if not 0 < d.rate < 1:
        raise ObjectiveError(f"ul2 denoiser {item!r}: the rate must be in (0, 1)")
    if d.kind != "S" and not d.mean_span >= 1:
        raise ObjectiveError(f"ul2 denoiser {item!r}: the mean span must be >= 1")
    return d


def longest_window(fits, limit: int) -> int:
    """The largest L in [2, limit] with ``fits(L)`` (monotone: true up to some L, then
    false), by bisection; 0 when not even L = 2 fits."""
    if not fits(2):
        return 0
    lo, hi = 2, limit  # fits(lo); find the last L that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# --------------------------------------------------------------------------- masks


def _segment_lengths(n_rows: int, n_items: int, n_segments: int, rng) -> np.ndarray:
    """(n_rows, n_segments) positive lengths summing to ``n_items``, each row a uniform
    random composition (T5's ``_random_segmentation``): k - 1 of the n - 1 gaps
    between items are cut, every choice equally likely."""
    if n_segments == 1:
        return np.full((n_rows, 1), n_items, dtype=np.int64)
    order = np.argsort(rng.random((n_rows, n_items - 1)), axis=1)  # a permutation per row
    cuts = np.sort(order[:, : n_segments - 1], axis=1) + 1  # (rows, k-1) in [1, n-1]
    edges = np.concatenate([np.zeros((n_rows, 1), np.int64), cuts,
                            np.full((n_rows, 1), n_items, np.int64)], axis=1)
    return np.diff(edges, axis=1)


def noise_masks(n_rows: int, length: int, denoiser: Denoiser, rng) -> np.ndarray:
    """(n_rows, length) bool, True = noise: T5's ``random_spans_noise_mask`` for each
    row (k non-noise spans and k noise spans, alternating, non-noise first)."""
    n, k = denoiser.counts(length)
    noise = _segment_lengths(n_rows, n, k, rng)
    keep = _segment_lengths(n_rows, length - n, k, rng)
    spans = np.stack([keep, noise], axis=2).reshape(n_rows, 2 * k)  # keep0 noise0 keep1 ...
    starts = np.cumsum(spans, axis=1)[:, :-1]  # (rows, 2k - 1) where each next span starts
    marks = np.zeros((n_rows, length), np.int64)
    np.put_along_axis(marks, starts, 1, axis=1)  # distinct within a row
    return np.cumsum(marks, axis=1) % 2 == 1


def spans_to_sentinels(windows: np.ndarray, mask: np.ndarray, sentinels) -> np.ndarray:
    """T5's ``noise_span_to_unique_sentinel`` for every row: the first token of each
    span of ``mask`` becomes the next sentinel (ids ``sentinels[0]``, ``[1]`` ...), the
    rest of the span is dropped. All rows have the same numbers of masked tokens and
    spans, hence the same length."""
    B = windows.shape[0]
    first = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]  # a span starts here
    number = np.cumsum(first, axis=1) - 1  # which span (where first)
    tokens = np.where(first, np.asarray(sentinels)[np.maximum(number, 0)], windows)
    return tokens[~mask | first].reshape(B, -1)  # row-major: each row in order
