"""Matrix products: batched broadcasting ``matmul`` and the fused ``linear`` layer op."""

from __future__ import annotations

import math

import numpy as np

from tinylm import amp
from tinylm import backend
from tinylm.errors import ShapeError
from tinylm.function import Function
from tinylm.ops.movement import reshape
from tinylm.ops.reduce import leading_sum
from tinylm.kernels import native
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
        if xp is np and native.owns_products(2, self.x2, w) and not _tiled(self.x2.shape[0], w.shape[0]):
            # the compiled kernels' threads run the product (a decode step's few rows
            # keep ``_product``'s tiles)
            y = backend.reusable_empty("linear.out", (self.x2.shape[0], w.shape[0]), w.dtype)
            native.gemm(self.x2, w, y, transb=True)
        else:
            y = _product(xp, self.x2, w)  # (N, out)
        if bias:
            y += bias[0]  # y is a fresh array: in-place add is safe
        return y.reshape(x.shape[:-1] + (w.shape[0],))  # (..., out)

    def backward(self, xp, grad):
        g2 = _flat_rows(grad)  # (N, out)
        gx = gw = None
        if xp is np and native.owns_products(2, g2, self.w, self.x2):
            # both gradients in one call: side by side on the kernels' threads
            products = []
            if self.needs_input_grad[0]:
                gx = np.empty((g2.shape[0], self.w.shape[1]), np.float32)
                products.append((g2, self.w, gx, False, False))
            if self.needs_input_grad[1]:
                gw = backend.reusable_empty("linear.grad_weight",
                                            (g2.shape[1], self.x2.shape[1]), np.float32)
                products.append((g2, self.x2, gw, True, False))
            native.gemm_many(products)
        else:
            if self.needs_input_grad[0]:
                gx = g2 @ self.w
            if self.needs_input_grad[1]:
                if xp is not np or g2.dtype != self.x2.dtype:
                    gw = g2.T @ self.x2
                else:
                    gw = np.matmul(g2.T, self.x2, out=backend.reusable_empty(
                        "linear.grad_weight", (g2.shape[1], self.x2.shape[1]), g2.dtype))
        if gx is not None:
            gx = gx.reshape(grad.shape[:-1] + (self.w.shape[1],))  # (..., in)
        if len(self.needs_input_grad) == 3:
            gb = leading_sum(xp, g2) if self.needs_input_grad[2] else None
            return gx, gw, gb
        return gx, gw


# A decode step multiplies a few rows (one per sequence) by each weight. OpenBLAS's
# single-threaded SGEMM is slow there (GPT-2 small's 48 layer products, weights
# streamed from memory, loaded machine: 31.7 ms at 2 rows, 42.0 at 3, 38.1 at 5, 36.1 at
# 8); ``np.vecdot`` runs one BLAS dot per weight row and output row, and a tile of
# TILE weight rows read once from memory stays in cache for the other rows' dots:
# 15.0, 19.3, 26.2 ms, and 38.4 at 8 rows, where the GEMM wins again. One row takes
# the whole weight in one vecdot (no tiles to reuse). A vocabulary head (WIDE rows or
# more: GPT-2's 50257 x 768) is faster as a GEMM per tile above FEW_ROWS (8-32 rows:
# 19.2 -> 17.1, 25.1 -> 22.1, 34.8 -> 32.0 ms); the layers' weights are not.
FEW_ROWS = 7  # up to this many rows: a vecdot per tile
GEMM_TILED_ROWS = 32  # up to this many rows, a WIDE weight: a GEMM per tile
TILE = 256  # weight rows per tile: 768 KiB of float32 at 768 inputs
WIDE = 16384


def _tiled(n: int, out: int) -> bool:
    """Whether ``_product`` tiles an (n, in) @ (out, in)^T product (a few rows)."""
    return n <= FEW_ROWS or (out >= WIDE and n <= GEMM_TILED_ROWS)


def _product(xp, x2, w):
    """x2 @ w.T for x2 (N, in) and w (out, in): tiled for a few rows on one BLAS thread
    where that is faster, the same values up to float rounding (each row's are those of
    the row alone while N <= FEW_ROWS), else one BLAS GEMM."""
    n, out = x2.shape[0], w.shape[0]
    if not (_tiled(n, out) and _vecdot_pays(xp, x2, w)):
        if xp is np and x2.dtype == w.dtype and x2.dtype.char in "fd":
            # a large product (a vocabulary head's logits) into memory kept between steps
            return np.matmul(x2, w.T, out=backend.reusable_empty("linear.out", (n, out), w.dtype))
        return x2 @ w.T
    y = np.empty((n, out), dtype=w.dtype)
    step = out if n == 1 else TILE
    for s in range(0, out, step):  # (out / TILE Python calls: ~200 for a 50257 head)
        tile, part = w[s:s + step], y[:, s:s + step]
        if n <= FEW_ROWS:
            np.vecdot(tile[None], x2[:, None, :], out=part)  # (n, tile) dot products
        else:
            np.matmul(x2, tile.T, out=part)
    return y


def _vecdot_pays(xp, x2, w) -> bool:
    """Whether ``_product``'s tiles may beat BLAS here: float32/float64 host arrays of
    one dtype, a contiguous (out, in) weight, and one BLAS thread (vecdot runs on one
    thread; BLAS splits its products over its threads). On one thread vecdot also
    streams the weights faster than OpenBLAS's GEMV does for one row (SmolLM2's 151
    products per token: 23 ms against 45 ms, bench/RESULTS.md)."""
    return (xp is np and hasattr(np, "vecdot") and x2.size > 0 and w.size > 0
            and w.dtype == x2.dtype and w.dtype.char in "fd" and w.flags.c_contiguous
            and cpu_threads() == 1)


def linear(x, weight, bias=None):
    x, weight, bias = amp.cast_for_matmul(x, weight, bias)
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)
