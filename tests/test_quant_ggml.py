"""The GGUF weight formats against the `gguf` package's NumPy reference (`gguf.quants`,
llama.cpp's maintainers' port of ggml-quants.c): quantize and dequantize bit for bit."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinylm import quant
from tinylm.formats.ggml_types import GGML_TYPES
from tinylm.quant import QuantError

gguf = pytest.importorskip("gguf")
from gguf import quants as ref  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402

LEGACY = ["q8_0", "q4_0", "q4_1"]


def _same_bytes_and_values(name, x):
    """tinylm's bytes equal gguf's for x, and both dequantize the same (NaN where gguf has)."""
    fmt = quant.get_format(name)
    with np.errstate(all="ignore"):
        theirs = ref.quantize(x, T[fmt.ggml_type])
        ours = fmt.quantize(x)
        assert ours.shape == theirs.shape and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, theirs)
        back = fmt.dequantize(ours, x.shape)
        np.testing.assert_array_equal(back, ref.dequantize(theirs, T[fmt.ggml_type]))
    assert back.dtype == np.float32 and back.shape == x.shape


@st.composite
def _weights(draw, block=32):
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    shape = (*lead, block * draw(st.integers(1, 6)))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-30, 1e-6, 0.02, 1.0, 300.0, 6e4]))
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("name", LEGACY)
@given(x=_weights())
def test_legacy_formats_are_bit_exact_with_gguf(name, x):
    _same_bytes_and_values(name, x)


def _adversarial_blocks():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(32).astype(np.float32)
    blocks = {
        "zeros": np.zeros(32), "negative zeros": -np.zeros(32), "constant": np.full(32, 0.7),
        "negative constant": np.full(32, -3.0), "one huge": np.r_[base[:31], 3e38],
        "one huge negative": np.r_[-3e38, base[1:]], "huge range": np.r_[3e38, -3e38, base[2:]],
        "half overflows f16": base * 1e7, "f16 underflows": base * 1e-9,
        "subnormals": base * 1e-40, "smallest subnormal": np.r_[1e-45, np.zeros(31)],
        "min normal": base * np.float32(1.2e-38), "ties": np.arange(32) - 15.5,
        "max then equal min": np.r_[-2.0, 2.0, base[2:]],
        "+inf": np.r_[base[:5], np.inf, base[6:]], "-inf": np.r_[-np.inf, base[1:]],
        "both infs": np.r_[np.inf, -np.inf, base[2:]], "nan": np.r_[base[:9], np.nan, base[10:]],
        "all nan": np.full(32, np.nan), "nan and inf": np.r_[np.nan, np.inf, base[2:]],
    }
    return {k: np.asarray(v, np.float32).reshape(1, 32) for k, v in blocks.items()}


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("case", sorted(_adversarial_blocks()))
def test_adversarial_blocks_follow_gguf(name, case):
    """The stated rules (zero -> scale 0; NaN -> NaN scale, codes 0; inf -> inf scale,
    non-finite codes 0; overflowing scales -> inf) are exactly gguf.quants' results."""
    _same_bytes_and_values(name, _adversarial_blocks()[case])


def test_stated_nan_and_inf_rules():
    q8, q40 = quant.get_format("q8_0"), quant.get_format("q4_0")
    x = np.linspace(-1, 1, 32, dtype=np.float32)[None]
    nan, inf = x.copy(), x.copy()
    nan[0, 3], inf[0, 3] = np.nan, np.inf
    raw = q8.quantize(nan)
    assert np.isnan(raw[:, :2].copy().view("<f2")).all() and not raw[:, 2:].any()
    assert np.isnan(q8.dequantize(raw, x.shape)).all()
    raw = q40.quantize(inf)
    d = raw[:, :2].copy().view("<f2")[0, 0]
    assert np.isinf(d) and d < 0                      # d = max / -8 with max = +inf
    back = q40.dequantize(raw, x.shape)[0]
    assert back[3] == np.inf and np.isnan(np.delete(back, 3)).all()


def test_round_half_away_from_zero_is_exact():
    q8 = quant.get_format("q8_0")
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [127.0, 0.5, -0.5, np.nextafter(np.float32(0.5), np.float32(0))]
    codes = q8.quantize(x)[0, 2:].view(np.int8)
    assert codes[:4].tolist() == [127, 1, -1, 0]      # d = 1: ties away, just-below-half down


