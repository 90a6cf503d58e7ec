"""Inverse frequencies and attention factors against transformers' own functions
(``ROPE_INIT_FUNCTIONS["yarn" | "dynamic"]``).

The one float32 step whose rounding is not fixed by IEEE is ``pow``: ours is correctly
rounded, PyTorch's vectorised one (Sleef) is within 1 ulp of that. So the tests check
(1) our pow against PyTorch's, to 1 ulp; (2) with PyTorch's pow put in place of ours,
the frequencies are transformers' bit for bit (every other step is the same float32
operation in the same order); (3) with our own pow, within 2 ulps (a 1-ulp pow
difference can move 1/x or f/s by one more); the attention factors exactly.
"""

import contextlib
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinylm_rope_scaling import (
    YarnParams, frequencies, dynamic_ntk_inv_freq, yarn_attention_factor, yarn_correction_range,
    yarn_inv_freq, yarn_mscale,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def ulps(a, b) -> int:
    """The largest distance in float32 steps between two float32 arrays (same signs)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape and (np.sign(a) == np.sign(b)).all()
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32)).max())


def torch_powf(base, exponent):
    """PyTorch's float32 pow, called the way transformers calls it: a Python float
    exponent as a scalar, an array exponent as a float32 tensor."""
    b = torch.tensor(np.asarray(base, np.float32))
    if isinstance(exponent, float):
        return (b ** exponent).numpy()
    return (b ** torch.from_numpy(np.asarray(exponent, np.float32))).numpy()


@contextlib.contextmanager
def torch_pow():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(frequencies, "powf", torch_powf)
        yield


def test_pow_is_within_one_ulp_of_torch():
    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 1e9, 20000).astype(np.float32)
    exponent = rng.uniform(-1.0, 1.5, 20000).astype(np.float32)
    assert ulps(frequencies.powf(base, exponent), torch_powf(base, exponent)) <= 1
    for b, e in zip(base[:500], exponent[:500].astype(np.float64)):  # a double exponent
        assert ulps(frequencies.powf(b, float(e)), torch_powf(b, float(e))) == 0


def hf_config(head_dim, max_positions, rope, fraction=1.0):
    rope = {"rope_theta": 10000.0, **rope}
    if fraction != 1.0:
        rope["partial_rotary_factor"] = fraction
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                                    head_dim=head_dim, max_position_embeddings=max_positions,
                                    rope_parameters=rope)


yarn_cases = st.fixed_dictionaries({
    "head_dim": st.sampled_from([8, 16, 64, 128]),
    "base": st.sampled_from([10000.0, 500000.0, 1e6, 12345.5]),
    "factor": st.one_of(st.sampled_from([1.0, 2.0, 4.0, 8.0, 40.0]),
                        st.floats(1.0, 64.0, allow_nan=False)),
    "original": st.sampled_from([16, 100, 2048, 4096, 8192]),
    "beta_fast": st.sampled_from([None, 32, 16.0, 64]),
    "beta_slow": st.sampled_from([None, 1, 2.0, 0.5]),
    "mscale": st.sampled_from([(None, None), (0.707, 0.707), (1.0, 0.0), (1.0, 0.5)]),
    "truncate": st.booleans(),
    "fraction": st.sampled_from([1.0, 0.5]),
})


@given(yarn_cases)
def test_yarn_is_transformers(case):
    rope = {"rope_type": "yarn", "factor": case["factor"], "rope_theta": case["base"],
            "original_max_position_embeddings": case["original"], "truncate": case["truncate"]}
    for key in ("beta_fast", "beta_slow"):
        if case[key] is not None:
            rope[key] = case[key]
    mscale, mscale_all_dim = case["mscale"]
    if mscale is not None:
        rope.update(mscale=mscale, mscale_all_dim=mscale_all_dim)
    config = hf_config(case["head_dim"], 4 * case["original"], rope, case["fraction"])
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    dim = int(case["head_dim"] * case["fraction"])
    params = YarnParams(**{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")})
    ours = yarn_inv_freq(case["base"], dim, case["factor"], params)
    assert ours.dtype == np.float32 and ulps(ours, theirs.numpy()) <= 2
    with torch_pow():
        assert ulps(yarn_inv_freq(case["base"], dim, case["factor"], params), theirs.numpy()) == 0
    ours_factor = yarn_attention_factor(case["factor"], mscale, mscale_all_dim)
    assert type(ours_factor) is type(their_factor) and ours_factor == their_factor


def test_yarn_given_attention_factor_and_missing_factor():
    """attention_factor given is used as is; factor None is max_positions / original
    (transformers' DeepSeek-V3 rule), here through the scheme's config path."""
    from tinylm_rope_scaling import YaRNRoPE

    rope = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64,
            "attention_factor": 0.75}
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config(32, 512, rope))
    ours = YaRNRoPE(32, max_positions=512, factor=None, original_max_position_embeddings=64,
                    attention_factor=0.75)
    assert ours.factor == 8.0 and ours.attention_factor == their_factor == 0.75
    assert ulps(ours.inv_freq, theirs.numpy()) <= 2


@pytest.mark.parametrize("factor, expected", [(1.0, 1.0), (0.5, 1.0), (4.0, 0.1 * math.log(4) + 1),
                                              (16.0, 0.1 * math.log(16) + 1)])
def test_attention_factor_is_point_one_ln_s_plus_one(factor, expected):
    assert yarn_mscale(factor) == expected == yarn_attention_factor(factor)


def test_correction_range_brackets_the_ramp():
    """With L = 4096, base 1e4, dim 128: pair i turns L * base^(-2i/128) / 2 pi times,
    32 times at i ~ 20.9 and once at i ~ 45.0, so the ramp runs over pairs 20..46."""
    low, high = yarn_correction_range(32, 1, 128, 10000.0, 4096)
    assert (low, high) == (20, 46)
    turns = lambda i: 4096 * 10000.0 ** (-2 * i / 128) / (2 * math.pi)  # noqa: E731
    assert turns(20) > 32 > turns(21) and turns(45) > 1 > turns(46)
    inv = yarn_inv_freq(10000.0, 128, 8.0, YarnParams(4096))
    plain = np.float32(1) / frequencies.powf(10000.0, np.arange(0, 128, 2).astype(np.float32) / 128)
    np.testing.assert_array_equal(inv[:20], plain[:20])  # fast pairs: kept
    np.testing.assert_allclose(inv[46:], plain[46:] / 8, rtol=2e-7)  # slow pairs: divided
    assert ((inv[21:46] < plain[21:46]) & (inv[21:46] > plain[21:46] / 8)).all()


@given(st.sampled_from([8, 16, 64, 128]), st.sampled_from([10000.0, 500000.0, 12345.5]),
       st.floats(1.0, 32.0), st.sampled_from([16, 100, 2048]), st.integers(1, 40000))
def test_dynamic_ntk_is_transformers(head_dim, base, factor, original, seq_len):
    """At init (seq_len None, Python floats) and at run time (a float32 tensor
    seq_len = max(position_ids) + 1, as dynamic_rope_update passes it)."""
    config = hf_config(head_dim, original, {"rope_type": "dynamic", "factor": factor,
                                            "rope_theta": base})
    init, attention = ROPE_INIT_FUNCTIONS["dynamic"](config)
    assert attention == 1.0
    theirs = [init.numpy()]
    ours = [lambda: dynamic_ntk_inv_freq(base, head_dim, factor, original)]
    if seq_len > original:  # transformers recomputes only then (else keeps init's)
        grown, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=torch.tensor(seq_len))
        theirs.append(grown.numpy())
        ours.append(lambda: dynamic_ntk_inv_freq(base, head_dim, factor, original, seq_len))
        assert (ours[1]()[1:] < init.numpy()[1:]).all()  # every pair but the first slows
    for mine, their in zip(ours, theirs):
        assert ulps(mine(), their) <= 2
        with torch_pow():
            assert ulps(mine(), their) == 0


@given(st.sampled_from([8, 16, 32, 64, 128, 256]),
       st.one_of(st.sampled_from([10000.0, 500000.0, 1e6]), st.floats(100.0, 1e7)),
       st.floats(1.0, 64.0), st.sampled_from([64, 2048, 8192]))
def test_every_difference_from_transformers_is_torch_pow(head_dim, base, factor, original):
    """Where the second ulp comes from: every pair where our frequencies differ from
    transformers' is a pair where PyTorch's float32 pow differs from ours (correctly
    rounded). PyTorch's CPU pow is SLEEF's vectorised ``powf_u10`` (error bound 1 ulp)
    over whole SIMD blocks and libm's ``powf`` for the rest (measured with torch 2.13
    on AVX-512: arrays under 32 floats all go to libm, 27 of 40,000 random pairs off
    correct rounding; the vectorised part 723 of 40,000), and a 1-ulp pow difference
    becomes 2 ulps of ``1 / x`` where x's significand is just above a power of two.
    Matching it bit for bit would mean reproducing SLEEF's algorithm and PyTorch's
    choice of block, so the bound stays 2 ulps."""
    rope = {"rope_type": "yarn", "factor": factor, "rope_theta": base,
            "original_max_position_embeddings": original}
    theirs = ROPE_INIT_FUNCTIONS["yarn"](hf_config(head_dim, 4 * original, rope))[0].numpy()
    ours = yarn_inv_freq(base, head_dim, factor, YarnParams(original, factor=factor))
    exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    pow_differs = frequencies.powf(base, exponents) != torch_powf(np.float32(base), exponents)
    assert not ((ours != theirs) & ~pow_differs).any()
    assert ulps(ours, theirs) <= 2
