"""tinylm/ops/matmul.py: matmul with NumPy's batch broadcasting and 1-D operands, and the
fused linear (x @ W.T + b)."""

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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lead", [(), (1,), (1, 1)])
def test_linear_one_row_on_one_thread(lead, dtype):
    """The decode step's product (one row, one BLAS thread) goes through vecdot: same
    values and gradients as the GEMM."""
    from tinylm.ops.matmul import _flat_rows, _one_row_on_one_core
    from tinylm.threads import blas_threads

    rng = np.random.default_rng(2)
    x = rng.standard_normal(lead + (7,)).astype(dtype)
    w, b = rng.standard_normal((5, 7)).astype(dtype), rng.standard_normal(5).astype(dtype)
    with blas_threads(1):
        if hasattr(np, "vecdot"):
            assert _one_row_on_one_core(np, _flat_rows(x), w)
        y = F.linear(Tensor(x), Tensor(w), Tensor(b))
        tol = 1e-5 if dtype == np.float32 else 1e-12
        testing.assert_close(y, np.einsum("...i,oi->...o", x, w) + b, rtol=tol, atol=tol)
        assert y.dtype == dtype and y.shape == lead + (5,)
        if dtype == np.float64:
            testing.gradcheck(F.linear, x, w, b)


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