@pytest.mark.parametrize("name", ["f16", "bf16"])
def test_float_formats_match_gguf_on_every_kind_of_bit_pattern(name):
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    special = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, 3.4e38,
                          65504, 65520, 1.00390625, 1.01171875]).view(np.uint32)
    x = np.concatenate([bits, special]).view(np.float32).reshape(-1, 4)
    fmt = quant.get_format(name)
    with np.errstate(all="ignore"):
        theirs = ref.quantize(x, T[fmt.ggml_type])
        ours = fmt.quantize(x)
    np.testing.assert_array_equal(ours, np.ascontiguousarray(theirs).view(np.uint8))
    back = fmt.dequantize(ours, x.shape)
    np.testing.assert_array_equal(back, ref.dequantize(theirs, T[fmt.ggml_type]))
    assert np.array_equal(fmt.dequantize(theirs, x.shape), back, equal_nan=True)  # typed raw


def test_bf16_rounds_ties_to_even_and_keeps_nan_quiet():
    bf16 = quant.get_format("bf16")
    x = np.float32([1.00390625, 1.01171875, np.nan, -np.inf, 3.4e38])
    top = bf16.quantize(x).view("<u2").tolist()
    assert top[:2] == [0x3F80, 0x3F82]                # both ties, to the even neighbour
    assert top[2] & 0x7FC0 == 0x7FC0 and top[3] == 0xFF80 and top[4] == 0x7F80


def _random_kquant_blocks(name, n_blocks, seed):
    """Random bytes with finite half-precision scales (d, dmin) and the rest arbitrary."""
    fmt = quant.get_format(name)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, fmt.block_bytes), dtype=np.uint8)
    halves = rng.uniform(-2, 2, (n_blocks, 2)).astype("<f2").view(np.uint8)
    if name == "q4_k":
        raw[:, :4] = halves                           # d, dmin at bytes 0..3
    else:
        raw[:, 208:210] = halves[:, :2]               # d at bytes 208..209
    return raw


@pytest.mark.parametrize("name", ["q4_k", "q6_k"])
@given(rows=st.integers(1, 4), blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_kquants_dequantize_bit_exact_with_gguf(name, rows, blocks, seed):
    fmt = quant.get_format(name)
    raw = _random_kquant_blocks(name, rows * blocks, seed).reshape(rows, -1)
    ours = fmt.dequantize(raw, (rows, 256 * blocks))
    theirs = ref.dequantize(raw, T[fmt.ggml_type])
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, theirs)


def test_kquants_cannot_quantize():
    with pytest.raises(QuantError, match="cannot write"):
        quant.get_format("q4_k").quantize(np.zeros((1, 256), np.float32))


def test_ggml_type_table_is_gguf_s():
    for t, (block, size) in GGML_QUANT_SIZES.items():
        ours = GGML_TYPES[int(t)]
        assert (ours.name, ours.block_size, ours.type_size) == (t.name, block, size)


def test_registry_sizes():
    for name, (bpw, block, nbytes) in {"q8_0": (8.5, 32, 34), "q4_0": (4.5, 32, 18),
                                       "q4_1": (5.0, 32, 20), "q4_k": (4.5, 256, 144),
                                       "q6_k": (6.5625, 256, 210), "f16": (16, 1, 2),
                                       "bf16": (16, 1, 2), "f32": (32, 1, 4)}.items():
        fmt = quant.get_format(name)
        assert (fmt.bits_per_weight, fmt.block_size, fmt.block_bytes) == (bpw, block, nbytes)
        assert fmt.nbytes((3, 512)) == 3 * 512 // block * nbytes
        assert quant.format_for_ggml_type(fmt.ggml_type) is fmt
    with pytest.raises(QuantError, match="unknown quantization format 'q3'"):
        quant.get_format("q3")
    with pytest.raises(QuantError, match="cannot dequantize GGML type IQ2_XXS"):
        quant.format_for_ggml_type("IQ2_XXS")


def test_shape_and_byte_errors_are_quant_errors():
    q8 = quant.get_format("q8_0")
    with pytest.raises(QuantError, match="multiple"):
        q8.quantize(np.zeros((2, 33), np.float32))
    with pytest.raises(QuantError, match="do not belong together"):
        q8.dequantize(np.zeros(33, np.uint8), (1, 32))
    with pytest.raises(QuantError, match="uint8"):
        q8.dequantize(np.zeros(34, np.int16), (1, 32))
    with pytest.raises(QuantError, match="numbers"):
        q8.quantize(np.array([["a"] * 32]))


def test_large_tensors_are_processed_in_chunks(monkeypatch):
    """Chunking is invisible: the same bytes whatever the chunk size."""
    from tinylm.quant import base
    x = np.random.default_rng(3).standard_normal((7, 96)).astype(np.float32)
    whole = quant.quantize(x, "q4_1")
    monkeypatch.setattr(base, "CHUNK_WEIGHTS", 64)
    np.testing.assert_array_equal(quant.quantize(x, "q4_1"), whole)
    np.testing.assert_array_equal(quant.dequantize(whole, "q4_1", x.shape),
                                  ref.dequantize(whole, T.Q4_1))
