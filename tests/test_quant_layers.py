"""Quantized layers against outside oracles: QuantLinear's forward equals x @ W.T with W
dequantized by the `gguf` package (`gguf.quants`) for the GGUF formats (tinylm's own
reference for int8 / NF4, itself checked against bitsandbytes in
test_quant_int8_nf4.py); the input gradient equals torch's on that float weight and
finite differences; no float32 copy of the weight is held, in the buffers or while
computing; embeddings gather packed rows; a tied head reads its embedding's bytes."""

import tracemalloc
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinylm import Tensor, nn, quant, testing
from tinylm.autograd import no_grad
from tinylm.errors import TinyLMError
from tinylm.quant import QuantEmbedding, QuantLinear, QuantTiedHead, kernels

gguf = pytest.importorskip("gguf")
from gguf import quants as gq  # noqa: E402
from gguf.constants import GGMLQuantizationType as T  # noqa: E402

FORMATS = ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "int8", "nf4", "nf4-dq", "f16", "bf16"]
ROW_BLOCK = {"q4_k": 256, "q6_k": 256, "nf4": 64, "nf4-dq": 64}


def packed_weight(fmt, out, n_in, seed=0):
    """(raw bytes, their float32 dequantization by the oracle) for a random weight."""
    rng = np.random.default_rng(seed)
    f = quant.get_format(fmt)
    if not f.can_quantize:  # Q4_K / Q6_K: random bytes with sane half scales
        raw = rng.integers(0, 256, (out * n_in // 256, f.block_bytes), dtype=np.uint8)
        scales = slice(0, 4) if fmt == "q4_k" else slice(208, 210)
        n_half = (scales.stop - scales.start) // 2
        raw[:, scales] = (rng.uniform(0.001, 0.05, (raw.shape[0], n_half))
                          .astype("<f2").view(np.uint8))
        raw = raw.reshape(out, -1)
    else:
        raw = f.quantize(rng.standard_normal((out, n_in)).astype(np.float32))
    if f.ggml_type:
        ref = gq.dequantize(np.asarray(raw).reshape(out, -1), T[f.ggml_type])
    else:
        ref = f.dequantize(raw, (out, n_in))
    return raw, np.asarray(ref, np.float32).reshape(out, n_in)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# --------------------------------------------------------------------------- forward / backward


@settings(max_examples=40)
@given(fmt=st.sampled_from(FORMATS), out=st.integers(1, 40), blocks=st.integers(1, 3),
       lead=st.sampled_from([(1,), (1, 1), (2, 1), (1, 3), (1, 4), (2, 3), (1, 7)]),
       bias=st.booleans(), tile=st.sampled_from([2048, 1 << 20]), seed=st.integers(0, 99))
def test_forward_and_input_gradient_match_the_dequantized_weight(fmt, out, blocks, lead, bias,
                                                                 tile, seed):
    torch = pytest.importorskip("torch")
    n_in = ROW_BLOCK.get(fmt, 32) * blocks
    raw, w = packed_weight(fmt, out, n_in, seed)
    rng = np.random.default_rng(seed + 1)
    b = rng.standard_normal(out).astype(np.float32) if bias else None
    layer = QuantLinear.from_packed(fmt, raw, n_in, out, bias=b)
    x = rng.standard_normal((*lead, n_in)).astype(np.float32)      # decode (T <= 4) and prefill
    g = rng.standard_normal((*lead, out)).astype(np.float32)
    with mock.patch.object(kernels, "TILE_BYTES", tile):             # many tiles, a short last one
        xt = Tensor(x, requires_grad=True)
        y = layer(xt)
        (y * Tensor(g)).sum().backward()
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ty = tx @ torch.tensor(w, dtype=torch.float64).T
    if bias:
        ty = ty + torch.tensor(b, dtype=torch.float64)
    (ty * torch.tensor(g, dtype=torch.float64)).sum().backward()
    assert y.shape == (*lead, out) and y.dtype == np.float32
    # float32 sums of n_in products: their error scales with the sum of |terms|, which
    # cancellation can make far larger than the result (one output, a few blocks)
    y_scale = np.abs(x) @ np.abs(w).T + (np.abs(b) if bias else 0)
    assert np.abs(y.numpy() - ty.detach().numpy()).max() < 1e-5 * y_scale.max()
    gx_scale = np.abs(g) @ np.abs(w)
    assert np.abs(xt.grad - tx.grad.numpy()).max() < 1e-5 * gx_scale.max()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "nf4", "int8"])
