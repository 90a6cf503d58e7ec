"""Memory-efficient attention: tiles, an online softmax, and recomputation in backward.

    o = softmax(q @ k^T * scale + bias) @ v       q: (B, H, T, hs), k, v: (B, Hkv, S, hs)

The naive path (``tinylm.ops.attention``) materialises the (B, H, T, S) scores: 256 MB
per head at T = 8192 in float32, and three times that during backward. This one never
holds more than one (Br x Bc) tile of scores per head (FlashAttention, Dao et al. 2022,
and its backward as in FlashAttention-2), so memory is O(T * hs):

forward, for each block of Br queries, walking over blocks of Bc keys::

    s  = q_i k_j^T * scale (+ mask, ALiBi, causal)      # (B, Hkv, rep*Br, Bc) tile
    m' = max(m, rowmax(s));  p = exp(s - m')            # running max, in place on s
    l  = l * exp(m - m') + rowsum(p)                    # running sum
    o  = o * exp(m - m') + p v_j                        # rescaled accumulator
    ... and at the end  o /= l,  lse = m + log(l)       # lse (B, H, T) saved

backward, recomputing each tile from the saved lse (no second softmax needed)::

    p  = exp(s - lse);  dV_j += p^T dO_i;  dp = dO_i V_j^T
    ds = p * (dp - D_i)   with D = rowsum(dO * O);  dQ_i += ds K_j;  dK_j += ds^T Q_i

Causal attention skips the key tiles a query tile cannot see (about half the work) and
masks only the tiles on the diagonal. Grouped-query attention never repeats k/v: the
``rep = H / Hkv`` query heads that share a kv head are stacked as extra rows of one
tile, ``(B, Hkv, rep * Br, hs) @ (B, Hkv, hs, Bc)``, so their dK/dV sum falls out of the
GEMM. The Python loop runs over tiles (T/Br * S/Bc iterations), never over batch,
heads or positions; inside a tile everything is one batched GEMM or one in-place ufunc.

Conventions are those of ``scaled_dot_product_attention`` and the CUDA kernel
(``tinylm.kernels.flash_attention``): the causal mask is bottom-right aligned (query i
sits at absolute position i + S - T, for a KV cache), ``mask`` is boolean (True = keep)
or additive and broadcastable to (B, H, T, S), ALiBi adds ``-slope_h * |pos_i - j|``.
A query row that sees no key at all gets o = 0 and lse = -inf, and no gradient (the
rule every attention path follows: ``tinylm.ops.attention``, EMPTY ROWS).

Accumulation is float32 (float64 for float64 inputs, as gradcheck needs); float16
inputs are upcast once, O(T * hs). Tile sizes (``block_q``, ``block_k``) default to
values measured on a CPU with 1 MB of L2 per core (see BLOCK_Q); any sizes work.

Threads: query tiles are independent, so on NumPy the forward splits them over
``tinylm.threads.cpu_threads()`` Python threads (the BLAS library's thread limit, e.g.
``OPENBLAS_NUM_THREADS``), each calling single-threaded BLAS. Backward splits the batch
rows or the kv heads instead when their count is a multiple of the threads: each thread
writes its own slice of dQ, dK and dV, and no partial sums are held (otherwise each
thread sums into its own dK and dV over the keys its query tiles see, O(S * hs) more
memory per thread, added up at the end). The split is fixed by the shapes and the
thread count, so results do not depend on thread timing; the forward and dQ never
depend on the thread count, dK and dV only with the query-tile split.
(Letting a multi-threaded BLAS split each
tile-sized GEMM instead synchronises its threads thousands of times per op, which cost
up to 10x on a machine with busy cores.) Per core the op keeps up with torch's fused
CPU kernel (bench/attention.py, bench/RESULTS.md).
"""

from __future__ import annotations

import copy
import math

import numpy as np

from tinylm.errors import ShapeError, TinyLMError
from tinylm.function import Function
from tinylm.tensor import Tensor
from tinylm.threads import balance, cpu_threads, run_parts

