"""tinylm.sampling.top_p_filter (a sort of only each row's head, widened when the cut
is beyond it) returns exactly the array that sorting the whole vocabulary does (the
reference below, the textbook definition): peaked and flat rows of a 50257-token
vocabulary (a cut inside the first head, after widening, at the full sort), ties, -inf
(top-k'd) entries, small vocabularies. Also checked against torch's sort-based nucleus
(`torch.sort` + `cumsum`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import sampling
from tinylm.ops.nn import softmax_array


def full_sort_top_p(logits, p):
    """The nucleus by a stable sort of all V probabilities of each row."""
    probs = softmax_array(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)  # (B, V) descending
    before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass ahead of each
    n_keep = (before < p).sum(axis=-1, keepdims=True).clip(min=1)
    cutoff = np.take_along_axis(sorted_p, n_keep - 1, axis=-1)  # (B, 1) smallest kept
    return np.where(probs < cutoff, -np.inf, logits)


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0, 30.0])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999999])
def test_big_vocabulary_equals_full_sort(scale, p):
    logits = np.random.default_rng(int(scale * 10)).standard_normal((3, 50257)) * scale
    got = sampling.top_p_filter(logits, p)
    assert np.array_equal(got, full_sort_top_p(logits, p))
    assert (got > -np.inf).any(axis=-1).all()  # the top token always stays


def test_rows_of_one_batch_cut_at_different_widths():
    """A peaked row (cut in the first head) and a flat one (cut after widening to the
    full sort) in one batch: each gets its own cut."""
    rng = np.random.default_rng(3)
    logits = np.stack([rng.standard_normal(50257) * 30, rng.standard_normal(50257) * 0.1])
    got = sampling.top_p_filter(logits, 0.9)
    assert np.array_equal(got, full_sort_top_p(logits, 0.9))
    kept = (got > -np.inf).sum(axis=-1)
    assert kept[0] <= sampling.TOP_P_HEAD < 4 ** 3 * sampling.TOP_P_HEAD < kept[1]


@given(st.integers(1, 300), st.floats(0.01, 1.0), st.integers(0, 2**32 - 1))
def test_ties_and_masked_entries_equal_full_sort(V, p, seed):
    rng = np.random.default_rng(seed)
    logits = rng.integers(-3, 3, (4, V)).astype(np.float64)  # many ties
    logits[rng.random((4, V)) < 0.3] = -np.inf
    logits[0, 0] = 1.0  # a row with no finite entry is not a distribution
    logits[1:, 0] = np.where(np.isinf(logits[1:]).all(axis=-1), 0.0, logits[1:, 0])
    assert np.array_equal(sampling.top_p_filter(logits, p), full_sort_top_p(logits, p))


def test_matches_torch_nucleus():
    torch = pytest.importorskip("torch")
    logits = np.random.default_rng(2).standard_normal((4, 50257)) * 5
    p = 0.9
    t = torch.from_numpy(logits)
    probs = torch.softmax(t, dim=-1)
    sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    n_keep = (before < p).sum(dim=-1, keepdim=True).clamp(min=1)
    cutoff = torch.gather(sorted_p, -1, n_keep - 1)
    want = (probs >= cutoff).numpy()
    got = sampling.top_p_filter(logits, p) > -np.inf
    assert (got != want).sum() <= 2  # float rounding at the cut at most
    assert got.sum() == pytest.approx(want.sum(), abs=2)
