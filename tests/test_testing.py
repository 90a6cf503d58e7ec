"""tinylm.testing: gradcheck must catch a wrong backward, assert_close must fail when it
should, and the Hypothesis strategies must produce what they promise."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm import testing
from tinylm.errors import TinyLMError
from tinylm.function import Function
from tinylm.tensor import Tensor
import tinylm.ops as F


class WrongSquare(Function):
    """x ** 2 whose backward forgets the factor 2: gradcheck must reject it."""

    def forward(self, xp, x):
        self.x = x
        return x * x

    def backward(self, xp, grad):
        return grad * self.x


class RightSquare(WrongSquare):
    def backward(self, xp, grad):
        return grad * 2 * self.x


class DropsSecondGrad(Function):
    """a * b whose backward returns no gradient for b."""

    def forward(self, xp, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, xp, grad):
        return grad * self.b, None


X = np.array([[0.5, -1.25, 2.0], [1.5, -0.75, 0.25]])


# --------------------------------------------------------------------------- gradcheck


def test_gradcheck_accepts_a_correct_backward():
    assert testing.gradcheck(RightSquare.apply, X) is True


def test_gradcheck_catches_a_wrong_backward():
    with pytest.raises(AssertionError) as info:
        testing.gradcheck(WrongSquare.apply, X)
    report = str(info.value)
    assert "input 0" in report and "max abs error" in report and "index" in report


def test_gradcheck_catches_a_missing_gradient_and_names_the_input():
    with pytest.raises(AssertionError, match="input 1"):
        testing.gradcheck(DropsSecondGrad.apply, X, X + 1)


def test_gradcheck_catches_a_wrong_gradient_in_one_element_only():
    class OffByOneElement(RightSquare):
        def backward(self, xp, grad):
            g = grad * 2 * self.x
            g[1, 2] += 1e-3
            return g

    with pytest.raises(AssertionError, match=r"\(1, 2\)"):
        testing.gradcheck(OffByOneElement.apply, X)


def test_gradcheck_multiple_outputs_and_constant_inputs():
    ids = np.array([2, 0, 2])
    assert testing.gradcheck(lambda w, i: F.embedding(i, w), X.T.copy(), ids)
    assert testing.gradcheck(lambda x: F.split(x, [1, 2], axis=1), X)


def test_gradcheck_accepts_tensors_and_leaves_inputs_untouched():
    x = X.copy()
    testing.gradcheck(lambda t: F.tanh(t) * 3, Tensor(x))
    np.testing.assert_array_equal(x, X)


def test_gradcheck_refuses_float32_inputs():
    with pytest.raises(TinyLMError, match="float64"):
        testing.gradcheck(RightSquare.apply, X.astype(np.float32))


def test_gradcheck_needs_a_float_input():
    with pytest.raises(TinyLMError, match="no floating-point input"):
        testing.gradcheck(lambda i: i, np.array([1, 2]))


# --------------------------------------------------------------------------- assert_close


def test_assert_close_passes_and_fails():
    testing.assert_close(Tensor(X), X)
    testing.assert_close(X + 1e-9, X, rtol=0, atol=1e-8)
    with pytest.raises(AssertionError, match=r"max abs error .*index \(0, 1\)"):
        testing.assert_close(X + np.array([[0, 1e-3, 0], [0, 0, 0]]), X, msg="ctx")
    with pytest.raises(AssertionError, match="ctx: shape mismatch"):
        testing.assert_close(X, X.T, msg="ctx")


def test_assert_close_nan_and_inf():
    a = np.array([np.nan, np.inf, 1.0])
    testing.assert_close(a, a.copy())
    with pytest.raises(AssertionError, match="NaN mismatch"):
        testing.assert_close(a, np.array([0.0, np.inf, 1.0]))
    with pytest.raises(AssertionError):
        testing.assert_close(np.array([np.inf]), np.array([-np.inf]))
    with pytest.raises(AssertionError):
        testing.assert_close(np.array([np.inf]), np.array([1e300]))


def test_assert_close_default_tolerance_follows_the_less_precise_dtype():
    x32 = X.astype(np.float32)
    testing.assert_close(x32, X)  # float32 rounding is within float32 tolerance
    with pytest.raises(AssertionError):
        testing.assert_close(X * (1 + 1e-6), X)  # but not within float64's


def test_assert_close_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    testing.assert_close(torch.tensor(X, requires_grad=True) * 1, Tensor(X))


def test_assert_close_integers_are_exact():
    testing.assert_close(np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(AssertionError):
        testing.assert_close(np.array([1, 2]), np.array([1, 3]))


# --------------------------------------------------------------------------- strategies


@given(testing.shapes(min_dims=1, max_dims=3, min_side=2, max_side=3))
def test_shapes_respect_bounds(shape):
    assert 1 <= len(shape) <= 3 and all(2 <= n <= 3 for n in shape)


@given(testing.broadcastable_shapes(3))
def test_broadcastable_shapes_broadcast(shapes):
    assert len(shapes) == 3 and all(isinstance(s, tuple) and len(s) <= 3 for s in shapes)
    out = np.broadcast_shapes(*shapes)  # raises if they do not broadcast
    assert len(out) == max(map(len, shapes))
    assert np.broadcast(*[np.zeros(s) for s in shapes]).shape == out


@given(testing.arrays(testing.shapes(), min_value=-2, max_value=2, min_abs=0.5))
def test_arrays_respect_bounds(x):
    assert x.dtype == np.float64
    assert np.all(np.abs(x) >= 0.5) and np.all(np.abs(x) <= 2)


@given(testing.positive_arrays((3, 2), dtype=np.float32))
def test_positive_arrays(x):
    assert x.dtype == np.float32 and x.shape == (3, 2) and np.all(x > 0)


@given(st.integers(0, 4).flatmap(lambda n: st.tuples(st.just(n), testing.axes(n))))
def test_axes_are_valid_for_numpy(case):
    ndim, axis = case
    if axis is None:
        reduced = set(range(ndim))
    else:
        spelled = axis if isinstance(axis, tuple) else (axis,)
        assert all(isinstance(a, int) and -ndim <= a < ndim for a in spelled), axis
        reduced = {a % ndim for a in spelled}
        assert len(reduced) == len(spelled), f"repeated axis in {axis}"
    shape = tuple(range(2, 2 + ndim))  # a different size per axis
    out = np.zeros(shape).sum(axis=axis)  # NumPy agrees: no error, the same axes gone
    assert out.shape == tuple(n for k, n in enumerate(shape) if k not in reduced)


@given(st.sampled_from([1, 3]).flatmap(lambda n: st.tuples(st.just(n), testing.axes(
    n, allow_none=False, allow_tuple=False, allow_negative=False))))
def test_axes_without_none_tuples_or_negatives(case):
    ndim, axis = case
    assert isinstance(axis, int) and 0 <= axis < ndim


def test_axes_draw_tuples_and_negative_spellings():
    from hypothesis import find

    assert len(find(testing.axes(3), lambda a: isinstance(a, tuple) and len(a) > 1)) > 1
    assert find(testing.axes(3), lambda a: isinstance(a, int) and a < 0) < 0
    assert find(testing.axes(0, allow_none=False), lambda a: True) == ()


@given(testing.reduction_case(unique=True))
def test_reduction_case(case):
    x, axis, keepdims = case
    assert isinstance(keepdims, bool)
    assert len(np.unique(x)) == x.size
    if x.size > 1:  # far enough apart that finite differences never cross a tie
        assert np.diff(np.sort(x.ravel())).min() >= 1 / 64
    x.max(axis=axis, keepdims=keepdims)


def test_import_without_hypothesis_and_clear_error():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import numpy as np\n"
        "from tinylm import testing\n"
        "from tinylm.errors import TinyLMError\n"
        "assert testing.gradcheck(lambda x: x * x, np.array([1.0, 2.0]))\n"
        "try:\n"
        "    testing.shapes()\n"
        "except TinyLMError as e:\n"
        "    assert 'hypothesis' in str(e).lower(); print('ok')\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env, cwd=root)
    assert out.stdout.strip() == "ok", out.stderr