# Default tiles: (Br x Bc) = 256 x 256 score tiles. All B * H heads of a tile are in
# flight at once, so when their score tiles would pass TILE_BYTES the larger block side
# halves until they fit (B * H = 48: 128 x 128), down to MIN_BLOCK. Measured on one
# core with 1 MB of L2 (bench/RESULTS.md): B * H = 4, T = 4096: within 5 % of the best
# from 128 x 256 up, 25 % slower at 64 x 64; B * H = 48, T = 1024: 128 x 128 best,
# 256 x 256 1.3x and 512 x 512 1.9x its time.
BLOCK_Q = 256
BLOCK_K = 256
TILE_BYTES = 4 << 20
MIN_BLOCK = 32


def _blocks(block_q, block_k, heads: int, itemsize: int) -> tuple:
    """(Br, Bc): the sizes asked for, else the defaults shrunk for ``heads`` = B * H."""
    br = BLOCK_Q if block_q is None else int(block_q)
    bc = BLOCK_K if block_k is None else int(block_k)
    while heads * br * bc * itemsize > TILE_BYTES:
        if block_k is None and bc >= br and bc > MIN_BLOCK:
            bc //= 2
        elif block_q is None and br > MIN_BLOCK:
            br //= 2
        elif block_k is None and bc > MIN_BLOCK:
            bc //= 2
        else:
            break
    return br, bc


def alibi_bias(xp, slopes, T: int, S: int, dtype):
    """(H, T, S) ALiBi bias ``-slope_h * |(i + S - T) - j|`` (for causal attention this is
    ``-slope * (query_pos - key_pos)`` on every key a query sees, as in Press et al. and
    BLOOM). The reference; the tiled op builds it one tile at a time."""
    qpos = xp.arange(S - T, S, dtype=dtype)[:, None]
    kpos = xp.arange(S, dtype=dtype)[None, :]
    return -xp.asarray(slopes, dtype=dtype).reshape(-1, 1, 1) * xp.abs(qpos - kpos)


