"""Reductions: sum, max (primitives), logsumexp (fused for stability); mean, min and var
composed from them. ``axis`` is None, an int or a tuple, as in NumPy.

The functions here are named like the builtins they shadow (sum, max, min); code in
this file that needs a builtin says ``builtins.max``.
"""

from __future__ import annotations

import builtins
import functools

import numpy as np

from tinylm.errors import ShapeError
from tinylm.function import Function
from tinylm.tensor import Tensor


def normalize_axes(axis, ndim: int) -> tuple:
    """``axis`` as a sorted tuple of non-negative ints (all axes for None)."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -builtins.max(ndim, 1) <= a < builtins.max(ndim, 1):
            raise ShapeError(f"axis {a} is out of range for a tensor with {ndim} dims")
        if ndim:  # a 0-d tensor accepts axis 0 or -1 (as torch) and reduces nothing
            out.append(a % ndim)
    return tuple(sorted(set(out)))


def last_axis_sum(xp, a):
    """``a.sum(axis=-1, keepdims=True)`` of an array, as a matrix-vector product for
    float32/float64: BLAS sums short rows several times faster than NumPy's reduction
    does (the fused ops' hot path: attention's softmax rows, layer-norm statistics)."""
    if a.ndim == 0 or a.dtype.char not in "fd":
        return a.sum(axis=-1, keepdims=True)
    ones = _ones(a.shape[-1], a.dtype.char) if xp is np else xp.ones(a.shape[-1], a.dtype)
    return (a @ ones)[..., None]


def leading_sum(xp, a):
    """``a.sum(axis=tuple(range(a.ndim - 1)))``: the sum over every axis but the last
    (a bias's or a norm weight's gradient), as one vector-matrix product for a
    C-contiguous float32/float64 NumPy array: BLAS sums the (rows, n) matrix's columns
    several times faster than NumPy's row-by-row reduction ((768, 128): 15 -> 4 us);
    the same sum up to float rounding (another order). Others: ``sum``."""
    if a.ndim < 2 or xp is not np or a.dtype.char not in "fd" or not a.flags.c_contiguous:
        return a.sum(axis=tuple(range(a.ndim - 1)))
    rows = a.size // a.shape[-1] if a.shape[-1] else 0
    return _ones(rows, a.dtype.char) @ a.reshape(rows, a.shape[-1])


def last_axis_max(xp, a):
    """``a.max(axis=-1, keepdims=True)``, the same values (max is exact, NaN wins as in
    NumPy's), for NumPy rows of 16 or more by halving: elementwise ``maximum`` of the
    row's two halves, again on the result, log2(n) times. NumPy's own reduction along a
    short contiguous last axis does not vectorise: on attention's (B, H, T, 64) scores
    it takes 0.3 ms where halving takes 0.15 (and 65-wide rows reduce twice as fast as
    64-wide ones there). A C-contiguous array of even width first pairs neighbours
    over the whole flat array while the width stays even. Other arrays: NumPy's /
    CuPy's ``max``."""
    n = a.shape[-1] if a.ndim else 0
    if xp is not np or n < 16:
        return a.max(axis=-1, keepdims=True)
    if n % 2 == 0 and a.flags.c_contiguous:
        # Neighbours pair up within each row of the flat array (n even): one ufunc call
        # a level on the whole array instead of one inner loop per row; (12, 4, 64, 64)
        # scores 0.21 -> 0.06 ms. An odd width left over is halved below.
        lead, m = a.shape[:-1], a.reshape(-1)
        while n % 2 == 0:
            m = np.maximum(m[0::2], m[1::2])
            n //= 2
        a = m.reshape(lead + (n,))
        if n == 1:
            return a
    h = n // 2
    m = np.maximum(a[..., :h], a[..., h:2 * h])  # fresh (..., n // 2): halved in place
    if n % 2:
        np.maximum(m[..., :1], a[..., 2 * h:], out=m[..., :1])
    n = h
    while n > 1:
        h = n // 2
        if n % 2:  # the odd one out joins the first column
            np.maximum(m[..., :1], m[..., n - 1:n], out=m[..., :1])
        np.maximum(m[..., :h], m[..., h:2 * h], out=m[..., :h])
        n = h
    return m[..., :1]


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: str):
    """A read-only NumPy vector of n ones, made once per (n, dtype): last_axis_sum runs
    ~45 times a training step (a CuPy one is made on the current device each call)."""
    ones = np.ones(n, dtype=dtype)
    ones.flags.writeable = False
    return ones


def _keep(grad, shape, axes, keepdims):
    """Reinsert reduced axes so ``grad`` broadcasts against the input shape."""
    if keepdims or not axes:
        return grad
    kept = list(grad.shape)
    for a in axes:
        kept.insert(a, 1)
    return grad.reshape(kept)


class Sum(Function):
    def forward(self, xp, x):
        self.shape = x.shape
        self.axes = normalize_axes(self.axis, x.ndim)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, xp, grad):
        return xp.broadcast_to(_keep(grad, self.shape, self.axes, self.keepdims), self.shape)


class Max(Function):
    """Max over axes; ties share the gradient equally (as torch.amax)."""

    def forward(self, xp, x):
        self.axes = normalize_axes(self.axis, x.ndim)
        y = x.max(axis=self.axes, keepdims=True)
        self.mask = x == y
        return y if self.keepdims else y.reshape([n for i, n in enumerate(y.shape) if i not in self.axes])

    def backward(self, xp, grad):
        grad = _keep(grad, self.mask.shape, self.axes, self.keepdims)
        count = self.mask.sum(axis=self.axes, keepdims=True).astype(grad.dtype)
        return self.mask * (grad / count)


class LogSumExp(Function):
    def forward(self, xp, x):
        self.axes = normalize_axes(self.axis, x.ndim)
        m = x.max(axis=self.axes, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0)  # rows of -inf stay -inf, not nan
        y = xp.log(xp.exp(x - m).sum(axis=self.axes, keepdims=True)) + m
        self.x, self.y = x, y
        return y if self.keepdims else y.reshape([n for i, n in enumerate(y.shape) if i not in self.axes])

    def backward(self, xp, grad):
        grad = _keep(grad, self.x.shape, self.axes, self.keepdims)
        return grad * xp.exp(self.x - self.y)


def sum(x, axis=None, keepdims: bool = False):
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims: bool = False):
    return Max.apply(x, axis=axis, keepdims=keepdims)


def logsumexp(x, axis=None, keepdims: bool = False):
    return LogSumExp.apply(x, axis=axis, keepdims=keepdims)


def _count(x: Tensor, axis) -> int:
    n = 1
    for a in normalize_axes(axis, x.ndim):
        n *= x.shape[a]
    return n


def mean(x, axis=None, keepdims: bool = False):
    return sum(x, axis, keepdims) / _count(x, axis)


def min(x, axis=None, keepdims: bool = False):
    return -max(-x, axis, keepdims)


def var(x, axis=None, keepdims: bool = False, ddof: int = 0):
    d = x - mean(x, axis, keepdims=True)
    return sum(d * d, axis, keepdims) / (_count(x, axis) - ddof)


def argmax(x, axis=None):
    """Indices of the maxima (no gradient)."""
    data = x.data if isinstance(x, Tensor) else x
    return Tensor(data.argmax(axis=axis))
