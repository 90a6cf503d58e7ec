"""tinylm/ops/matmul.py: matmul with NumPy's batch broadcasting and 1-D operands, and the
fused linear (x @ W.T + b)."""

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from op_helpers import check_device, check_torch

import tinylm.ops as F
from tinylm import testing
from tinylm.errors import ShapeError
from tinylm.tensor import Tensor

mm = importlib.import_module("tinylm.ops.matmul")  # (tinylm.ops.matmul is also a function)

# NumPy's own matmul signature: optional m and p make 1-D operands; batch dims broadcast
matmul_shapes = hnp.mutually_broadcastable_shapes(
    signature="(m?,n),(n,p?)->(m?,p?)", max_dims=3, max_side=3
).map(lambda bs: bs.input_shapes)


def ref_matmul(a, b):
    """Batched matmul written with einsum over explicitly broadcast operands."""
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    a2 = np.broadcast_to(a2, batch + a2.shape[-2:])
    b2 = np.broadcast_to(b2, batch + b2.shape[-2:])
    y = np.einsum("...ij,...jk->...ik", a2, b2)
    if a.ndim == 1:
        y = y[..., 0, :]
    if b.ndim == 1:
        y = y[..., 0]
    return y


@st.composite
def matmul_case(draw, dtype=np.float64):
    sa, sb = draw(matmul_shapes, label="shapes")
    return draw(testing.arrays(sa, dtype), label="a"), draw(testing.arrays(sb, dtype), label="b")


@given(matmul_case())
def test_matmul(case):
    a, b = case
    y = F.matmul(Tensor(a), Tensor(b))
    expected = ref_matmul(a, b)
    assert y.shape == expected.shape
    testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    testing.assert_close(Tensor(a) @ Tensor(b), expected, rtol=1e-12, atol=1e-12)
    testing.gradcheck(F.matmul, a, b)


@given(matmul_case())
def test_matmul_matches_torch(case):
    torch = pytest.importorskip("torch")
    a, b = case
    check_torch(torch, F.matmul, torch.matmul, a, b, rtol=1e-10, atol=1e-12)


def test_matmul_with_one_side_constant():
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5))
    testing.gradcheck(lambda t: F.matmul(t, Tensor(w)), a)
    testing.gradcheck(lambda t: F.matmul(Tensor(a), t), w)
    testing.gradcheck(lambda t: F.matmul(Tensor(w.T), t), a.swapaxes(1, 2).copy())
    testing.gradcheck(lambda t: F.matmul(t, Tensor(a)), rng.standard_normal((1, 5, 3)))


def test_matmul_with_numpy_operand():
    a, b = np.ones((2, 3)), np.arange(6.0).reshape(3, 2)
    x = Tensor(a, requires_grad=True)
    y = x @ b
    testing.assert_close(y, a @ b)
    z = b @ Tensor(np.ones((2, 2)))
    testing.assert_close(z, b @ np.ones((2, 2)))


def test_matmul_shape_mismatch():
    with pytest.raises(ShapeError, match="inner dimensions"):
        F.matmul(Tensor(np.ones((2, 3))), Tensor(np.ones((4, 2))))
    with pytest.raises(ShapeError, match="cannot multiply"):  # batch 5 vs 2
        F.matmul(Tensor(np.ones((5, 2, 3))), Tensor(np.ones((2, 3, 4))))


# --------------------------------------------------------------------------- linear


@st.composite
def linear_case(draw, dtype=np.float64):
    lead = draw(testing.shapes(min_dims=0, max_dims=2, max_side=3), label="lead")
    n_in, n_out = draw(st.integers(1, 4), label="in"), draw(st.integers(1, 4), label="out")
    x = draw(testing.arrays(lead + (n_in,), dtype), label="x")
    w = draw(testing.arrays((n_out, n_in), dtype), label="w")
    b = draw(st.one_of(st.none(), testing.arrays((n_out,), dtype)), label="b")
    return x, w, b


def _linear_inputs(x, w, b):
    return (x, w) if b is None else (x, w, b)


@given(linear_case())
def test_linear(case):
    x, w, b = case
    y = F.linear(Tensor(x), Tensor(w), None if b is None else Tensor(b))
    expected = np.einsum("...i,oi->...o", x, w) + (0 if b is None else b)
    testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    testing.gradcheck(F.linear, *_linear_inputs(x, w, b))


@given(linear_case())
def test_linear_matches_torch(case):
    torch = pytest.importorskip("torch")
    check_torch(torch, F.linear, torch.nn.functional.linear, *_linear_inputs(*case),
                rtol=1e-10, atol=1e-12)


@given(linear_case(dtype=np.float32))
def test_linear_float32_matches_torch(case):
    torch = pytest.importorskip("torch")
    check_torch(torch, F.linear, torch.nn.functional.linear, *_linear_inputs(*case),
                rtol=1e-5, atol=1e-5)


def test_linear_without_weight_gradient():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((2, 3)), rng.standard_normal((4, 3)), rng.standard_normal(4)
    testing.gradcheck(lambda t: F.linear(t, Tensor(w), Tensor(b)), x)
    testing.gradcheck(lambda t: F.linear(Tensor(x), Tensor(w), t), b)


def _few_rows_case(n, out, dtype, n_in=24):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, n_in)).astype(dtype)
    w, b = rng.standard_normal((out, n_in)).astype(dtype), rng.standard_normal(out).astype(dtype)
    return x, w, b