class _Plan:
    """Shapes, tiles and the constant biases of one attention call, shared by forward
    and backward. ``bias_tile`` adds the mask, ALiBi and causal parts to a score tile."""

    def __init__(self, xp, q, k, v, scale, causal, mask, slopes, block_q, block_k):
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise ShapeError(
                f"attention expects (B, H, T, hs) arrays, got {q.shape}, {k.shape}, {v.shape}"
            )
        B, H, T, d = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        if k.shape != v.shape or k.shape[0] != B or k.shape[3] != d or H % Hkv:
            raise ShapeError(
                f"attention: q {q.shape} needs k and v of one shape (B, Hkv, S, {d}) with Hkv "
                f"dividing H; got k {k.shape}, v {v.shape}"
            )
        self.B, self.H, self.Hkv, self.rep, self.T, self.S, self.d = B, H, Hkv, H // Hkv, T, S, d
        self.off = S - T  # query i sits at absolute position i + off
        self.acc = np.promote_types(q.dtype, np.float32)  # float32, or float64
        self.scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        self.causal = bool(causal)
        self.br, self.bc = _blocks(block_q, block_k, B * H, np.dtype(self.acc).itemsize)
        if self.br < 1 or self.bc < 1:
            raise TinyLMError(f"tiled attention: block sizes must be positive, got "
                              f"({self.br}, {self.bc})")
        self.drop = self.add = None
        if mask is not None:
            self._set_mask(xp, mask)
        self.neg_slopes = None
        if slopes is not None:
            s = xp.asarray(slopes, dtype=self.acc)
            if s.shape != (H,):
                raise ShapeError(
                    f"alibi_slopes must have shape ({H},), one per head; got {s.shape}"
                )
            self.neg_slopes = (-s).reshape(1, Hkv, self.rep, 1, 1)

    def _set_mask(self, xp, mask):
        m = xp.asarray(mask)
        shape, full = m.shape, (self.B, self.H, self.T, self.S)
        if m.ndim > 4:
            raise ShapeError(f"attention mask {shape} has {m.ndim} dims; it must broadcast "
                             f"to {full}")
        m = m.reshape((1,) * (4 - m.ndim) + shape)  # (Bm, Hm, Tm, Sm)
        if any(a not in (1, b) for a, b in zip(m.shape, full)):
            raise ShapeError(f"attention mask {shape} does not broadcast to {full}")
        if m.shape[1] == self.H:  # per query head: group as (Hkv, rep) like the tiles
            m = m.reshape(m.shape[0], self.Hkv, self.rep, m.shape[2], m.shape[3])
        else:
            m = m[:, :, None]  # (Bm, 1, 1, Tm, Sm)
        if m.dtype == bool:
            self.drop = ~m  # True where a score is masked out
        else:
            self.add = m.astype(self.acc, copy=False)

    def key_end(self, i1: int) -> int:
        """Keys [0, key_end) are seen by some query of a tile ending at row i1."""
        return min(self.S, max(0, i1 + self.off)) if self.causal else self.S

    def bias_tile(self, xp, s5, i0, i1, j0, j1, scratch):
        """Add mask, ALiBi and causal masking to the (B, Hkv, rep, br, bc) scores s5."""
        for m in (self.drop, self.add):
            if m is None:
                continue
            rows = slice(i0, i1) if m.shape[3] > 1 else slice(None)
            cols = slice(j0, j1) if m.shape[4] > 1 else slice(None)
            if m is self.drop:
                xp.copyto(s5, -xp.inf, where=m[:, :, :, rows, cols])
            else:
                s5 += m[:, :, :, rows, cols]
        if self.neg_slopes is not None:
            dist = (xp.arange(i0 + self.off, i1 + self.off, dtype=self.acc)[:, None]
                    - xp.arange(j0, j1, dtype=self.acc)[None, :])  # (br, bc)
            xp.abs(dist, out=dist)
            bias = scratch[..., : j1 - j0]  # (1, Hkv, rep, br, bc)
            xp.multiply(self.neg_slopes, dist, out=bias)
            s5 += bias
        if self.causal and j1 - 1 > i0 + self.off:  # the tile crosses the diagonal
            hidden = (xp.arange(j0, j1)[None, :]
                      > xp.arange(i0 + self.off, i1 + self.off)[:, None])  # (br, bc)
            xp.copyto(s5, -xp.inf, where=hidden)

    def part(self, axis: int, lo: int, hi: int) -> "_Plan":
        """This plan for batch rows (``axis`` 0) or kv heads (``axis`` 1) [lo, hi) only:
        the same tiles, the mask and ALiBi slopes cut to match."""
        sub = copy.copy(self)
        if axis == 0:
            sub.B = hi - lo
        else:
            sub.Hkv = hi - lo
        cut = (slice(None),) * axis + (slice(lo, hi),)
        for name in ("drop", "add", "neg_slopes"):
            m = getattr(self, name)
            if m is not None and m.shape[axis] > 1:
                setattr(sub, name, m[cut])
        return sub

    def rows(self, x5, i0, i1):
        """Query rows [i0, i1) of a (B, Hkv, rep, T, ...) array as one (B, Hkv, rep*br, ...)
        tile (a view when rep == 1, a small copy otherwise)."""
        t = x5[:, :, :, i0:i1]
        return t.reshape((self.B, self.Hkv, self.rep * (i1 - i0)) + t.shape[4:])

    def scaled_rows(self, xp, q5, i0, i1):
        """``rows(q5, i0, i1) * scale`` in a new tile-sized array."""
        t = q5[:, :, :, i0:i1]
        out = xp.empty(t.shape, dtype=self.acc)
        xp.multiply(t, self.acc.type(self.scale), out=out)
        return out.reshape((self.B, self.Hkv, self.rep * (i1 - i0), self.d))


def query_tiles(plan: _Plan, threads: int) -> list:
    """The query tiles [(i0, i1), ...] split into at most ``threads`` lists of about
    equal work (a causal tile's work grows with the keys it sees); deterministic, so a
    run's results do not depend on which thread finishes first."""
    tiles = [(i0, min(i0 + plan.br, plan.T)) for i0 in range(0, plan.T, plan.br)]
    costs = [(i1 - i0) * max(plan.key_end(i1), 1) for i0, i1 in tiles]
    return [[tiles[i] for i in part] for part in balance(costs, threads)]


def head_parts(plan: _Plan, threads: int):
    """``[(axis, lo, hi), ...]``: the batch rows (axis 0) or else the kv heads (axis 1)
    split evenly over ``threads`` threads, or None when neither count is a multiple of
    ``threads`` (then backward splits query tiles instead)."""
    if threads > 1:
        for axis, n in ((0, plan.B), (1, plan.Hkv)):
            if n % threads == 0:
                step = n // threads
                return [(axis, lo, lo + step) for lo in range(0, n, step)]
    return None