def test_gradcheck_float64_input(fmt):
    n_in = ROW_BLOCK.get(fmt, 32)
    raw, _ = packed_weight(fmt, 3, n_in)
    layer = QuantLinear.from_packed(fmt, raw, n_in, 3, bias=np.float32([0.5, -1, 2]))
    x = np.random.default_rng(0).standard_normal((2, n_in))
    testing.gradcheck(lambda t: layer(t) * layer(t), x)


def test_weights_are_frozen_and_bias_gets_no_gradient():
    raw, _ = packed_weight("q8_0", 4, 32)
    layer = QuantLinear.from_packed("q8_0", raw, 32, 4, bias=np.zeros(4))
    assert list(layer.parameters()) == [layer.bias] and not layer.bias.requires_grad
    x = Tensor(np.ones((1, 32), np.float32), requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad is None and x.grad is not None


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "int8", "nf4"])
def test_from_linear_and_dequantize_round_trip(fmt):
    linear = nn.Linear(64, 24)
    layer = QuantLinear.from_linear(linear, fmt)
    f = quant.get_format(fmt)
    w = f.dequantize(f.quantize(linear.weight.numpy()), (24, 64))
    np.testing.assert_array_equal(layer.packed_bytes().reshape(-1),
                                  f.quantize(linear.weight.numpy()).reshape(-1))
    back = layer.dequantize()
    assert isinstance(back, nn.Linear)
    np.testing.assert_array_equal(back.weight.numpy(), w)
    np.testing.assert_array_equal(back.bias.numpy(), linear.bias.numpy())


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_decoding_keeps_the_block_scales_until_the_buffers_change(fmt):
    a, b = nn.Linear(64, 24, bias=False), nn.Linear(64, 24, bias=False)
    layer = QuantLinear.from_linear(a, fmt)
    x = Tensor(np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32))
    f = quant.get_format(fmt)
    ref = lambda lin: x.data @ f.dequantize(f.quantize(lin.weight.numpy()), (24, 64)).T  # noqa
    with no_grad():
        np.testing.assert_allclose(layer(x).data, ref(a), rtol=1e-5, atol=1e-5)
        cached = layer.packed.cache["scales"]
        assert layer.packed.cache["scales"] is cached  # computed once, kept
        layer.load_state_dict(QuantLinear.from_linear(b, fmt).state_dict())
        np.testing.assert_allclose(layer(x).data, ref(b), rtol=1e-5, atol=1e-5)
    assert layer.packed.cache["scales"] is not cached
    assert "scales" not in layer.state_dict() and len(layer.state_dict()) == 1


def test_from_packed_keeps_a_gguf_array_without_a_copy():
    raw, _ = packed_weight("q4_1", 16, 64)
    layer = QuantLinear.from_packed("q4_1", raw, 64, 16)
    assert np.shares_memory(layer.qweight, raw)


