"""Scaled dot-product attention, the naive (materialised scores) reference path.

    softmax(q @ k^T * scale + mask) @ v        q: (B, H, T, hs), k, v: (B, Hkv, S, hs)

One fused node (``Attention``: two batched GEMMs and an in-place softmax each way)
when the mask is a constant; composed from matmul, masked_fill and the fused softmax
(whose gradients need no code here) when the mask is a tensor that learns or dropout
is on. Grouped-query attention: when Hkv divides H, each k/v head serves H / Hkv query
heads (Hkv = 1 is multi-query attention).

Long sequences go to ``tiled.tiled_attention`` (same result, O(T) memory) unless
``impl="naive"`` is asked for: see ``scaled_dot_product_attention``.

EMPTY ROWS, one rule for every path (this file's fused node and composed path, the
tiled op, the CUDA FlashAttention kernels): a query row that sees no key at all gets
output 0 and contributes no gradient (to q, k, v or a learned mask), as FlashAttention
does. A key is hidden by causality, by False in a boolean mask or by -inf in an
additive one; a finite mask value, however negative, is an ordinary score. (A left-
padded causal batch has such rows: its padding queries. ``nn.additive_mask`` writes
-inf, so they follow the rule instead of averaging the values uniformly.) Here the
rule comes from ops.nn's one softmax, which gives a row of -inf p = 0 (and so no
gradient); the tiled op and the CUDA kernels keep lse = -inf for such a row.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm import amp
from tinylm.errors import ShapeError, TinyLMError
from tinylm.function import Function
from tinylm.ops.elementwise import add, masked_fill, mul
from tinylm.ops.matmul import matmul
from tinylm.ops.movement import broadcast_to, empty_views_like, reshape, swapaxes
from tinylm.ops.nn import dropout, softmax, softmax_array
from tinylm.ops.reduce import last_axis_sum
from tinylm.ops.tiled import alibi_bias, tiled_attention
from tinylm.kernels import flash_attention as cuda_flash
from tinylm.kernels import native
from tinylm.tensor import Tensor
from tinylm.threads import cpu_threads, run_parts


def causal_mask(xp, T: int, S: int):
    """(T, S) boolean, True where query t may NOT see key s (keys after it).

    With a KV cache S > T and query t sits at absolute position S - T + t."""
    return xp.triu(xp.ones((T, S), dtype=bool), k=S - T + 1)


_causal_bias_cache: dict = {}


def causal_bias(xp, T: int, S: int, dtype):
    """(T, S) additive mask: 0 where query t may see key s, -inf after it. Cached (it is
    read-only) for the last few shapes, so a training loop builds it once."""
    key = (xp.__name__, T, S, dtype.str)
    bias = _causal_bias_cache.get(key)
    if bias is None:
        bias = xp.where(causal_mask(xp, T, S), -xp.inf, 0).astype(dtype)
        if len(_causal_bias_cache) >= 8:
            _causal_bias_cache.clear()
        _causal_bias_cache[key] = bias
    return bias


def _score_dtype(dtype):
    """Scores and probabilities are at least float32 (as the composed softmax under amp)."""
    return np.promote_types(dtype, np.float32)


class Attention(Function):
    """softmax(q @ k^T * scale + mask) @ v as one node, for a constant mask: ``bias``
    (additive, broadcastable to (B, H, T, S)) and/or ``keep`` (boolean, True = keep).

    Grouped-query attention without copying k and v: the ``rep = H / Hkv`` query heads
    that share a kv head are stacked as the rows of one product, q as (B, Hkv, rep*T,
    hs) @ k^T (B, Hkv, hs, S), and the masks are read as (B, Hkv|1, rep|1, T, S), as
    the tiled op does. Backward's products then sum dK and dV over the group by
    themselves.

    Backward, with P the probabilities and dY the output gradient:
    dV = P^T dY, dP = dY V^T, dS = P * (dP - rowsum(dP * P)) * scale, dQ = dS K,
    dK = dS^T Q. Masked entries have P = 0, so they get no gradient; a row with every
    key masked has P = 0 throughout (see EMPTY ROWS above).
    """

    def forward(self, xp, q, k, v):
        B, H, T, hs = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        self.q_shape = q.shape
        q = q.reshape(B, Hkv, H // Hkv * T, hs)  # the heads of a group stacked as rows
        kt = _transposed(xp, k)
        rows_bias = _row_bias(self.bias, T, S)
        if self._compiled(xp, q, kt, v, rows_bias):
            return self._forward_compiled(q, k, kt, v, rows_bias).reshape(B, H, T, v.shape[-1])
        att = q @ kt  # (B, Hkv, rep*T, S), fresh: the rest is in place
        att = att.astype(_score_dtype(att.dtype), copy=False)  # half -> float32 softmax
        att *= self.scale
        grouped = att.reshape(att.shape[0], Hkv, H // Hkv, T, S)  # a view of att
        if self.bias is not None:
            grouped += _by_group(self.bias, H, Hkv)
        if self.keep is not None:
            xp.copyto(grouped, -xp.inf, where=~_by_group(self.keep, H, Hkv))
        softmax_array(att, out=att)  # in place; a row that sees no key gets p = 0
        self.q, self.k, self.v, self.p = q, k, v, att
        y = att.astype(v.dtype, copy=False) @ v  # (B, Hkv, rep*T, hs_v), in v's dtype
        # rowsum(dP * P) = rowsum(dY * Y) (dP = dY V^T, Y = P V): the backward reads it
        # off the (rep*T, hs_v) output instead of the (rep*T, S) scores, as
        # FlashAttention does; kept when Y is in the scores' dtype (not under half amp)
        self.y = y if y.dtype == att.dtype and self.needs_grad else None
        return y.reshape(y.shape[0], H, T, v.shape[-1])  # (B, H, T, hs of v)

    def backward(self, xp, grad):
        if self.compiled:
            return self._backward_compiled(grad)
        q, k, v, p = self.q, self.k, self.v, self.p
        grad = grad.reshape(p.shape[:3] + grad.shape[-1:])  # (B, Hkv, rep*T, hs_v)
        gv = p.swapaxes(-1, -2) @ grad if self.needs_input_grad[2] else None
        ds = (grad @ _transposed(xp, v)).astype(p.dtype, copy=False)  # dP (B, Hkv, rep*T, S)
        if self.y is not None and grad.dtype == p.dtype:
            ds -= last_axis_sum(xp, grad * self.y)
        else:
            ds -= last_axis_sum(xp, ds * p)
        ds *= p
        ds *= self.scale
        gq = (ds @ k).reshape(ds.shape[0], *self.q_shape[1:]) if self.needs_input_grad[0] \
            else None
        gk = ds.swapaxes(-1, -2) @ q if self.needs_input_grad[1] else None
        return gq, gk, gv

    # The compiled path: float32 NumPy arrays, no keep mask, a bias shared by every head
    # (causal) or none. Scale, bias and softmax are one pass of the CPU kernels, and
    # with several threads the batch rows are split between them (the per-head products
    # are small BLAS calls that one BLAS thread each runs best);
    # every value is that of the unsplit computation.
    compiled = False
    owned = False  # (the compiled path on the kernels' own threads)

    def _compiled(self, xp, q, kt, v, rows_bias) -> bool:
        # (k and v of q's batch and one head count: no broadcasting between them)
        return (xp is np and self.keep is None and (self.bias is None or rows_bias is not None)
                and q.shape[:2] == kt.shape[:2] == v.shape[:2] and kt.shape[-1] == v.shape[-2]
                and q.shape[-1] == kt.shape[-2]
                and q.dtype == kt.dtype == v.dtype == np.float32
                and native.usable(rows_bias) and q.size > 0 and v.size > 0)

    def _forward_compiled(self, q, k, kt, v, rows_bias):
        B, Hkv, R, _ = q.shape
        att = np.empty((B, Hkv, R, kt.shape[-1]), np.float32)
        if Hkv == self.q_shape[1]:  # (no query groups)
            # laid out as (B, T, H, hs): what the caller's transpose and reshape to
            # (B, T, H hs) make of it, without copying
            y = np.empty((B, R, Hkv, v.shape[-1]), np.float32).transpose(0, 2, 1, 3)
        else:
            y = np.empty((B, Hkv, R, v.shape[-1]), np.float32)
        self.owned = native.owns_products(4, q, k, v)
        if self.owned:  # every product and the softmax on the kernels' threads
            native.gemm(q, k, att, transb=True)
            native.softmax(att, att, rows_bias, self.scale)
            native.gemm(att, v, y)
        else:
            def part(sl):
                np.matmul(q[sl], kt[sl], out=att[sl])
                native.softmax(att[sl], att[sl], rows_bias, self.scale)
                np.matmul(att[sl], v[sl], out=y[sl])

            _run_batches(part, B, att.size)
        self.compiled = True
        self.q, self.k, self.v, self.p = q, k, v, att
        self.y = y if self.needs_grad else None
        return y

    def _backward_compiled(self, grad):
        q, k, v, p, y = self.q, self.k, self.v, self.p, self.y
        grad = grad.astype(np.float32, copy=False).reshape(y.shape)  # (B, Hkv, rep*T, hs_v)
        if not native.is_matrix(grad, 4):
            grad = np.ascontiguousarray(grad)
        need_q, need_k, need_v = self.needs_input_grad
        # q, k and v's gradients where they are in their buffer (the heads of one fused
        # projection: its split then hands on one gradient, without concatenating)
        gq, gk, gv = empty_views_like(q if need_q else None, k if need_k else None,
                                      v if need_v else None)
        if self.owned:  # (independent products side by side: one call each pair)
            ds = np.empty(p.shape, np.float32)
            native.gemm_many([(grad, v, ds, False, True)]  # dP
                             + ([(p, grad, gv, True, False)] if need_v else []))
            delta = np.ascontiguousarray(last_axis_sum(np, grad * y))
            native.softmax_backward(ds, p, delta, self.scale)  # dS, in place
            native.gemm_many(([(ds, k, gq, False, False)] if need_q else [])
                             + ([(ds, q, gk, True, False)] if need_k else []))
            return (gq.reshape(self.q_shape) if need_q else None), gk, gv

        def part(sl):
            if need_v:
                np.matmul(p[sl].swapaxes(-1, -2), grad[sl], out=gv[sl])
            ds = grad[sl] @ _transposed(np, v[sl])  # dP
            delta = np.ascontiguousarray(last_axis_sum(np, grad[sl] * y[sl]))
            native.softmax_backward(ds, p[sl], delta, self.scale)  # dS, in place
            if need_q:
                np.matmul(ds, k[sl], out=gq[sl])
            if need_k:
                np.matmul(ds.swapaxes(-1, -2), q[sl], out=gk[sl])

        _run_batches(part, q.shape[0], p.size)
        return (gq.reshape(self.q_shape) if need_q else None), gk, gv


# Scores (B H T S) from which the compiled path splits the batch over threads: below,
# handing parts to pool threads costs more than it saves (the nanoGPT recipe's 196k
# scores a layer, forward + backward: 2.03 ms on one thread, 2.33 on two).
PARALLEL_SCORES = 1 << 21


def _run_batches(part, B: int, scores: int) -> None:
    """``part(slice)`` over the batch rows [0, B): one slice per CPU thread
    (``cpu_threads``) in parallel when there are PARALLEL_SCORES ``scores`` or more,
    else all of them on this thread."""
    n = min(cpu_threads(), B) if scores >= PARALLEL_SCORES else 1
    if n <= 1:
        part(slice(0, B))
        return
    bounds = [B * i // n for i in range(n + 1)]
    # (per-head products this small run on the calling thread whatever the BLAS limit)
    run_parts(part, [slice(a, b) for a, b in zip(bounds, bounds[1:])], limit_blas=False)


def _transposed(xp, a):
    """a.swapaxes(-1, -2), as a C-contiguous copy on NumPy: NumPy's stacked matmul runs
    one GEMM per head either way, but with a transposed right operand each is slower
    than the copy and a plain GEMM (the recipe's (12, 4, 64, 32) q @ k^T, k a view of
    the qkv projection: 137 -> 112 us with the copy); the same values."""
    t = a.swapaxes(-1, -2)
    return np.ascontiguousarray(t) if xp is np else t


def _row_bias(bias, T: int, S: int):
    """``bias`` as one (T, S) matrix shared by every batch row and head (the causal
    bias: what the compiled softmax takes), or None (no bias, or one that differs
    between heads or rows: ALiBi, padding)."""
    if bias is None or bias.shape[-2:] != (T, S) or any(n != 1 for n in bias.shape[:-2]):
        return None
    return np.ascontiguousarray(bias.reshape(T, S)) if isinstance(bias, np.ndarray) else None


def _by_group(m, H: int, Hkv: int):
    """A mask broadcastable to (B, H, T, S) as one broadcastable to (B, Hkv, rep, T, S)
    (a view): a per-head axis splits into (Hkv, rep), a shared one gets a second 1."""
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)  # (Bm, Hm, Tm, Sm)
    if m.shape[1] == H:
        return m.reshape(m.shape[0], Hkv, H // Hkv, *m.shape[2:])
    return m[:, :, None]  # (Bm, 1, 1, Tm, Sm)


def repeat_kv(x, n_rep: int):
    """(B, Hkv, S, hs) -> (B, Hkv * n_rep, S, hs), each kv head repeated n_rep times."""
    if n_rep == 1:
        return x
    B, Hkv, S, hs = x.shape
    x = reshape(x, (B, Hkv, 1, S, hs))
    x = broadcast_to(x, (B, Hkv, n_rep, S, hs))
    return reshape(x, (B, Hkv * n_rep, S, hs))


# impl="auto" switches to the tiled op (O(T) memory) from this many scores per head:
# there it is as fast as the naive path on a CPU, and faster beyond (bench/attention.py).
TILED_MIN_SCORES = 512 * 1024
IMPLS = ("auto", "naive", "tiled", "cuda")


def scaled_dot_product_attention(
    q, k, v, mask=None, is_causal: bool = False, scale=None, dropout_p: float = 0.0,
    training: bool = True, alibi_slopes=None, impl: str = "auto",
):
    """``mask``: boolean (True = keep, as torch) or additive float, broadcastable to
    (B, H, T, S). ``alibi_slopes`` (H,): add ALiBi's ``-slope_h * |pos_q - pos_k|``
    (query i at position i + S - T), see ``tiled.alibi_bias``.

    ``impl``: ``"naive"`` materialises the (B, H, T, S) scores (this file, the
    reference); ``"tiled"`` never does (``tinylm.ops.tiled``: online softmax,
    O(T) memory); ``"auto"`` takes the tiled op when T * S >= TILED_MIN_SCORES and
    the mask is constant and dropout is off (the tiled op has no dropout). On a GPU,
    ``"auto"`` (and ``"cuda"``) runs the FlashAttention RawKernels
    (``tinylm.kernels.flash_attention``) whenever they apply: no mask other than
    causal, no ALiBi, no dropout, head dim 32/64/128, float32 or float16."""
    _check_inputs(q, k, v, impl)
    learned_mask = isinstance(mask, Tensor) and mask.requires_grad
    dropping = bool(dropout_p and training)
    if impl == "tiled" and (learned_mask or dropping):
        raise TinyLMError(
            "impl='tiled' takes a constant mask and no dropout; use impl='naive' (or "
            "'auto') for a mask that learns or for attention dropout"
        )
    if q.device == "cuda" and impl in ("auto", "cuda"):
        q16, k16, v16 = amp.cast_for_matmul(q, k, v)
        if mask is None and alibi_slopes is None and not dropping and _cuda_fits(q16):
            return cuda_flash.flash_attention(q16, k16, v16, causal=is_causal, scale=scale)
        if impl == "cuda":
            raise TinyLMError(
                "impl='cuda' needs q/k/v on the GPU in float32 or float16, head dim 32, 64 "
                "or 128, no mask but causal, no ALiBi and no dropout; use impl='auto'"
            )
    elif impl == "cuda":
        raise TinyLMError("impl='cuda' needs tensors on the GPU; use impl='auto' on the CPU")
    T, S = q.shape[2], k.shape[2]
    if impl == "tiled" or (impl == "auto" and not learned_mask and not dropping
                           and T * S >= TILED_MIN_SCORES):
        q, k, v = amp.cast_for_matmul(q, k, v)  # as the naive path does
        return tiled_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale,
                               alibi_slopes=alibi_slopes)  # (B, H, T, hs)
    H = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    alibi = _alibi(q.xp, alibi_slopes, H, T, S, _score_dtype(q.dtype))  # (H, T, S) or None
    if learned_mask or dropping:
        k, v = repeat_kv(k, H // k.shape[1]), repeat_kv(v, H // v.shape[1])
        return _composed_attention(q, k, v, mask, is_causal, scale, alibi,
                                   dropout_p if dropping else 0.0)
    return _fused_attention(q, k, v, mask, is_causal, scale, alibi)


def _check_inputs(q, k, v, impl):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"attention expects (B, H, T, hs) tensors, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    H, Hkv = q.shape[1], k.shape[1]
    if H % Hkv:
        raise ShapeError(f"{H} query heads cannot share {Hkv} key/value heads evenly")
    if impl not in IMPLS:
        raise TinyLMError(f"attention impl must be one of {IMPLS}, got {impl!r}")


def _cuda_fits(q16) -> bool:
    """Whether the FlashAttention kernels take q (after amp's cast) at all."""
    return q16.shape[-1] in cuda_flash.HEAD_DIMS and q16.dtype in (np.float32, np.float16)


def _alibi(xp, alibi_slopes, H: int, T: int, S: int, dtype):
    """ALiBi's (H, T, S) bias from the slopes (H,), or None without slopes."""
    if alibi_slopes is None:
        return None
    slopes = alibi_slopes.data if isinstance(alibi_slopes, Tensor) else alibi_slopes
    slopes = xp.asarray(slopes)
    if slopes.shape != (H,):
        raise ShapeError(f"alibi_slopes must have shape ({H},), one per head; got {slopes.shape}")
    return alibi_bias(xp, slopes, T, S, dtype)  # (H, T, S)


def _fused_attention(q, k, v, mask, is_causal, scale, alibi):
    """One ``Attention`` node: every mask part is a constant, folded into one bias and
    one keep mask. k, v have H or fewer (grouped) heads."""
    xp, T, S, dtype = q.xp, q.shape[2], k.shape[2], _score_dtype(q.dtype)
    # a single query (a decode step) sits at the last position: causality hides nothing
    bias = causal_bias(xp, T, S, dtype) if is_causal and T > 1 else None
    if alibi is not None:
        bias = alibi if bias is None else bias + alibi
    keep = None
    if mask is not None:
        m = mask.data if isinstance(mask, Tensor) else xp.asarray(mask)
        if m.dtype == bool:
            keep = m
        else:
            m = m.astype(dtype, copy=False)
            bias = m if bias is None else bias + m
    q, k, v = amp.cast_for_matmul(q, k, v)  # as the composed path's matmuls do
    return Attention.apply(q, k, v, scale=scale, bias=bias, keep=keep)  # (B, H, T, hs)


def _composed_attention(q, k, v, mask, is_causal, scale, alibi, dropout_p):
    """matmul, masked_fill, the fused softmax and dropout: for a mask that learns (its
    gradient comes from the composition) or attention dropout."""
    xp, T, S = q.xp, q.shape[2], k.shape[2]
    att = matmul(mul(q, scale), swapaxes(k, -1, -2))  # (B, H, T, S)
    if alibi is not None:
        att = add(att, Tensor(alibi))
    if is_causal:
        att = masked_fill(att, causal_mask(xp, T, S), -float("inf"))
    if mask is not None:
        m = mask.data if isinstance(mask, Tensor) else xp.asarray(mask)
        if m.dtype == bool:
            att = masked_fill(att, ~m, -float("inf"))
        else:
            att = add(att, mask)
    att = softmax(att, axis=-1)  # a row that sees no key: p = 0, and no gradient
    if dropout_p:
        att = dropout(att, dropout_p, True)
    return matmul(att, v)  # (B, H, T, hs)