def tiled_attention_forward(xp, plan: _Plan, q5, k, v, threads: int = 1):
    """(o5, lse5): o (B, Hkv, rep, T, hs) and the row logsumexp lse (B, Hkv, rep, T).

    ``q5`` holds q as (B, Hkv, rep, T, hs) (each query tile is scaled into a tile-sized
    buffer, so no scaled copy of q is kept); k, v are (B, Hkv, S, hs); all in the
    accumulation dtype. Query tiles are independent: ``threads`` threads share them out."""
    p, acc = plan, plan.acc
    B, Hkv, rep, T, d = p.B, p.Hkv, p.rep, p.T, p.d
    kt = k.swapaxes(-1, -2)  # (B, Hkv, hs, S), a view
    o5 = xp.empty((B, Hkv, rep, T, d), dtype=acc)
    lse5 = xp.empty((B, Hkv, rep, T), dtype=acc)
    ninf = acc.type(-np.inf)

    def tile(i0, i1):
        br, R = i1 - i0, rep * (i1 - i0)
        qt = p.scaled_rows(xp, q5, i0, i1)  # (B, Hkv, R, hs)
        s_buf = xp.empty((B, Hkv, R, p.bc), dtype=acc)
        s5_buf = s_buf.reshape(B, Hkv, rep, br, p.bc)
        scratch = xp.empty((1, Hkv, rep, br, p.bc), dtype=acc) if p.neg_slopes is not None else None
        pv = xp.empty((B, Hkv, R, d), dtype=acc)
        o_t = xp.zeros((B, Hkv, R, d), dtype=acc)
        m = xp.full((B, Hkv, R), ninf, dtype=acc)  # running max
        l = xp.zeros((B, Hkv, R), dtype=acc)  # running sum
        jend = p.key_end(i1)
        for j0 in range(0, jend, p.bc):
            j1 = min(j0 + p.bc, jend)
            s = s_buf[..., : j1 - j0]  # (B, Hkv, R, bc)
            xp.matmul(qt, kt[..., j0:j1], out=s)
            p.bias_tile(xp, s5_buf[..., : j1 - j0], i0, i1, j0, j1, scratch)
            m_new = s.max(axis=-1)
            xp.maximum(m_new, m, out=m_new)
            # a row that has seen only masked keys keeps m = -inf: shift by 0 instead
            shift = xp.where(m_new == ninf, 0, m_new)
            alpha = xp.exp(m - shift)  # rescales what was summed under the old max
            m = m_new
            s -= shift[..., None]
            xp.exp(s, out=s)  # p, in place
            l *= alpha
            l += s.sum(axis=-1)
            o_t *= alpha[..., None]
            xp.matmul(s, v[:, :, j0:j1], out=pv)
            o_t += pv
        seen = l > 0
        o_t /= xp.where(seen, l, 1)[..., None]
        lse = xp.where(seen, xp.where(m == ninf, 0, m) + xp.log(xp.where(seen, l, 1)), ninf)
        o5[:, :, :, i0:i1] = o_t.reshape(B, Hkv, rep, br, d)
        lse5[:, :, :, i0:i1] = lse.reshape(B, Hkv, rep, br)

    def work(tiles):
        for i0, i1 in tiles:
            tile(i0, i1)

    run_parts(work, query_tiles(p, threads))
    return o5, lse5


def tiled_attention_backward(xp, plan: _Plan, q5, k, v, o5, lse5, do5, threads: int = 1):
    """(dq, dk, dv) of sum(o * do), recomputing score tiles from ``lse5``; ``dq`` is
    the gradient of the unscaled q, (B, H, T, hs) (an array of its own, not a view:
    autograd would copy a view before making it a leaf's ``.grad``).

    With ``threads`` > 1 the threads split the batch rows or the kv heads when their
    count allows (``head_parts``): each writes its own slice of dQ, dK and dV, so no
    partial sums are held and the result is the one-thread result. Otherwise they
    split the query tiles (``_backward_tiles``)."""
    acc = plan.acc
    dq = xp.empty((plan.B, plan.H, plan.T, plan.d), dtype=acc)
    dq5 = dq.reshape(q5.shape)  # (B, Hkv, rep, T, hs), a view
    dk = xp.zeros(k.shape, dtype=acc)
    dv = xp.zeros(v.shape, dtype=acc)
    heads = head_parts(plan, threads)
    if heads is None:
        _backward_tiles(xp, plan, (q5, k, v, o5, lse5, do5), (dq5, dk, dv), threads)
        return dq, dk, dv

    def work(part):
        axis, lo, hi = part
        cut = (slice(None),) * axis + (slice(lo, hi),)
        _backward_tiles(xp, plan.part(axis, lo, hi), [x[cut] for x in (q5, k, v, o5, lse5, do5)],
                        (dq5[cut], dk[cut], dv[cut]), 1)

    run_parts(work, heads)
    return dq, dk, dv


