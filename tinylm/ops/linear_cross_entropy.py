"""The LM head and its cross-entropy in one op, chunked over rows: the loss without the
(B, T, V) logits.

    loss = linear_cross_entropy(h, targets, weight=model.lm_head.weight)
         # == cross_entropy(h @ weight.T, targets), never holding all the logits

A language model's last step makes logits (N, V) = h (N, d) @ W.T for N = B x T rows,
and the loss reads each row once: log-sum-exp and the target's logit. At GPT-2 size
(V = 50257) and 4 x 128 tokens the logits are 103 MB in float32, and the plain path
keeps two or three arrays of that size (the logits, the log-probabilities that
cross-entropy saves, the gradient it returns). Here rows go through in chunks of
``rows_per_chunk`` (about ``CHUNK_BYTES`` of logits each), and for each chunk::

    z   = h_c @ W.T                             # (n, V), the only big array, reused
    nll = logsumexp(z) - z[target]              # ((1 - eps) nll - eps/V sum log p: smoothing)
    dz  = (softmax(z) - onehot(target)) * w     # w: 1 / count ("mean") or 1, 0 where ignored
    dh_c = dz @ W;   dW += dz^T h_c             # the gradient, computed right away

The gradient is computed during the forward (the loss is a scalar, so backward only
scales it: Liger-Kernel's fused linear cross-entropy does the same), which costs no
second pass over the head: the same three products as the plain path. Saved for
backward: dh (N, d) and, only when the weight is trained, dW (V, d), the size of the
gradient the plain path makes too. Under ``no_grad`` (evaluation) only the loss is
computed. The Python loop runs over row chunks (N / rows_per_chunk of them), never over
single rows or the vocabulary.

``weight`` is a Tensor (V, d) (trained or not), or ``head`` a module with frozen
weights (no parameter requires a gradient): one that multiplies itself with arrays,
``head.matmul(x2)`` -> (n, V) and ``head.matmul_t(g2)`` -> (n, d) (``tinylm.quant``'s
packed layers: QLoRA's head), or else any module, called on each chunk (its backward
gives the chunk's dh; one more (n, V) array per chunk).
Reductions: "mean" (over the targets not ``ignore_index``, as ``cross_entropy``) and
"sum".
"""

from __future__ import annotations

from tinylm.autograd import enable_grad, no_grad
from tinylm.errors import ShapeError, TinyLMError
from tinylm.function import Function
from tinylm.tensor import Tensor

CHUNK_BYTES = 32 * 2**20  # logits per chunk: about 32 MiB (167 rows at V = 50257, float32)


