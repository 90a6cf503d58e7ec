"""Fused neural-network ops: embedding, softmax, log_softmax, cross-entropy, layer and
RMS norm, dropout. Each is one node with a hand-written backward: fewer temporaries
and fewer graph nodes than composing them from primitives. ``softmax_array`` and
``log_softmax_array`` are the same maths on plain arrays, for code outside autograd
(the samplers of ``tinylm.sampling``, beam search, speculative decoding).

Cross-entropy and the norms run the CUDA kernels of ``tinylm.kernels.fused`` (one or
three launches instead of ten or more) when ``fused.usable`` says so: float32 CuPy
arrays with TINYLM_FUSED_KERNELS=1. Otherwise, and always on NumPy, the composed path.
"""

from __future__ import annotations

import numpy as np

from tinylm import amp, backend
from tinylm.errors import ShapeError, TinyLMError
from tinylm.function import Function
from tinylm.kernels import fused, native
from tinylm.ops.reduce import last_axis_max, last_axis_sum, leading_sum
from tinylm.tensor import Tensor

# --------------------------------------------------------------------------- embedding


class Embedding(Function):
    """weight[ids]; backward scatter-adds rows (repeated ids accumulate)."""

    def forward(self, xp, ids, weight):
        if ids.dtype.kind not in "iu":
            raise TinyLMError(f"embedding ids must be integers, got {ids.dtype}")
        if ids.size and bool(((ids < 0) | (ids >= weight.shape[0])).any()):
            raise TinyLMError(
                f"embedding: an id is outside [0, {weight.shape[0]}), the table's rows; "
                "check the tokenizer's vocabulary size against the model's"
            )
        self.ids, self.shape, self.dtype = ids, weight.shape, weight.dtype
        return weight[ids]  # (*ids.shape, D)

    def backward(self, xp, grad):
        gw = xp.zeros(self.shape, dtype=self.dtype)
        backend.scatter_add(gw, self.ids.ravel(), grad.reshape(-1, self.shape[1]))
        return None, gw


def embedding(ids, weight):
    return Embedding.apply(ids, weight)


# --------------------------------------------------------------------------- softmax


def softmax_array(x, axis: int = -1, *, out=None):
    """softmax of a NumPy or CuPy array (no autograd), in x's dtype: exp(x - max) / sum.
    A removed entry (-inf) gets probability 0, and a row with every entry removed gets
    0 throughout, not NaN (attention's empty-row rule). ``out=x`` works in place. The
    one array-level softmax: the ``Softmax`` op, the samplers, beam search and
    speculative decoding use it."""
    xp = backend.get_array_module(x)
    e = xp.subtract(x, _row_max(xp, x, axis), out=out)  # fresh unless out: exp in place
    xp.exp(e, out=e)
    total = _row_sum(xp, e, axis)
    e /= xp.where(total == 0, 1, total)
    return e


def log_softmax_array(x, axis: int = -1):
    """log-softmax of a NumPy or CuPy array (no autograd): x - max - log(sum(exp)),
    stable for large logits; -inf stays -inf (a row of them too, not NaN)."""
    xp = backend.get_array_module(x)
    shifted = xp.subtract(x, _row_max(xp, x, axis))
    total = _row_sum(xp, xp.exp(shifted), axis)
    shifted -= xp.log(xp.where(total == 0, 1, total))
    return shifted


def _row_max(xp, x, axis):
    """The max along ``axis`` (kept), 0 for a row that is all -inf (so it stays -inf)."""
    last = axis == -1 or axis == x.ndim - 1
    top = last_axis_max(xp, x) if last else x.max(axis=axis, keepdims=True)
    return xp.where(top == -xp.inf, 0, top)


def _row_sum(xp, x, axis):
    if axis == -1 or axis == x.ndim - 1:
        return last_axis_sum(xp, x)
    return x.sum(axis=axis, keepdims=True)


class Softmax(Function):
    def forward(self, xp, x):
        self.y = softmax_array(x, self.axis)
        return self.y

    def backward(self, xp, grad):
        y = self.y
        g = xp.asarray(grad * y)
        s = g.sum(axis=self.axis, keepdims=True)
        xp.subtract(grad, s, out=g)
        g *= y  # y * (grad - sum(grad * y))
        return g


class LogSoftmax(Function):
    def forward(self, xp, x):
        self.y = log_softmax_array(x, self.axis)
        return self.y

    def backward(self, xp, grad):
        return grad - xp.exp(self.y) * grad.sum(axis=self.axis, keepdims=True)


