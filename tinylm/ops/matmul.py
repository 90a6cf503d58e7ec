"""Matrix products: batched broadcasting ``matmul`` and the fused ``linear`` layer op."""

from __future__ import annotations

import math

import numpy as np

from tinylm import amp
from tinylm.errors import ShapeError
from tinylm.function import Function
from tinylm.ops.movement import reshape
from tinylm.threads import cpu_threads


def _flat_rows(a):
    """(..., n) -> (rows, n): lets a weight gradient be one GEMM instead of a batched
    GEMM followed by a sum over the batch."""
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])  # (not -1: size-0 safe)


class MatMul(Function):
    """a @ b for ndim >= 2 with NumPy's batch broadcasting (1-D handled in ``matmul``)."""

    def forward(self, xp, a, b):
        if a.shape[-1] != b.shape[-2]:
            raise ShapeError(f"matmul: inner dimensions differ, {a.shape} @ {b.shape}")
        self.a, self.b = a, b
        try:
            return a @ b
        except ValueError as e:  # batch dimensions that do not broadcast
            raise ShapeError(f"matmul: cannot multiply {a.shape} @ {b.shape}: {e}") from None

    def backward(self, xp, grad):
        a, b = self.a, self.b
        ga = gb = None
        if self.needs_input_grad[0]:
            if a.ndim == 2 and grad.ndim > 2:  # shared left matrix: sum over the batch
                ga = (grad @ b.swapaxes(-1, -2)).sum(axis=tuple(range(grad.ndim - 2)))
            else:
                ga = grad @ b.swapaxes(-1, -2)
        if self.needs_input_grad[1]:
            if b.ndim == 2 and a.ndim > 2:  # shared weight: one GEMM over all rows
                gb = _flat_rows(a).T @ _flat_rows(grad)
            else:
                gb = a.swapaxes(-1, -2) @ grad
        return ga, gb


def matmul(a, b):
    a, b = amp.cast_for_matmul(a, b)
    a_vec, b_vec = a.ndim == 1, b.ndim == 1
    if a_vec:
        a = reshape(a, (1, a.shape[0]))
    if b_vec:
        b = reshape(b, (b.shape[0], 1))
    y = MatMul.apply(a, b)
    if a_vec or b_vec:
        shape = y.shape[:-2] + (() if a_vec else y.shape[-2:-1]) + (() if b_vec else y.shape[-1:])
        y = reshape(y, shape)
    return y


class Linear(Function):
    """y = x @ W.T + b with W of shape (out, in), as torch.nn.Linear stores it."""

    def forward(self, xp, x, w, *bias):
        if x.shape[-1] != w.shape[1]:
            raise ShapeError(
                f"linear: input has {x.shape[-1]} features but the weight expects {w.shape[1]}"
            )
        # One 2-D GEMM over all rows: NumPy would run a (..., in) @ (in, out) product
        # as one small GEMM per leading index.
        self.x2, self.w = _flat_rows(x), w  # (N, in)
        if _one_row_on_one_core(xp, self.x2, w):
            y = xp.vecdot(w, self.x2[0])[None]  # (1, out): one dot product per weight row
        else:
            y = self.x2 @ w.T  # (N, out)
        if bias:
            y += bias[0]  # y is a fresh array: in-place add is safe
        return y.reshape(x.shape[:-1] + (w.shape[0],))  # (..., out)

    def backward(self, xp, grad):
        g2 = _flat_rows(grad)  # (N, out)
        gx = None
        if self.needs_input_grad[0]:
            gx = (g2 @ self.w).reshape(grad.shape[:-1] + (self.w.shape[1],))  # (..., in)
        gw = (g2.T @ self.x2) if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) == 3:
            gb = g2.sum(axis=0) if self.needs_input_grad[2] else None
            return gx, gw, gb
        return gx, gw


def _one_row_on_one_core(xp, x2, w) -> bool:
    """Whether ``x2 @ w.T`` is a matrix-vector product (one row: a decode step) that
    ``vecdot`` does faster than BLAS. ``np.vecdot`` runs one BLAS dot per contiguous
    weight row; on one thread it streams the weights about twice as fast as
    OpenBLAS's single-threaded GEMV does with the same (out, in) weight (SmolLM2's 151
    products per token: 23 ms against 45 ms, bench/RESULTS.md). BLAS splits its GEMV
    over its threads and vecdot does not, so with more threads BLAS keeps it."""
    return (x2.shape[0] == 1 and xp is np and hasattr(np, "vecdot") and w.dtype == x2.dtype
            and w.dtype.char in "fd" and w.flags.c_contiguous and cpu_threads() == 1)


def linear(x, weight, bias=None):
    x, weight, bias = amp.cast_for_matmul(x, weight, bias)
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)
