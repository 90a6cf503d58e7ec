"""The server's top-p (tinylm/serve/nucleus.py: a partial sort of each row's head)
returns exactly the array that `tinylm.sampling.top_p_filter` (the full sort) does:
peaked and flat rows of a 50257-token vocabulary, ties, -inf (top-k'd) entries, tiny
vocabularies, and the whole `process_logits` pipeline with penalties, top-k and min-p.
Also checked against torch's sort-based nucleus (`torch.sort` + `cumsum`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import sampling
from tinylm.sampling import SamplingConfig
from tinylm.serve import nucleus


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0, 30.0])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999999])
def test_big_vocabulary_equals_full_sort(scale, p):
    logits = np.random.default_rng(int(scale * 10)).standard_normal((3, 50257)) * scale
    got = nucleus.top_p_filter(logits, p)
    assert np.array_equal(got, sampling.top_p_filter(logits, p))
    assert (got > -np.inf).any(axis=-1).all()  # the top token always stays


@given(st.integers(1, 300), st.floats(0.01, 1.0), st.integers(0, 2**32 - 1))
def test_ties_and_masked_entries_equal_full_sort(V, p, seed):
    rng = np.random.default_rng(seed)
    logits = rng.integers(-3, 3, (4, V)).astype(np.float64)  # many ties
    logits[rng.random((4, V)) < 0.3] = -np.inf
    logits[0, 0] = 1.0  # a row with no finite entry is not a distribution
    logits[1:, 0] = np.where(np.isinf(logits[1:]).all(axis=-1), 0.0, logits[1:, 0])
    assert np.array_equal(nucleus.top_p_filter(logits, p), sampling.top_p_filter(logits, p))


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.7, top_p=0.9),
    SamplingConfig(temperature=1.3, top_k=500, top_p=0.8, min_p=0.01),
    SamplingConfig(temperature=0.9, top_p=0.95, frequency_penalty=0.5, presence_penalty=0.3),
    SamplingConfig(temperature=0.9, top_k=40),
    SamplingConfig(temperature=0),
])
def test_pipeline_equals_sampling(cfg):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 50257)) * 6
    counts = rng.integers(0, 3, (5, 50257)).astype(np.int32)
    assert np.array_equal(nucleus.process_logits(logits, cfg, None, counts),
                          sampling.process_logits(logits, cfg, None, counts))


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
    got = nucleus.top_p_filter(logits, p) > -np.inf
    assert (got != want).sum() <= 2  # float rounding at the cut at most
    assert got.sum() == pytest.approx(want.sum(), abs=2)