def _backward_tiles(xp, plan: _Plan, inputs, out, threads: int) -> None:
    """The backward of ``tiled_attention_backward`` into ``out`` = (dq5, dk, dv), dk and
    dv zero. With ``threads`` > 1 the threads share the query tiles; the first one adds
    into ``out``'s dK and dV, each other one into its own (O(S * hs), over the keys its
    tiles see), summed in at the end in a fixed order."""
    p, acc = plan, plan.acc
    q5, k, v, o5, lse5, do5 = inputs
    dq5, dk_out, dv_out = out
    B, Hkv, rep, d = p.B, p.Hkv, p.rep, p.d
    kt, vt = k.swapaxes(-1, -2), v.swapaxes(-1, -2)
    # rows that saw nothing: p = exp(s - inf) = 0 everywhere, so no gradient
    lse5 = xp.where(lse5 == -np.inf, np.inf, lse5)

    def tile(i0, i1, dk, dv):
        br, R = i1 - i0, rep * (i1 - i0)
        qt, dot = p.scaled_rows(xp, q5, i0, i1), p.rows(do5, i0, i1)  # (B, Hkv, R, hs)
        lse = p.rows(lse5, i0, i1)[..., None]  # (B, Hkv, R, 1)
        dlt = (dot * p.rows(o5, i0, i1)).sum(axis=-1)[..., None]  # D = rowsum(dO * O)
        s_buf = xp.empty((B, Hkv, R, p.bc), dtype=acc)
        s5_buf = s_buf.reshape(B, Hkv, rep, br, p.bc)
        dp_buf = xp.empty((B, Hkv, R, p.bc), dtype=acc)
        scratch = xp.empty((1, Hkv, rep, br, p.bc), dtype=acc) if p.neg_slopes is not None else None
        kv_buf = xp.empty((B, Hkv, p.bc, d), dtype=acc)
        q_buf = xp.empty((B, Hkv, R, d), dtype=acc)
        dq_t = xp.zeros((B, Hkv, R, d), dtype=acc)
        for j0 in range(0, p.key_end(i1), p.bc):
            j1 = min(j0 + p.bc, p.key_end(i1))
            bc = j1 - j0
            s, dp, kv = s_buf[..., :bc], dp_buf[..., :bc], kv_buf[:, :, :bc]
            xp.matmul(qt, kt[..., j0:j1], out=s)
            p.bias_tile(xp, s5_buf[..., :bc], i0, i1, j0, j1, scratch)
            s -= lse
            xp.exp(s, out=s)  # P (B, Hkv, R, bc)
            xp.matmul(s.swapaxes(-1, -2), dot, out=kv)
            dv[:, :, j0:j1] += kv  # dV_j += P^T dO_i
            xp.matmul(dot, vt[..., j0:j1], out=dp)  # dP = dO_i V_j^T
            dp -= dlt
            dp *= s  # dS (without the scale)
            xp.matmul(dp, k[:, :, j0:j1], out=q_buf)
            dq_t += q_buf  # dQ_i += dS K_j
            xp.matmul(dp.swapaxes(-1, -2), qt, out=kv)
            dk[:, :, j0:j1] += kv  # dK_j += dS^T (Q_i * scale)
        dq_t *= p.scale
        dq5[:, :, :, i0:i1] = dq_t.reshape(B, Hkv, rep, br, d)

    def work(job):  # dK, dV over the keys these tiles see (all S without causal)
        first, tiles = job
        seen = max(p.key_end(i1) for _, i1 in tiles)
        if first:
            dk, dv = dk_out[:, :, :seen], dv_out[:, :, :seen]
        else:
            dk = xp.zeros((B, Hkv, seen, d), dtype=acc)
            dv = xp.zeros((B, Hkv, seen, d), dtype=acc)
        for i0, i1 in tiles:
            tile(i0, i1, dk, dv)
        return dk, dv

    parts = query_tiles(p, threads)
    partial = run_parts(work, [(w == 0, tiles) for w, tiles in enumerate(parts)])
    for dk_w, dv_w in partial[1:]:  # in a fixed order
        seen = dk_w.shape[2]
        dk_out[:, :, :seen] += dk_w
        dv_out[:, :, :seen] += dv_w


