"""Top-p (nucleus) filtering without sorting the whole vocabulary.

    logits = process_logits(logits, cfg, counts=counts)   # = tinylm.sampling's, faster

``tinylm.sampling.top_p_filter`` sorts every row's V probabilities (a stable argsort of
(B, V) float64: about 75 ms for 16 rows of GPT-2's 50257 on one core, more than the
decode step's forward) to find the smallest kept probability. Only the head of the
sorted order matters: its cumulative mass passes ``p`` after a few dozen tokens for
most distributions. So this takes the m + 1 largest probabilities of each row
(``np.partition``, linear time), sorts just those, and repeats with 4m for the rows
whose first m + 1 do not reach ``p`` (up to the whole vocabulary, where it is the full
sort).

The result is the same array as ``top_p_filter``'s, bit for bit: the sorted values of
a row's m + 1 largest probabilities are the first m + 1 of its full sorted order
(which index a tie comes from does not matter: the cut depends on values only);
``np.cumsum`` adds in order, so the head's partial sums are the full ones; and the
mass ahead of position i, cumsum[i] - p[i], never decreases along the sorted order
(rounding is monotone), so once it reaches ``p`` at position m no later one is kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tinylm.ops.nn import softmax_array
from tinylm.sampling import SamplingConfig, min_p_filter
from tinylm.sampling import process_logits as _reference

FIRST_HEAD = 64  # probabilities sorted per row at first


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """``tinylm.sampling.top_p_filter(logits, p)`` for logits (B, V), same result."""
    if p >= 1.0:
        return logits
    probs = softmax_array(logits)  # (B, V)
    V = probs.shape[-1]
    cutoff = np.empty((probs.shape[0], 1))
    todo = np.arange(probs.shape[0])
    m = FIRST_HEAD
    while len(todo):
        rows = probs[todo]
        if m + 1 >= V:
            head = -np.sort(-rows, axis=-1)  # (n, V) the full sort
        else:
            head = -np.sort(np.partition(-rows, m, axis=-1)[:, :m + 1], axis=-1)  # (n, m+1)
        before = np.cumsum(head, axis=-1) - head  # mass ahead of each, (n, m+1)
        done = (before[:, -1] >= p) | (m + 1 >= V)  # the cut is inside the head
        n_keep = (before[done] < p).sum(axis=-1, keepdims=True).clip(min=1)
        cutoff[todo[done]] = np.take_along_axis(head[done], n_keep - 1, axis=-1)
        todo, m = todo[~done], 4 * m
    return np.where(probs < cutoff, -np.inf, logits)


def process_logits(logits: np.ndarray, cfg: SamplingConfig, seen=None, counts=None):
    """``tinylm.sampling.process_logits`` with this file's top-p (same result): the
    penalties, temperature and top-k there, then top-p here, then min-p."""
    if cfg.greedy or cfg.top_p is None:
        return _reference(logits, cfg, seen, counts)
    head = dataclasses.replace(cfg, top_p=None, min_p=None)
    logits = top_p_filter(_reference(logits, head, seen, counts), cfg.top_p)
    return logits if cfg.min_p is None else min_p_filter(logits, cfg.min_p)
