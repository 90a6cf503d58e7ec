"""tinylm's own formats: int8 per-output-channel absmax and NF4 (with and without
double quantization), against their definitions and, where it installs, bitsandbytes."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinylm import quant
from tinylm.quant import QuantError
from tinylm.quant.blockwise8 import DYNAMIC_CODE, dequantize_blockwise8, quantize_blockwise8
from tinylm.quant.int8 import dequantize_int8, quantize_int8
from tinylm.quant.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4


@st.composite
def _matrix(draw, block=1):
    rows, cols = draw(st.integers(1, 6)), block * draw(st.integers(1, 5))
    seed, scale = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([1e-20, 0.02, 1, 1e4]))
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------- int8

@given(w=_matrix())
def test_int8_codes_and_scales_follow_the_definition(w):
    codes, scale = quantize_int8(w)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (w.shape[0],)
    np.testing.assert_array_equal(scale, np.abs(w).max(axis=1) / np.float32(127))
    assert np.abs(codes).max() <= 127
    err = np.abs(dequantize_int8(codes, scale) - w)
    assert (err <= scale[:, None] * 0.5000001 + 1e-30).all()     # rounding to nearest
    fmt = quant.get_format("int8")
    raw = fmt.quantize(w)
    assert raw.size == fmt.nbytes(w.shape) == w.size + 4 * w.shape[0]
    c2, s2 = fmt.split(raw, w.shape)
    np.testing.assert_array_equal(c2, codes)
    np.testing.assert_array_equal(s2, scale)
    np.testing.assert_array_equal(fmt.dequantize(raw, w.shape), dequantize_int8(codes, scale))


def test_int8_zero_rows_and_extremes():
    w = np.zeros((3, 4), np.float32)
    w[1] = [1.27, -0.635, 0.0, 0.005]
    w[2] = [-3e38, 3e38, 1.0, 0.0]
    codes, scale = quantize_int8(w)
    assert scale[0] == 0 and not codes[0].any()
    assert codes[1].tolist() == [127, -64, 0, 1]       # -63.5 and 0.5 round away from zero
    assert codes[2, :2].tolist() == [-127, 127]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_refuses_non_finite(bad):
    w = np.ones((2, 4), np.float32)
    w[1, 2] = bad
    with pytest.raises(QuantError, match="NaN or inf"):
        quantize_int8(w)


# ---------------------------------------------------------------------------- NF4

def test_nf4_table_is_the_published_one():
    """QLoRA, Appendix E: 16 sorted values, -1 and 1 at the ends, an exact 0 at index 7,
    8 positive and 7 negative levels."""
    assert NF4_CODE.dtype == np.float32 and NF4_CODE.shape == (16,)
    assert (np.diff(NF4_CODE) > 0).all() and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert NF4_CODE[7] == 0 and (NF4_CODE > 0).sum() == 8
    assert float(NF4_CODE[8]) == pytest.approx(0.07958029955625534, abs=0)
    assert float(NF4_CODE[1]) == pytest.approx(-0.6961928009986877, abs=0)


@given(w=_matrix(block=64))
def test_nf4_codes_are_the_nearest_table_value(w):
    parts = quantize_nf4(w)
    blocks = w.reshape(-1, 64)
    np.testing.assert_array_equal(parts.absmax, np.abs(blocks).max(axis=1))
    s = np.clip(blocks * (np.float32(1) / np.maximum(parts.absmax, np.float32(1e-38)))[:, None],
                -1, 1)
    dist = np.abs(s[..., None] - NF4_CODE)                          # brute force over 16
    nearest = np.argmin(dist, axis=-1)                              # first = lower on ties
    packed = (nearest[:, 0::2] << 4 | nearest[:, 1::2]).astype(np.uint8).reshape(-1)
    np.testing.assert_array_equal(parts.codes, packed)
    fmt = quant.get_format("nf4")
    raw = fmt.quantize(w)
    assert raw.size == fmt.nbytes(w.shape) and fmt.bits_per_weight == 4.5
    np.testing.assert_array_equal(fmt.dequantize(raw, w.shape),
                                  NF4_CODE[nearest].reshape(w.shape) *
                                  np.repeat(parts.absmax, 64).reshape(w.shape))


def test_nf4_worked_example_and_byte_order():
    w = np.zeros((1, 64), np.float32)
    w[0, :3] = [2.0, 0.5, -2.0]
    parts = quantize_nf4(w)
    assert parts.codes[0] == (15 << 4 | 10) and parts.codes[1] >> 4 == 0   # first weight high
    back = dequantize_nf4(parts.codes, parts.absmax, w.shape)
    assert back[0, 1] == np.float32(0.24611230194568634) * 2


@given(w=_matrix(block=64))
def test_nf4_double_quant_round_trips_through_bytes(w):
    fmt = quant.get_format("nf4-dq")
    parts = quantize_nf4(w, double_quant=True)
    raw = fmt.quantize(w)
    assert raw.size == fmt.nbytes(w.shape)
    back = fmt.split(raw, w.shape)
    np.testing.assert_array_equal(back.codes, parts.codes)
    np.testing.assert_array_equal(back.block_absmax(), parts.block_absmax())
    absmax = np.abs(w.reshape(-1, 64)).max(axis=1)
    step = np.abs(absmax - parts.offset).max() * 0.02 + 1e-30        # the code's widest gap
    assert np.abs(parts.block_absmax() - absmax).max() <= step


def test_dynamic_code_properties():
    assert DYNAMIC_CODE.shape == (256,) and (np.diff(DYNAMIC_CODE) > 0).all()
    assert DYNAMIC_CODE[-1] == 1 and 0 in DYNAMIC_CODE
    v = np.float32([0.5, -0.25, 0.0, 1.0])
    idx, absmax = quantize_blockwise8(v)
    assert absmax.tolist() == [1.0]
    np.testing.assert_array_equal(np.abs(dequantize_blockwise8(idx, absmax) - v) <= 0.01, True)


def test_nf4_refuses_bad_input():
    with pytest.raises(QuantError, match="multiple"):
        quantize_nf4(np.zeros((2, 32), np.float32))
    with pytest.raises(QuantError, match="NaN or inf"):
        quantize_nf4(np.full((1, 64), np.nan, np.float32))


# ---------------------------------------------------------------------------- bitsandbytes

def _bnb():
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    return torch, functional


def test_nf4_equals_bitsandbytes_cpu():
    torch, F = _bnb()
    w = (np.random.default_rng(5).standard_normal((96, 320)) * 0.03).astype(np.float32)
    w[3] = 0                                                        # a zero block too
    q, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                               compress_statistics=False)
    parts = quantize_nf4(w)
    np.testing.assert_array_equal(state.code.numpy(), NF4_CODE)
    np.testing.assert_array_equal(q.numpy().reshape(-1), parts.codes)
    np.testing.assert_array_equal(state.absmax.numpy(), parts.absmax)
    np.testing.assert_array_equal(F.dequantize_4bit(q, state).numpy(),
                                  quant.dequantize(quant.quantize(w, "nf4"), "nf4", w.shape))


def test_nf4_double_quant_against_bitsandbytes_cpu():
    """Codes and the code table equal; the offset (a float32 mean: torch sums in another
    order) within an ulp; given bitsandbytes' offset, absmax2 equal and the 8-bit absmax
    index off by at most one, only at near-ties (bitsandbytes' compiled search is
    approximate there)."""
    torch, F = _bnb()
    np.testing.assert_array_equal(F.create_dynamic_map().numpy(), DYNAMIC_CODE)
    w = (np.random.default_rng(6).standard_normal((256, 512)) * 0.03).astype(np.float32)
    q, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                               compress_statistics=True)
    parts = quantize_nf4(w, double_quant=True)
    np.testing.assert_array_equal(q.numpy().reshape(-1), parts.codes)
    assert abs(float(state.offset) - float(parts.offset)) <= np.spacing(parts.offset)
    absmax = quantize_nf4(w).absmax
    idx, absmax2 = quantize_blockwise8(absmax - np.float32(state.offset))
    np.testing.assert_array_equal(state.state2.absmax.numpy(), absmax2)
    diff = state.absmax.numpy().astype(int) - idx.astype(int)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.01