def softmax(x, axis: int = -1):
    x = amp.float32_if_half(x)
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis: int = -1):
    x = amp.float32_if_half(x)
    return LogSoftmax.apply(x, axis=axis)


# --------------------------------------------------------------------------- cross-entropy


class CrossEntropy(Function):
    """Softmax cross-entropy over the last axis of logits (..., V) against integer
    targets (...). Matches torch.nn.functional.cross_entropy: targets equal to
    ``ignore_index`` contribute nothing; with label smoothing eps the target
    distribution is (1 - eps) one-hot + eps / V; "mean" divides by the number of
    targets that are not ignored."""

    fused_path = False  # True once forward ran the fused kernels

    def forward(self, xp, logits, targets):
        if targets.shape != logits.shape[:-1]:
            raise ShapeError(
                f"cross_entropy: targets {targets.shape} must equal logits {logits.shape} "
                "without the last (class) axis"
            )
        self.shape = logits.shape
        if logits.shape[-1] and fused.usable(logits) and targets.dtype.kind in "iu":
            nll, valid = self._forward_fused(xp, logits, targets)
        else:
            nll, valid = self._forward_composed(xp, logits, targets)
        if self.reduction == "none":
            return nll.reshape(targets.shape)
        if self.reduction == "sum":
            return nll.sum()
        self.count = valid.sum().astype(nll.dtype)  # float32 loss stays float32
        return nll.sum() / self.count

    def _forward_composed(self, xp, logits, targets):
        V = logits.shape[-1]
        t = targets.reshape(-1)
        valid = t != self.ignore_index
        safe_t = xp.where(valid, t, 0)
        _check_targets(safe_t, V)
        x2 = logits.reshape(-1, V)
        rows = xp.arange(t.shape[0])
        eps = self.label_smoothing
        if _ce_blocks(xp, x2):
            nll, logp_sum = self._forward_blocks(x2, safe_t)
        else:
            logp = log_softmax_array(x2, axis=-1)  # (N, V)
            nll = -logp[rows, safe_t]  # (N,)
            logp_sum = logp.sum(axis=-1) if eps else None
            self.logp = logp
        if eps:
            nll = (1 - eps) * nll - (eps / V) * logp_sum
        nll = nll * valid
        self.t, self.rows, self.valid = safe_t, rows, valid
        return nll, valid

    def _forward_blocks(self, x2, t):
        """log_softmax_array's operations, in its order, per block of CE_BLOCK_ELEMENTS
        (L2-resident): the same bits, with no (N, V) temporary. Keeps the logits, each
        row's shift (max) and log of the sum of exponentials; backward recomputes
        logp = (x - max) - log(sum) from them, again the same bits."""
        N, V = x2.shape
        step = _ce_block_rows(V)
        nll = np.empty(N, x2.dtype)
        logp_sum = np.empty(N, x2.dtype) if self.label_smoothing else None
        top, log_total = np.empty((N, 1), x2.dtype), np.empty((N, 1), x2.dtype)
        shifted, e = np.empty((min(step, N), V), x2.dtype), np.empty((min(step, N), V), x2.dtype)
        local = np.arange(min(step, N))
        for s in range(0, N, step):
            xb = x2[s:s + step]
            b = xb.shape[0]
            m = top[s:s + b]
            xb.max(axis=-1, keepdims=True, out=m)  # (exact: last_axis_max's values)
            m[m == -np.inf] = 0
            sh = np.subtract(xb, m, out=shifted[:b])
            total = last_axis_sum(np, np.exp(sh, out=e[:b]))
            lt = log_total[s:s + b]
            np.log(np.where(total == 0, 1, total), out=lt)
            sh -= lt  # logp of these rows
            np.negative(sh[local[:b], t[s:s + b]], out=nll[s:s + b])
            if logp_sum is not None:
                logp_sum[s:s + b] = sh.sum(axis=-1)
        self.logits, self.top, self.log_total = x2, top, log_total
        return nll, logp_sum

    def _forward_fused(self, xp, logits, targets):
        """One kernel: lse per row and the loss (0 where ignored); keeps lse, not logp."""
        V = logits.shape[-1]
        t = xp.ascontiguousarray(targets.reshape(-1), dtype=np.int64)
        valid = t != self.ignore_index
        _check_targets(xp.where(valid, t, 0), V)
        self.fused_path, self.logits, self.t = True, logits.reshape(-1, V), t
        nll, self.lse = fused.cross_entropy_forward(self.logits, t, self.ignore_index,
                                                    self.label_smoothing)
        return nll, valid

    def backward(self, xp, grad):
        if self.fused_path:
            g = fused.cross_entropy_backward(
                self.logits, self.t, self.lse, grad, self.count if self.reduction == "mean"
                else None, self.ignore_index, self.label_smoothing)
            return g.reshape(self.shape), None
        eps, V = self.label_smoothing, self.shape[-1]
        if self.reduction == "none":
            scale = grad.reshape(-1, 1) * self.valid[:, None]
        elif self.reduction == "sum":
            scale = grad * self.valid[:, None]
        else:
            scale = (grad / self.count) * self.valid[:, None]
        if "logits" in self.__dict__:
            return self._backward_blocks(scale).reshape(self.shape), None
        g = xp.exp(self.logp)  # softmax (N, V), a fresh array we may edit in place
        g[self.rows, self.t] -= 1 - eps
        if eps:
            g -= eps / V
        g *= scale.astype(g.dtype, copy=False)
        return g.reshape(self.shape), None

    def _backward_blocks(self, scale):
        """The composed backward's operations per block of rows (softmax from the kept
        logits, shift and log-sum: forward's logp bits), into one fresh (N, V) array."""
        x2, eps = self.logits, self.label_smoothing
        N, V = x2.shape
        step = _ce_block_rows(V)
        g = backend.reusable_empty("cross_entropy.grad", (N, V), x2.dtype)
        scale = np.broadcast_to(scale.astype(g.dtype, copy=False), (N, 1))
        local = np.arange(min(step, N))
        for s in range(0, N, step):
            gb = g[s:s + step]
            b = gb.shape[0]
            np.subtract(x2[s:s + b], self.top[s:s + b], out=gb)
            gb -= self.log_total[s:s + b]
            np.exp(gb, out=gb)
            gb[local[:b], self.t[s:s + b]] -= 1 - eps
            if eps:
                gb -= eps / V
            gb *= scale[s:s + b]
        return g