def test_bad_packed_data_is_one_clear_error():
    raw, _ = packed_weight("q4_0", 4, 32)
    with pytest.raises(quant.QuantError, match="bytes"):
        QuantLinear.from_packed("q4_0", raw[:, :-1], 32, 4)
    with pytest.raises(quant.QuantError, match="multiple"):
        QuantLinear.from_packed("q4_0", raw, 31, 4)
    layer = QuantLinear.from_packed("q4_0", raw, 32, 4)
    with pytest.raises(quant.QuantError, match="features"):
        layer(Tensor(np.ones((1, 16), np.float32)))


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_float32_copy_of_the_weight_is_held(fmt):
    out, n_in = 48, 512
    raw, _ = packed_weight(fmt, out, n_in)
    layer = QuantLinear.from_packed(fmt, raw, n_in, out)
    arrays = [*layer._buffers.values(), *(p.data for p in layer.parameters()),
              *(v for v in vars(layer).values() if isinstance(v, np.ndarray))]
    assert sum(a.nbytes for a in arrays) == quant.get_format(fmt).nbytes((out, n_in))
    assert layer.qweight.dtype.kind in "iu"                   # bytes or codes, never floats
    assert not any(a.dtype.kind == "f" and a.size >= out * n_in // 32 for a in arrays)


@pytest.mark.parametrize("fmt,tokens", [("q4_1", 1), ("q4_1", 64), ("q8_0", 1), ("nf4", 8)])
def test_computing_allocates_a_tile_not_the_weight(fmt, tokens):
    out, n_in = 4096, 1024                                       # 16 MB as float32
    raw, _ = packed_weight(fmt, out, n_in)
    layer = QuantLinear.from_packed(fmt, raw, n_in, out)
    x = Tensor(np.random.default_rng(0).standard_normal((1, tokens, n_in)).astype(np.float32))
    with no_grad():
        layer(x)                                                 # warm the caches (tables)
        tracemalloc.start()
        layer(x)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 4 * kernels.TILE_BYTES + 8 * tokens * (out + n_in) < 4 * out * n_in / 2


# --------------------------------------------------------------------------- embeddings, tied head


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_gathers_packed_rows(fmt):
    dim = ROW_BLOCK.get(fmt, 32) * 2
    raw, w = packed_weight(fmt, 50, dim)
    emb = QuantEmbedding.from_packed(fmt, raw, 50, dim)
    ids = np.array([[3, 0, 49], [7, 7, 1]])
    np.testing.assert_array_equal(emb(ids).numpy(), w[ids])
    np.testing.assert_array_equal(emb.dequantize().weight.numpy(), w)
    with pytest.raises(TinyLMError, match="outside"):
        emb(np.array([50]))


def test_tied_head_multiplies_by_the_embeddings_own_bytes():
    raw, w = packed_weight("q4_1", 40, 64)
    emb = QuantEmbedding.from_packed("q4_1", raw, 40, 64)
    head = QuantTiedHead(emb)
    h = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    assert rel(head(Tensor(h)).numpy(), h.astype(np.float64) @ w.T) < 1e-5
    assert not head.state_dict() and head.embedding is emb
    assert np.array_equal(head.dequantize().weight.numpy(), w)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("tokens", [1, 6])
@pytest.mark.parametrize("bad", [np.inf, np.nan, -np.inf])
def test_a_non_finite_scale_spoils_exactly_its_output_row(fmt, tokens, bad):
    raw, _ = packed_weight(fmt, 12, 64)
    raw = raw.copy()
    raw[5, 0:2] = np.float16([bad]).view(np.uint8)                 # block 0 of row 5: d
    with np.errstate(all="ignore"):                                # inf * 0: NaN, by the rules
        w = gq.dequantize(raw, T[quant.get_format(fmt).ggml_type])
    layer = QuantLinear.from_packed(fmt, raw, 64, 12)
    x = np.random.default_rng(0).standard_normal((tokens, 64)).astype(np.float32)
    with no_grad():
        y = layer(Tensor(x)).numpy()
    with np.errstate(all="ignore"):
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(ref))
    assert not np.isfinite(y[:, 5]).any()
    ok = np.isfinite(ref)
    assert rel(y[ok], ref[ok]) < 1e-5


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "int8", "nf4", "nf4-dq", "q6_k"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_rows_split_over_threads_give_the_one_thread_result(fmt, tokens):
    from tinylm import threads

    out, n_in = 1000, 512                                          # past PARALLEL_WEIGHTS
    raw, w = packed_weight(fmt, out, n_in)
    packed = kernels.pack(fmt, raw, (out, n_in))
    x = np.random.default_rng(0).standard_normal((tokens, n_in)).astype(np.float32)
    with threads.blas_threads(1):
        one = kernels.matmul(x, packed)
    with mock.patch.object(threads, "cpu_threads", lambda: 3):
        three = kernels.matmul(x, packed)
    np.testing.assert_allclose(three, one, rtol=1e-6, atol=1e-6 * np.abs(one).max())
    assert rel(three, x.astype(np.float64) @ w.T) < 1e-5
