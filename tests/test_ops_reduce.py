"""tinylm/ops/reduce.py: sum, mean, max, min, var, logsumexp, argmax over every axis
spelling (None, int, negative int, tuple) and both keepdims."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from op_helpers import check_device, check_torch

import tinylm.ops as F
from tinylm import testing
from tinylm.errors import ShapeError
from tinylm.tensor import Tensor


def _axes_tuple(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))


def ref_logsumexp(x, axis, keepdims):
    # written without the max shift: the test inputs are bounded to [-3, 3]
    return np.log(np.exp(x).sum(axis=axis, keepdims=keepdims))


def ref_var(x, axis, keepdims, ddof):
    axes = _axes_tuple(axis, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes]))
    d = x - x.sum(axis=axes, keepdims=True) / n
    return (d * d).sum(axis=axes, keepdims=keepdims) / (n - ddof)


# name: (tinylm op, NumPy reference, torch op)
REDUCTIONS = {
    "sum": (F.sum, np.sum, lambda t, x, d, k: t.sum(x, dim=d, keepdim=k)),
    "mean": (F.mean, np.mean, lambda t, x, d, k: t.mean(x, dim=d, keepdim=k)),
    "max": (F.max, np.max, lambda t, x, d, k: t.amax(x, dim=d, keepdim=k)),
    "min": (F.min, np.min, lambda t, x, d, k: t.amin(x, dim=d, keepdim=k)),
    "logsumexp": (F.logsumexp, ref_logsumexp, lambda t, x, d, k: t.logsumexp(x, dim=d, keepdim=k)),
    "var": (F.var, lambda x, axis, keepdims: ref_var(x, axis, keepdims, 0),
            lambda t, x, d, k: t.var(x, dim=d, keepdim=k, correction=0)),
}

# max/min without ties: the gradient at a tie is a choice (tested on its own below)
CASES = {name: testing.reduction_case(unique=name in ("max", "min")) for name in REDUCTIONS}


def _torch_dim(axis, ndim):
    if ndim == 0:
        return 0  # torch accepts dim 0 of a 0-d tensor
    return tuple(range(ndim)) if axis is None else axis


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@given(data=st.data())
def test_reduction_forward_and_gradcheck(name, data):
    op, ref, _ = REDUCTIONS[name]
    x, axis, keepdims = data.draw(CASES[name])
    y = op(Tensor(x), axis=axis, keepdims=keepdims)
    expected = np.asarray(ref(x, axis=axis, keepdims=keepdims))
    assert y.shape == expected.shape and y.dtype == np.float64
    testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    testing.gradcheck(lambda t: op(t, axis=axis, keepdims=keepdims), x)


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@given(data=st.data())
def test_reduction_matches_torch(name, data):
    torch = pytest.importorskip("torch")
    op, _, torch_op = REDUCTIONS[name]
    x, axis, keepdims = data.draw(CASES[name])
    dim = _torch_dim(axis, x.ndim)
    check_torch(torch, lambda t: op(t, axis=axis, keepdims=keepdims),
                lambda t: torch_op(torch, t, dim, keepdims), x, rtol=1e-10, atol=1e-12)


EVERY_AXIS = [None, 0, 1, 2, -1, -2, -3, (0,), (0, 1), (0, 2), (1, 2), (2, 0), (-1, 0), (0, 1, 2), ()]


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reduction_every_axis_and_keepdims(name):
    """Exhaustively, on one 3-D input without ties: every axis spelling x keepdims."""
    op, ref, _ = REDUCTIONS[name]
    x = np.random.default_rng(7).permutation(24).reshape(2, 3, 4) / 8.0 - 1.5
    for axis in EVERY_AXIS:
        for keepdims in (False, True):
            y = op(Tensor(x), axis=axis, keepdims=keepdims)
            expected = np.asarray(ref(x, axis=axis, keepdims=keepdims))
            assert y.shape == expected.shape, (axis, keepdims)
            testing.assert_close(y, expected, rtol=1e-12, atol=1e-12, msg=f"axis={axis} keepdims={keepdims}")
            testing.gradcheck(lambda t: op(t, axis=axis, keepdims=keepdims), x)


@given(case=testing.reduction_case(min_dims=1), ddof=st.sampled_from([0, 1]))
def test_var_with_ddof(case, ddof):
    x, axis, keepdims = case
    n = int(np.prod([x.shape[a] for a in _axes_tuple(axis, x.ndim)]))
    if n - ddof <= 0:
        return
    y = F.var(Tensor(x), axis=axis, keepdims=keepdims, ddof=ddof)
    testing.assert_close(y, np.var(x, axis=axis, keepdims=keepdims, ddof=ddof), rtol=1e-10, atol=1e-12)
    testing.gradcheck(lambda t: F.var(t, axis=axis, keepdims=keepdims, ddof=ddof), x)


def test_var_ddof1_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((3, 4, 2))
    for axis in (None, 1, (0, 2)):
        check_torch(torch, lambda t: F.var(t, axis=axis, ddof=1),
                    lambda t: t.var(dim=_torch_dim(axis, 3), correction=1), x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["sum", "mean", "max", "min", "var", "logsumexp"])
def test_tensor_methods(method):
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    for axis in (None, -1, (0, 2)):
        got = getattr(Tensor(x), method)(axis=axis, keepdims=True)
        expected = getattr(F, method)(Tensor(x), axis=axis, keepdims=True)
        np.testing.assert_array_equal(got.data, expected.data)


# --------------------------------------------------------------------------- ties, extremes


@pytest.mark.parametrize("op, torch_name", [(F.max, "amax"), (F.min, "amin")])
def test_max_min_ties_share_the_gradient_like_torch(op, torch_name):
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, 3.0, 3.0, -2.0], [0.5, 0.5, 0.5, 0.5], [-2.0, -2.0, 1.0, 1.0]])
    for axis in (None, 0, 1):
        dim = (0, 1) if axis is None else axis
        check_torch(torch, lambda t: op(t, axis=axis),
                    lambda t: getattr(torch, torch_name)(t, dim=dim), x, rtol=0, atol=1e-15)


def test_max_tie_gradient_values():
    x = Tensor(np.array([2.0, 5.0, 5.0, 1.0]), requires_grad=True)
    F.max(x).backward()
    testing.assert_close(x.grad, np.array([0.0, 0.5, 0.5, 0.0]))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf rows
def test_logsumexp_is_stable_for_large_and_infinite_inputs():
    x = Tensor(np.array([[1000.0, 1000.0], [-np.inf, -np.inf], [-np.inf, 0.0]]), requires_grad=True)
    y = F.logsumexp(x, axis=1)
    testing.assert_close(y, np.array([1000.0 + np.log(2), -np.inf, 0.0]))
    F.logsumexp(x[0], axis=0).backward()
    testing.assert_close(x.grad[0], np.array([0.5, 0.5]))


def test_argmax():
    x = np.random.default_rng(0).standard_normal((3, 5))
    for axis in (None, 0, 1, -1):
        got = F.argmax(Tensor(x), axis=axis)
        np.testing.assert_array_equal(got.data, np.argmax(x, axis=axis))
        assert got.creator is None and not got.requires_grad
    assert Tensor(x).argmax(axis=1).tolist() == np.argmax(x, axis=1).tolist()


def test_reduce_over_a_scalar():
    x = np.array(1.5)
    for axis in (None, 0, -1):
        y = F.sum(Tensor(x), axis=axis)
        assert y.shape == () and y.item() == 1.5
    testing.gradcheck(lambda t: F.sum(t, axis=0) * 3, x)


def test_float32_reductions_stay_float32():
    x = Tensor(np.ones((3, 4), np.float32), requires_grad=True)
    for op in (F.sum, F.mean, F.max, F.min, F.var, F.logsumexp):
        y = op(x, axis=1)
        assert y.dtype == np.float32
        y.sum().backward()
        assert x.grad.dtype == np.float32


@pytest.mark.parametrize("axis", [3, -4, (0, 5)])
def test_bad_axis_raises_shape_error(axis):
    x = Tensor(np.ones((2, 3, 4)))
    for op in (F.sum, F.mean, F.max, F.min, F.var, F.logsumexp):
        with pytest.raises(ShapeError, match="out of range"):
            op(x, axis=axis)


@given(st.integers(1, 140), st.integers(1, 3), st.booleans(), st.integers(0, 2**31))
def test_last_axis_max_equals_numpy_max(n, rows, holes, seed):
    # the halving tree of softmax's row max: the same values as ndarray.max, bit for
    # bit, for odd and even widths, -inf entries, whole -inf rows and NaNs
    from tinylm.ops.reduce import last_axis_max

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, 2, n)).astype(np.float32)
    if holes:
        a[rng.random(a.shape) < 0.3] = -np.inf
        a[0, 0, :] = -np.inf
        a.flat[rng.integers(a.size)] = np.nan
    got, want = last_axis_max(np, a), a.max(axis=-1, keepdims=True)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reductions_on_device(device, name):
    op = REDUCTIONS[name][0]
    x = np.random.default_rng(3).permutation(24).reshape(2, 3, 4) / 7.0 - 1.5  # no ties
    check_device(device, lambda t: op(t, axis=(0, 2)) + op(t, axis=-1, keepdims=True).sum(), x)
    check_device(device, lambda t: op(t), x)
