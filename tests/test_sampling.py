"""tinylm.sampling: the logit processors keep exactly the tokens their definitions keep
(and match transformers' warpers); SamplingConfig refuses every invalid value, NaN
included; the one array-level softmax in tinylm.ops.nn is the one they all use."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinylm import sampling as S
from tinylm.errors import ConfigError
from tinylm.ops import nn as ops_nn

# --------------------------------------------------------------------------- samplers

logit_rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(2, 12)),
                        elements=st.floats(-8, 8, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.integers(1, 14))
def test_top_k_keeps_the_k_largest(logits, k):
    out = S.top_k_filter(logits, k)
    for row, new in zip(logits, out):
        kept = np.isfinite(new)
        # token kept <=> fewer than k tokens are strictly larger
        expect = np.array([(row > x).sum() < k for x in row])
        assert (kept == expect).all()
        assert (new[kept] == row[kept]).all()


def _probs(row):
    p = np.exp(row - row.max())
    return p / p.sum()


@settings(max_examples=80, deadline=None)
@given(logit_rows, st.floats(0.01, 0.99))
def test_top_p_keeps_the_nucleus(logits, p):
    out = S.top_p_filter(logits, p)
    for row, new in zip(logits, out):
        probs = _probs(row)
        above = np.array([probs[probs > x].sum() for x in probs])
        assume(np.all(np.abs(above - p) > 1e-9))
        assert (np.isfinite(new) == (above < p)).all()
        assert np.isfinite(new).any()


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_above_the_scaled_max(logits, min_p):
    out = S.min_p_filter(logits, min_p)
    for row, new in zip(logits, out):
        probs = _probs(row)
        threshold = min_p * probs.max()
        assume(np.all(np.abs(probs - threshold) > 1e-12))
        assert (np.isfinite(new) == (probs >= threshold)).all()


def test_top_p_worked_example():
    logits = np.log(np.array([[0.5, 0.3, 0.2]]))
    assert np.isfinite(S.top_p_filter(logits, 0.6)).tolist() == [[True, True, False]]
    assert np.isfinite(S.top_p_filter(logits, 0.5)).tolist() == [[True, False, False]]


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    logits = np.array([[2.0, -1.0, 0.5, -3.0, 1.0], [0.0, 4.0, -2.0, 1.0, -0.5]])
    ids = [[0, 1, 1], [3, 4, 2]]
    seen = np.zeros_like(logits, dtype=bool)
    for i, r in enumerate(ids):
        seen[i, r] = True
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.3)
    theirs = proc(torch.tensor(ids), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(S.repetition_penalty(logits, seen, 1.3), theirs)


def test_frequency_and_presence_penalty_by_hand():
    logits = np.array([[1.0, 2.0, 3.0]])
    counts = np.array([[0, 2, 1]])
    out = S.frequency_penalty(logits, counts, frequency=0.5, presence=0.25)
    np.testing.assert_allclose(out, [[1.0, 2.0 - 1.0 - 0.25, 3.0 - 0.5 - 0.25]])


def test_temperature_and_top_k_match_transformers_warpers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20))
    cfg = S.SamplingConfig(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05)
    ours = S.process_logits(logits, cfg)
    t = torch.tensor(logits)
    ids = torch.zeros((3, 1), dtype=torch.long)
    for proc in (transformers.TemperatureLogitsWarper(0.7), transformers.TopKLogitsWarper(6),
                 transformers.TopPLogitsWarper(0.8), transformers.MinPLogitsWarper(0.05)):
        t = proc(ids, t)
    theirs = t.numpy()
    assert (np.isfinite(ours) == np.isfinite(theirs)).all()
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)])


def test_pick_draws_from_the_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.tile([[0.1, 0.6, 0.3]], (20000, 1)))
    draws = S.pick(logits, 1.0, rng)
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.02)
    assert (S.pick(np.array([[-np.inf, 0.0, -np.inf]]), 1.0, rng) == 1).all()


# --------------------------------------------------------------------------- SamplingConfig

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty",
                                   "frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nan_and_inf_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
        S.SamplingConfig(**{field: value})


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0),
                                dict(top_p=1.5), dict(min_p=2.0), dict(repetition_penalty=0),
                                dict(top_k=2.5), dict(temperature="hot"), dict(top_k=True)])
def test_out_of_range_and_wrong_types_are_config_errors(kw):
    with pytest.raises(ConfigError):
        S.SamplingConfig(**kw)


def test_check_names_every_problem_and_the_config_is_frozen():
    cfg = S.SamplingConfig(temperature=0.5, top_k=np.int64(3), top_p=1)
    assert cfg.top_p == 1.0 and isinstance(cfg.top_p, float)
    cfg.check()
    with pytest.raises(Exception):
        cfg.temperature = 2.0  # frozen: a checked config stays valid
    with pytest.raises(ConfigError, match="temperature.*top_k"):
        S.SamplingConfig(temperature=-1, top_k=0)


def test_build_takes_a_config_or_keywords_not_both():
    cfg = S.SamplingConfig(top_k=5)
    assert S.SamplingConfig.build(cfg) is cfg
    assert S.SamplingConfig.build(temperature=0) == S.SamplingConfig(temperature=0)
    with pytest.raises(ConfigError, match="not both"):
        S.SamplingConfig.build(cfg, temperature=0)
    with pytest.raises(ConfigError, match="unknown sampling option.*top_q"):
        S.SamplingConfig.build(top_q=0.5)


def test_nan_never_reaches_the_samplers():
    """The old check let NaN through (every comparison with it is False) and top_p=nan
    then removed every token: sampling returned nothing."""
    for field in ("top_p", "min_p", "temperature"):
        with pytest.raises(ConfigError):
            S.process_logits(np.zeros((1, 4)), S.SamplingConfig(**{field: NAN}))


# --------------------------------------------------------------------------- one softmax


def test_one_array_softmax_serves_the_samplers_and_the_op():
    import tinylm
    from tinylm import generate as G

    x = np.array([[1000.0, 999.0, -np.inf], [0.0, 0.0, 0.0]])
    p = ops_nn.softmax_array(x)
    np.testing.assert_allclose(p, [[1 / (1 + math.e ** -1), 1 / (1 + math.e), 0], [1 / 3] * 3])
    np.testing.assert_allclose(np.exp(ops_nn.log_softmax_array(x)), p)
    assert ops_nn.log_softmax_array(x)[0, 2] == -np.inf
    t = tinylm.tensor(x[1:].astype(np.float32))
    np.testing.assert_allclose(t.softmax().numpy(), ops_nn.softmax_array(x[1:]), rtol=1e-6)
    empty = np.full((2, 3), -np.inf)  # every entry removed: 0 throughout, not NaN
    assert (ops_nn.softmax_array(empty) == 0).all()
    assert (ops_nn.log_softmax_array(empty) == -np.inf).all()
    y = np.array([[1.0, 2.0], [3.0, 3.0]])
    expect = ops_nn.softmax_array(y.T, axis=0).T
    assert ops_nn.softmax_array(y, out=y) is y and np.allclose(y, expect)
    for module in (S, G):  # no private copies left beside it
        assert not hasattr(module, "softmax") and not hasattr(module, "log_softmax")
        assert not hasattr(module, "_probs")