# Rows per block of the NumPy cross-entropy: about this many logits (1 MiB of float32,
# L2-resident with its two scratch blocks on a 2 MiB-L2 core). GPT-2's (1024, 50257)
# logits, one thread, 2-core SPR VM: forward 1.2 s -> 55 ms, its backward 0.10 ->
# 0.56 s (the fresh 206 MB gradient's first touch now lands there): ~0.65 s a step
# less; the whole-array path's fresh 206 MB temporaries each page-fault.
CE_BLOCK_ELEMENTS = 262144


def _ce_block_rows(V: int) -> int:
    """A multiple of 4 rows: OpenBLAS's sgemv/dgemv (``last_axis_sum``) sums rows in
    groups of 4, so blocks that start on a group give each row the whole array's bits
    (on one BLAS thread; on more, within float rounding, as the threads' split goes)."""
    return max(4, CE_BLOCK_ELEMENTS // max(V, 1) // 4 * 4)


def _ce_blocks(xp, x2) -> bool:
    """Whether the blocked NumPy path runs: float32/float64 host logits, 2-D rows."""
    return xp is np and x2.dtype.char in "fd" and x2.ndim == 2 and x2.shape[-1] > 0


def _check_targets(safe_t, V):
    if bool(((safe_t < 0) | (safe_t >= V)).any()):
        raise TinyLMError(f"cross_entropy: a target is outside [0, {V}) and not ignore_index")


def cross_entropy(
    logits, targets, ignore_index: int = -100, label_smoothing: float = 0.0, reduction="mean"
):
    logits = amp.float32_if_half(logits)
    if reduction not in ("mean", "sum", "none"):
        raise TinyLMError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise TinyLMError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return CrossEntropy.apply(
        logits,
        targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


# --------------------------------------------------------------------------- norms


class LayerNorm(Function):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis."""

    kernels = None  # the kernel module forward ran (``_norm_kernels``), if any

    def forward(self, xp, x, *params):
        w = params[0] if self.has_weight else None
        b = params[-1] if self.has_bias else None
        kernels = _norm_kernels(x, w, b)
        if kernels is not None:
            self.kernels, self.x, self.w = kernels, x, w
            y, self.mean, self.rstd = kernels.norm_forward(
                x.reshape(-1, x.shape[-1]), w, b, self.eps, center=True)
            return y.reshape(x.shape)
        inv_d = 1.0 / x.shape[-1]
        xc = x - last_axis_sum(xp, x) * inv_d  # x - mean, fresh: becomes xhat in place
        y = xc * xc  # fresh: the squares, then the output
        var = last_axis_sum(xp, y) * inv_d
        self.rstd = 1 / xp.sqrt(var + self.eps)
        xc *= self.rstd
        self.xhat = xc
        self.w = w
        if w is None:
            y[...] = xc
        elif xp.result_type(xc, w) == y.dtype:
            xp.multiply(xc, w, out=y)
        else:
            y = xc * w
        if b is not None:
            y += b
        return y

    def backward(self, xp, grad):
        if self.kernels is not None:
            return _norm_backward_kernels(self, xp, grad, center=True)
        xhat = self.xhat
        # gx = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat)), in place on gx
        gx = grad * self.w if self.has_weight else grad.copy()  # gxhat, fresh
        inv_d = 1.0 / grad.shape[-1]
        tmp = gx * xhat
        m2 = last_axis_sum(xp, tmp) * inv_d
        m1 = last_axis_sum(xp, gx) * inv_d
        xp.multiply(xhat, m2, out=tmp)
        gx -= tmp
        gx -= m1
        gx *= self.rstd
        out = [gx]
        if self.has_weight:
            out.append(leading_sum(xp, xp.multiply(grad, xhat, out=tmp)))
        if self.has_bias:
            out.append(leading_sum(xp, grad))
        return tuple(out)


class RMSNorm(Function):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Llama, T5)."""

    kernels = None  # the kernel module forward ran (``_norm_kernels``), if any
    has_weight, has_bias = True, False

    def forward(self, xp, x, w):
        kernels = _norm_kernels(x, w, None)
        if kernels is not None:
            self.kernels, self.x, self.w = kernels, x, w
            y, self.mean, self.rstd = kernels.norm_forward(
                x.reshape(-1, x.shape[-1]), w, None, self.eps, center=False)
            return y.reshape(x.shape)
        mean_sq = last_axis_sum(xp, x * x)  # (..., 1), then in place: mean + eps, rstd
        mean_sq *= 1.0 / max(x.shape[-1], 1)
        mean_sq += self.eps
        self.rstd = xp.reciprocal(xp.sqrt(mean_sq, out=mean_sq), out=mean_sq)
        self.xhat, self.w = x * self.rstd, w
        return self.xhat * w

    def backward(self, xp, grad):
        if self.kernels is not None:
            return _norm_backward_kernels(self, xp, grad, center=False)
        xhat = self.xhat
        gxhat = grad * self.w
        gx = self.rstd * (gxhat - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))
        gw = leading_sum(xp, grad * xhat)
        return gx, gw


def _norm_kernels(x, w, b):
    """The kernels that take these arrays, as a module with ``norm_forward`` and
    ``norm_backward``: CUDA's fused ones (``kernels.fused``) or the compiled CPU ones
    (``kernels.native``); None for the composed path. Weight and bias of shape (D,)
    only (the kernels read w[j] for j < D; a broadcast weight takes the composed path)."""
    if not (x.shape[-1] and all(p is None or p.shape == x.shape[-1:] for p in (w, b))):
        return None
    if fused.usable(x, w, b):
        return fused
    if x.size and native.usable(x, w, b):
        return native
    return None


def _norm_backward_kernels(fn, xp, grad, center: bool):
    """(dx, dw?, db?) of a LayerNorm / RMSNorm node whose forward ran a kernel module."""
    D = grad.shape[-1]
    dy = xp.ascontiguousarray(xp.asarray(grad, dtype=np.float32)).reshape(-1, D)
    dx, dw, db = fn.kernels.norm_backward(dy, fn.x.reshape(-1, D), fn.w, fn.mean, fn.rstd,
                                          center, want_w=fn.has_weight, want_b=fn.has_bias)
    return (dx.reshape(grad.shape),) + tuple(g for g in (dw, db) if g is not None)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    x = amp.float32_if_half(x)
    params = [p for p in (weight, bias) if p is not None]
    return LayerNorm.apply(
        x, *params, eps=eps, has_weight=weight is not None, has_bias=bias is not None
    )


def rms_norm(x, weight, eps: float = 1e-6):
    x = amp.float32_if_half(x)
    return RMSNorm.apply(x, weight, eps=eps)


# --------------------------------------------------------------------------- dropout


class Dropout(Function):
    def forward(self, xp, x):
        rand_dtype = "float64" if x.dtype == "float64" else "float32"
        keep = backend.rng(xp).random(x.shape, dtype=rand_dtype) >= self.p
        self.scale = keep * x.dtype.type(1 / (1 - self.p))  # (x.shape) mask / (1 - p)
        return x * self.scale

    def backward(self, xp, grad):
        return grad * self.scale


def dropout(x, p: float = 0.1, training: bool = True):
    """Zero each element with probability p and scale the rest by 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise TinyLMError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x if isinstance(x, Tensor) else Tensor(x)
    return Dropout.apply(x, p=p)