def rows_per_chunk(V: int, itemsize: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // max(1, V * itemsize))


class LinearCrossEntropy(Function):
    """Inputs h (N, d) and, when given as a Tensor, the weight (V, d); the targets (N,),
    the ``head`` (or None), the options, ``rows`` (rows per chunk) and ``wants``
    (which inputs require a gradient) as attributes."""

    def forward(self, xp, h, *weight):
        w = weight[0] if weight else None
        N, d = h.shape
        V = w.shape[0] if w is not None else self.vocab_size
        t = self.targets
        valid = t != self.ignore_index
        safe = xp.where(valid, t, 0)
        if bool(((safe < 0) | (safe >= V)).any()):
            raise TinyLMError(f"cross_entropy: a target is outside [0, {V}) and not ignore_index")
        mean = self.reduction == "mean"
        count = valid.sum().astype(h.dtype) if mean else None  # the targets not ignored
        row_weight = valid.astype(h.dtype)  # (N,) each row's share of the loss
        if mean:
            row_weight /= count
        want_h = self.needs_grad and self.wants[0]  # (known before forward: apply's
        want_w = self.needs_grad and w is not None and self.wants[1]  # needs_input_grad is not)
        self.gh = xp.zeros_like(h) if want_h else None
        self.gw = xp.zeros_like(w) if want_w else None
        nll = xp.empty(N, dtype=h.dtype)
        for a in range(0, N, self.rows):
            b = min(N, a + self.rows)
            z = self._logits(xp, h[a:b], w)  # (n, V), fresh: edited in place below
            nll[a:b] = self._chunk(xp, z, safe[a:b], row_weight[a:b], V)
            if want_h or want_w:  # z is now dz
                if want_h:
                    self.gh[a:b] = self._input_grad(z, w)
                if want_w:
                    self.gw += z.T @ h[a:b]
        nll *= valid
        total = nll.sum()
        return total / count if mean else total

    def _logits(self, xp, hc, w):
        """The chunk's logits (n, V), a fresh array. A ``head`` with ``matmul`` /
        ``matmul_t`` (a packed head) multiplies itself; any other head module runs on
        the chunk, and with a gradient wanted its little graph (input leaf, output)
        is kept in self.graph for ``_input_grad``."""
        if w is not None:
            return hc @ w.T
        if _multiplies_itself(self.head):
            z = self.head.matmul(hc)
            return z if z.dtype == hc.dtype else z.astype(hc.dtype)
        x = Tensor(hc, requires_grad=self.gh is not None)
        with enable_grad() if x.requires_grad else no_grad():
            y = self.head(x)
        self.graph = (x, y) if x.requires_grad else None
        return y.data.astype(hc.dtype, copy=True)

    def _input_grad(self, z, w):
        """dz (n, V) -> dh (n, d): through the weight, or back through the head."""
        if w is not None:
            return z @ w
        if _multiplies_itself(self.head):
            return self.head.matmul_t(z)
        x, y = self.graph
        self.graph = None
        y.backward(z)
        return x.grad

    def _chunk(self, xp, z, t, row_weight, V):
        """nll of each row of ``z`` (n, V); afterwards, when a gradient is wanted, z
        holds d(loss)/dz for these rows (softmax - target distribution, weighted)."""
        eps, rows = self.label_smoothing, xp.arange(z.shape[0])
        z -= z.max(axis=-1, keepdims=True)
        target = z[rows, t]  # (n,) the target's logit (shifted)
        total = z.sum(axis=-1) if eps else None
        xp.exp(z, out=z)
        s = z.sum(axis=-1)  # (n,)
        lse = xp.log(s)  # the shifted log-sum-exp: log p_target = target - lse
        nll = lse - target
        if eps:  # (1 - eps) (-log p_t) - eps/V sum_v log p_v
            nll = (1 - eps) * nll - (eps / V) * (total - V * lse)
        if self.gh is not None or self.gw is not None:
            z /= s[:, None]  # softmax
            z[rows, t] -= 1 - eps
            if eps:
                z -= eps / V
            z *= row_weight[:, None]
        return nll

    def backward(self, xp, grad):
        g = xp.asarray(grad, dtype=self.gh.dtype if self.gh is not None else self.gw.dtype)
        gh = None if self.gh is None else self.gh * g
        if self.gw is None:
            return gh if len(self.needs_input_grad) == 1 else (gh, None)
        self.gw *= g  # ours alone: scaled in place, not copied (it may be V x d)
        return gh, self.gw


def _multiplies_itself(head) -> bool:
    return callable(getattr(head, "matmul", None)) and callable(getattr(head, "matmul_t", None))


def linear_cross_entropy(h, targets, weight=None, head=None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean",
                         chunk_bytes: int = CHUNK_BYTES, vocab_size: int | None = None):
    """The mean (or summed) cross-entropy of ``h @ weight.T`` (or ``head(h)``, whose
    output has ``vocab_size`` columns) against ``targets`` (h's shape without the last
    axis; -100 ignored): the value and gradients of ``cross_entropy(linear(h, weight),
    targets)``, in rows of about ``chunk_bytes`` of logits at a time (see the module doc)."""
    if (weight is None) == (head is None):
        raise TinyLMError("linear_cross_entropy takes weight= (a Tensor) or head=, one of them")
    if reduction not in ("mean", "sum"):
        raise TinyLMError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got "
                          f"{reduction!r} (for per-token losses use cross_entropy on logits)")
    if not 0.0 <= label_smoothing < 1.0:
        raise TinyLMError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    h = h if isinstance(h, Tensor) else Tensor(h)
    t = targets.data if isinstance(targets, Tensor) else targets
    t = h.xp.asarray(t)
    if t.shape != h.shape[:-1]:
        raise ShapeError(f"linear_cross_entropy: targets {t.shape} must equal the hidden "
                         f"states {h.shape} without the last (feature) axis")
    d = h.shape[-1]
    V = weight.shape[0] if weight is not None else vocab_size
    if head is not None and (not vocab_size or any(p.requires_grad for p in head.parameters())):
        raise TinyLMError("linear_cross_entropy: head= needs vocab_size= and frozen weights "
                          "(a trained head goes as weight=)")
    if weight is not None and weight.shape[1] != d:
        raise ShapeError(f"linear_cross_entropy: weight {weight.shape} for {d} features")
    h2 = h.reshape(-1, d)  # (N, d)
    rows = rows_per_chunk(V, h.dtype.itemsize, chunk_bytes)
    wants = (h.requires_grad, weight is not None and weight.requires_grad)
    options = dict(targets=t.reshape(-1), head=head, wants=wants, vocab_size=V,
                   ignore_index=ignore_index,
                   label_smoothing=float(label_smoothing), reduction=reduction, rows=rows)
    if weight is None:
        return LinearCrossEntropy.apply(h2, **options)
    return LinearCrossEntropy.apply(h2, weight, **options)