# row counts on both sides of FEW_ROWS and GEMM_TILED_ROWS; a partial last tile
@pytest.mark.parametrize("n,out", [
    (1, 2 * mm.TILE + 37), (2, 2 * mm.TILE + 37), (3, mm.TILE + 1),
    (mm.FEW_ROWS, 3 * mm.TILE + 5), (mm.FEW_ROWS + 1, 2 * mm.TILE + 37),
    (mm.FEW_ROWS + 1, mm.WIDE + 37), (mm.GEMM_TILED_ROWS, mm.WIDE + 37),
    (mm.GEMM_TILED_ROWS + 1, mm.WIDE + 37)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_few_rows_on_one_thread(n, out, dtype):
    """A decode step's products (a few rows, one BLAS thread) go through tiles of
    vecdot (or of GEMM for a wide weight): the values of the float64 product and of
    torch's linear, and torch's gradients (the backward is the GEMM's)."""
    torch = pytest.importorskip("torch")
    from tinylm.threads import blas_threads

    x, w, b = _few_rows_case(n, out, dtype)
    want = np.einsum("ni,oi->no", x.astype(np.float64), w.astype(np.float64)) + b
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    ty = torch.nn.functional.linear(tx, tw, tb)
    g = np.random.default_rng(9).standard_normal(ty.shape).astype(dtype)
    ty.backward(torch.from_numpy(g))
    tol = 1e-4 if dtype == np.float32 else 1e-11
    with blas_threads(1):
        assert mm._vecdot_pays(np, x, w) == hasattr(np, "vecdot")
        xs, ws, bs = (Tensor(a, requires_grad=True) for a in (x, w, b))
        y = F.linear(xs, ws, bs)
        y.backward(Tensor(g))
    assert y.dtype == dtype and y.shape == (n, out)
    testing.assert_close(y, want, rtol=tol, atol=tol)
    testing.assert_close(y, ty.detach().numpy(), rtol=tol, atol=tol)
    # The gradients are sums over `out` (x's, b's) or `n` (w's) products: against the
    # float64 answer each element within a float32 sum's rounding of its terms' size
    # (a cancelling element of x's gradient over 16421 terms is ~2e-4 off on both
    # sides, torch's included), and torch's within the same.
    g64, w64, x64 = g.astype(np.float64), w.astype(np.float64), x.astype(np.float64)
    exact = (g64 @ w64, g64.T @ x64, g64.sum(axis=0))
    size = (np.abs(g64) @ np.abs(w64), np.abs(g64).T @ np.abs(x64), np.abs(g64).sum(axis=0))
    eps = np.finfo(dtype).eps
    for ours, theirs, want, mag, k in zip((xs, ws, bs), (tx, tw, tb), exact, size,
                                          (out, n, n)):  # k: each element's term count
        bound = (2 + np.log2(k)) * eps * mag  # blocked / pairwise sums: far inside k eps
        for got in (ours.grad.data, theirs.grad.numpy()):
            got = np.asarray(got, dtype=np.float64)
            assert got.shape == want.shape
            assert (np.abs(got - want) <= bound).all(), \
                float((np.abs(got - want) / bound).max())


@pytest.mark.parametrize("n", [2, 3, mm.FEW_ROWS])
def test_linear_few_rows_equal_each_row_alone(n):
    """Up to FEW_ROWS rows, each row's outputs are those of the row alone, bit for bit
    (so batching decode steps does not change a greedy sequence's tokens)."""
    from tinylm.threads import blas_threads

    x, w, b = _few_rows_case(n, 2 * mm.TILE + 37, np.float32, n_in=64)
    with blas_threads(1):
        together = F.linear(Tensor(x), Tensor(w), Tensor(b)).data
        alone = np.concatenate([F.linear(Tensor(x[i:i + 1]), Tensor(w), Tensor(b)).data
                                for i in range(n)])
    assert np.array_equal(together, alone)


@pytest.mark.parametrize("lead", [(), (1, 1), (2, 1)])
def test_linear_leading_dims_one_thread(lead):
    """(..., in) inputs with few rows: flattened for the tiles, reshaped back."""
    from tinylm.threads import blas_threads

    rng = np.random.default_rng(2)
    x, w = rng.standard_normal(lead + (7,)), rng.standard_normal((5, 7))
    with blas_threads(1):
        y = F.linear(Tensor(x), Tensor(w))
        assert y.shape == lead + (5,)
        testing.assert_close(y, np.einsum("...i,oi->...o", x, w), rtol=1e-12, atol=1e-12)
        testing.gradcheck(F.linear, x, w)


def test_linear_more_threads_is_one_gemm(monkeypatch):
    """With more than one BLAS thread (vecdot would run on one), a non-contiguous
    weight, or mixed dtypes, the product is BLAS's own."""
    x, w, _ = _few_rows_case(2, mm.TILE + 3, np.float32)
    monkeypatch.setattr(mm, "cpu_threads", lambda: 2)
    assert not mm._vecdot_pays(np, x, w)
    assert np.array_equal(F.linear(Tensor(x), Tensor(w)).data, x @ w.T)
    monkeypatch.setattr(mm, "cpu_threads", lambda: 1)
    assert not mm._vecdot_pays(np, x, np.asfortranarray(w))
    assert not mm._vecdot_pays(np, x.astype(np.float64), w)


def test_linear_shape_mismatch():
    with pytest.raises(ShapeError, match="features"):
        F.linear(Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5))))


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("case", ["matmul", "linear"])
def test_matmul_on_device(device, case):
    rng = np.random.default_rng(4)
    if case == "matmul":
        a, b, v = rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((3, 4, 2)), rng.standard_normal(4)
        check_device(device, lambda x, y, z: F.matmul(x, y).sum() + F.matmul(x, z).sum()
                     + F.matmul(z, y).sum(), a, b, v, rtol=1e-12)
    else:
        x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
        check_device(device, F.linear, x, w, b, rtol=1e-12)
        check_device(device, F.linear, x, w, rtol=1e-12)