class TiledAttention(Function):
    """softmax(q @ k^T * scale + bias) @ v as one node that never holds the (T, S) scores.

    ``TiledAttention.apply(q, k, v, scale=None, causal=False, mask=None, alibi_slopes=None,
    block_q=None, block_k=None, threads=None)``: q (B, H, T, hs), k and v (B, Hkv, S, hs) Tensors;
    ``mask`` a constant array (bool, True = keep, or additive) broadcastable to
    (B, H, T, S); ``alibi_slopes`` (H,). Computes in float32 (float64 for float64
    inputs) and returns the inputs' dtype, like the naive path.
    """

    scale = None
    causal = False
    mask = None
    alibi_slopes = None
    block_q = None
    block_k = None
    threads = None  # None: tinylm.threads.cpu_threads() on NumPy, 1 on CuPy

    def forward(self, xp, q, k, v):
        plan = _Plan(xp, q, k, v, self.scale, self.causal, self.mask, self.alibi_slopes,
                     self.block_q, self.block_k)
        B, H, T, d = q.shape
        out_dtype = xp.result_type(q, k, v)  # float16 in, float16 out
        # q as it is when it is C-contiguous in the accumulation dtype (the tiles scale
        # it as they go: no scaled copy of q is held), else one converted copy
        q5 = xp.ascontiguousarray(q, dtype=plan.acc).reshape(B, plan.Hkv, plan.rep, T, d)
        k = xp.ascontiguousarray(k, dtype=plan.acc)
        v = xp.ascontiguousarray(v, dtype=plan.acc)
        threads = (self.threads or cpu_threads()) if xp is np else 1  # CuPy: one stream
        o5, lse5 = tiled_attention_forward(xp, plan, q5, k, v, threads)
        if self.needs_grad:
            self.saved = (plan, q5, k, v, o5, lse5, threads)
        o = o5.reshape(B, H, T, d)  # (B, H, T, hs)
        return o.astype(out_dtype, copy=False)

    def backward(self, xp, grad):
        plan, q5, k, v, o5, lse5, threads = self.saved
        B, H, T, d = grad.shape
        do5 = xp.ascontiguousarray(grad, dtype=plan.acc).reshape(B, plan.Hkv, plan.rep, T, d)
        return tiled_attention_backward(xp, plan, q5, k, v, o5, lse5, do5, threads)


def tiled_attention(q, k, v, mask=None, is_causal: bool = False, scale=None,
                    alibi_slopes=None, block_q=None, block_k=None, threads=None):
    """Attention with O(T) memory; the same arguments and result as
    ``scaled_dot_product_attention(..., impl="tiled")`` (which calls this).

    >>> import tinylm
    >>> q = tinylm.randn(1, 4, 300, 16); k = v = tinylm.randn(1, 2, 300, 16)  # GQA 4:2
    >>> tiled_attention(q, k, v, is_causal=True, block_q=128, block_k=64).shape
    (1, 4, 300, 16)
    """
    if isinstance(mask, Tensor):
        if mask.requires_grad:
            raise TinyLMError(
                "tiled attention takes a constant mask; a mask that learns needs the "
                "naive path: scaled_dot_product_attention(..., impl='naive')"
            )
        mask = mask.data
    if isinstance(alibi_slopes, Tensor):
        alibi_slopes = alibi_slopes.data
    return TiledAttention.apply(q, k, v, scale=scale, causal=is_causal, mask=mask,
                                alibi_slopes=alibi_slopes, block_q=block_q, block_k=block_k,
                                threads=threads)
