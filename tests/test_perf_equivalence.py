"""The performance paths against the plain formulations they replace: same values
(bit for bit where the operations are the same, else to float32 rounding)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinylm import backend
from tinylm.ops.elementwise import exact_gelu

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _plain_gelu_slope(x, cdf):
    """The exact GELU's backward before the blocks: grad * (x phi(x) + Phi(x))."""
    g = x * x
    g *= -0.5
    np.exp(g, out=g)
    g *= _INV_SQRT_2PI
    g *= x
    g += cdf
    return g


@pytest.mark.parametrize("shape", [(12, 64, 512), (3, 40_001), (7,), (backend.GELU_BLOCK,),
                                   (2, backend.GELU_BLOCK + 1)])
def test_blocked_gelu_is_bit_identical_to_the_whole_array_formula(shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.flat[:4] = [0.0, -7.5, 9.0, -0.0][: x.size]
    grad = rng.standard_normal(shape).astype(np.float32)
    y, cdf = backend.gelu_forward(x)
    want_cdf = backend.normal_cdf(x)
    assert y.dtype == cdf.dtype == np.float32 and y.shape == cdf.shape == x.shape
    np.testing.assert_array_equal(cdf, want_cdf)
    np.testing.assert_array_equal(y, x * want_cdf)
    y2, slope = backend.gelu_forward(x, slope=True)
    np.testing.assert_array_equal(y2, y)
    want_slope = _plain_gelu_slope(x, want_cdf)
    np.testing.assert_array_equal(slope, want_slope)
    # the backward (grad * slope) is the old one's (x phi + Phi) * grad, bit for bit
    np.testing.assert_array_equal(grad * slope, want_slope * grad)


def test_blocked_gelu_reads_strided_inputs_and_matches_float64():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 1030)) * 2).astype(np.float32)[:, ::2]  # not contiguous
    y, slope = backend.gelu_forward(x, slope=True)
    x64 = x.astype(np.float64)
    phi64 = 0.5 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    np.testing.assert_allclose(y, x64 * phi64, rtol=0, atol=6e-7 * np.abs(x64).max())
    dens = np.exp(-0.5 * x64 * x64) * _INV_SQRT_2PI
    np.testing.assert_allclose(slope, phi64 + x64 * dens, rtol=0, atol=2e-6)
    y2, slope2 = backend.gelu_forward(np.ascontiguousarray(x), slope=True)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(slope, slope2)


def test_gelu_kernels_keep_float64_exact_and_0d():
    x = np.linspace(-5, 5, 11)
    y, cdf = backend.gelu_forward(x)
    exact = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    np.testing.assert_allclose(cdf, exact, rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(y, x * exact, rtol=1e-15, atol=1e-16)
    _, slope = backend.gelu_forward(x, slope=True)
    np.testing.assert_allclose(slope, exact + x * np.exp(-0.5 * x * x) * _INV_SQRT_2PI,
                               rtol=1e-14, atol=1e-16)
    y0, s0 = backend.gelu_forward(np.array(0.5, np.float32), slope=True)
    assert y0.shape == s0.shape == ()
    assert abs(float(y0) - 0.5 * 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))) < 1e-7


def test_gelu_op_backward_matches_torch_and_keeps_no_input():
    torch = pytest.importorskip("torch")
    from tinylm import ops
    from tinylm.autograd import no_grad
    from tinylm.tensor import Tensor

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 33, 70)) * 2).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    t = Tensor(x, requires_grad=True)
    y = ops.gelu(t)
    assert not hasattr(y.creator, "x")  # only the slope is kept for the backward
    y.backward(Tensor(g))
    tx = torch.from_numpy(x).requires_grad_()
    ty = torch.nn.functional.gelu(tx)
    ty.backward(torch.from_numpy(g))
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=2e-6, atol=1e-6)  # |x| 1e-7
    np.testing.assert_allclose(t.grad, tx.grad.numpy(), rtol=2e-6, atol=1e-6)
    with no_grad():
        np.testing.assert_array_equal(ops.gelu(Tensor(x)).data, y.data)


@pytest.mark.parametrize("shape", [(12, 4, 64, 64), (768, 66), (5, 48), (3, 2, 128), (7, 17),
                                   (0, 64), (4, 1024), (2, 96)])
def test_last_axis_max_equals_numpy_max(shape):
    from tinylm.ops.reduce import last_axis_max

    rng = np.random.default_rng(2)
    a = rng.standard_normal(shape).astype(np.float32)
    if a.size:
        a.reshape(-1, shape[-1])[0] = -np.inf  # a fully masked row
        a.reshape(-1, shape[-1])[-1, shape[-1] // 3] = np.nan  # NaN wins, as in NumPy
        a.reshape(-1, shape[-1])[len(a.reshape(-1, shape[-1])) // 2, -1] = 1e30
    got = last_axis_max(np, a)
    want = a.max(axis=-1, keepdims=True)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    strided = np.repeat(a, 2, axis=-1)[..., ::2]  # same values, not contiguous
    np.testing.assert_array_equal(last_axis_max(np, strided), want)


def test_fused_attention_with_strided_qkv_matches_float64():
    """The fused node on q, k, v that are views of one (B, T, 3C) projection (as the
    models hand them over): forward and gradients against float64 softmax attention."""
    from tinylm import ops
    from tinylm.tensor import Tensor

    rng = np.random.default_rng(4)
    B, T, H, hs = 3, 20, 2, 8
    qkv = rng.standard_normal((B, T, 3 * H * hs)).astype(np.float32)
    g = rng.standard_normal((B, H, T, hs)).astype(np.float32)
    t = Tensor(qkv, requires_grad=True)
    heads = t.reshape(B, T, 3 * H, hs).swapaxes(1, 2)
    q, k, v = heads[:, :H], heads[:, H:2 * H], heads[:, 2 * H:]
    y = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    y.backward(Tensor(g))

    def ref(qkv64):
        h = qkv64.reshape(B, T, 3 * H, hs).transpose(0, 2, 1, 3)
        q, k, v = h[:, :H], h[:, H:2 * H], h[:, 2 * H:]
        s = q @ k.swapaxes(-1, -2) / math.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return p @ v

    x64 = qkv.astype(np.float64)
    np.testing.assert_allclose(y.data, ref(x64), rtol=1e-5, atol=1e-6)
    eps, num = 1e-6, np.zeros_like(x64)
    flat = x64.reshape(-1)
    for i in range(0, flat.size, 7):  # a sample of central differences
        old = flat[i]
        flat[i] = old + eps
        up = (ref(x64) * g).sum()
        flat[i] = old - eps
        down = (ref(x64) * g).sum()
        flat[i] = old
        num.reshape(-1)[i] = (up - down) / (2 * eps)
    picked = np.zeros(flat.size, bool)
    picked[::7] = True
    np.testing.assert_allclose(t.grad.reshape(-1)[picked], num.reshape(-1)[picked],
                               rtol=1e-3, atol=1e-4)


def test_split_backward_of_a_strided_input_keeps_its_layout_and_values():
    """Split.backward writes the gradient in the input's memory order: for heads split
    from a (B, T, 3n, hs) projection the gradient reaching the projection is then
    C-contiguous (no copy in the reshape's backward) and the values are the plain
    concatenation's."""
    from tinylm.tensor import Tensor

    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((2, 5, 6 * 4)).astype(np.float32)
    gs = [rng.standard_normal((2, 2, 5, 4)).astype(np.float32) for _ in range(3)]
    x = Tensor(qkv, requires_grad=True)
    q, k, v = x.reshape(2, 5, 6, 4).swapaxes(1, 2).split([2, 2, 2], axis=1)
    ((q * Tensor(gs[0])).sum() + (k * Tensor(gs[1])).sum() + (v * Tensor(gs[2])).sum()).backward()
    want = np.concatenate(gs, axis=1).swapaxes(1, 2).reshape(2, 5, 24)
    np.testing.assert_array_equal(x.grad, want)
    # a contiguous input: the plain concatenation
    y = Tensor(qkv, requires_grad=True)
    a, b = y.split([10, 14], axis=-1)
    ((a * 2.0).sum() + (b * 3.0).sum()).backward()
    np.testing.assert_array_equal(y.grad, np.concatenate([np.full((2, 5, 10), 2.0, np.float32),
                                                          np.full((2, 5, 14), 3.0, np.float32)],
                                                         axis=-1))


def _clipped_gelu(x, slope):
    """The blocked GELU's formula before it dropped the clip to [-6, 6] (normal_cdf's)."""
    c = np.clip(x, -backend._PHI_CLIP, backend._PHI_CLIP)
    g = backend._horner(c * c, backend._PHI_TANH, np.empty_like(c))
    g *= c
    np.tanh(g, out=g)
    g *= 0.5
    g += 0.5
    with np.errstate(invalid="ignore"):
        y = x * g
    if slope:
        with np.errstate(over="ignore", invalid="ignore"):  # (0 * inf at x = inf)
            g = g + _plain_gelu_slope(x, np.zeros_like(x))
    return y, g


def test_unclipped_gelu_is_bit_identical_to_the_clipped_one_everywhere():
    # every float32 in [0.5, 8] at a stride of 31 bit patterns (odd: all mantissa bits
    # move), every float32 in [5.9, 6.1] and [-6.1, -5.9], a strided sweep over all
    # finite float32 bit patterns, and the specials: the same bits, and no warning
    half, lo = np.float32(0.5).view(np.int32), np.float32(8.0).view(np.int32)
    hi = np.float32(5.9).view(np.int32)
    top = np.float32(6.1).view(np.int32)
    pos = np.concatenate([
        np.arange(half, lo, 31, dtype=np.int32), np.arange(hi, top, dtype=np.int32),
        np.arange(0, np.float32(np.finfo(np.float32).max).view(np.int32), 4093,
                  dtype=np.int32)]).view(np.float32)
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 6.0, -6.0, 1e4, 1e20, 3e38],
                       np.float32)
    x = np.concatenate([pos, -pos, special]).astype(np.float32)
    # the kernel keeps its own overflow quiet (-inf * Phi = -inf * 0 is NaN, as before)
    with np.errstate(over="raise", invalid="ignore"):
        y, cdf = backend.gelu_forward(x)
        y2, slope = backend.gelu_forward(x, slope=True)
    want_y, want_cdf = _clipped_gelu(x, False)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(cdf, want_cdf)
    np.testing.assert_array_equal(y2, want_y)
    _, want_slope = _clipped_gelu(x, True)
    np.testing.assert_array_equal(slope, want_slope)
    big = np.abs(x) >= 6
    assert set(np.unique(cdf[big & (x > 0)])) == {1.0}
    assert set(np.unique(cdf[big & (x < 0)])) == {0.0}
    assert np.isnan(cdf[-8]) and np.isnan(y[-8]) and np.isnan(slope[-8])
    assert np.isnan(cdf).sum() == 1


@pytest.mark.parametrize("shape", [(12, 64, 128), (768, 65), (5,), (0, 7), (3, 0, 4), (2, 3, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_leading_sum_equals_the_sum_over_leading_axes(shape, dtype):
    from tinylm.ops.reduce import leading_sum

    rng = np.random.default_rng(2)
    a = rng.standard_normal(shape).astype(dtype)
    lead = tuple(range(a.ndim - 1))
    got = leading_sum(np, a)
    want = a.astype(np.float64).sum(axis=lead)
    assert got.shape == want.shape and got.dtype == dtype
    rows = max(a.size // max(a.shape[-1], 1), 1)
    tol = (np.finfo(dtype).eps * (2 + np.log2(rows)) * np.abs(a).astype(np.float64).sum(axis=lead)
           if a.size else 0)
    assert np.all(np.abs(got - want) <= tol)
    strided = np.asarray(rng.standard_normal(shape[:-1] + (2 * shape[-1],)), dtype)[..., ::2]
    np.testing.assert_array_equal(leading_sum(np, strided), strided.sum(axis=lead))
    np.testing.assert_array_equal(leading_sum(np, np.full(shape, 0.5, dtype)),
                                  np.full(shape[-1:], 0.5 * (a.size // shape[-1] if shape[-1] else 0), dtype))


@pytest.mark.parametrize("wdtype", [np.float32, np.float64, None])
def test_layer_norm_reused_buffers_match_float64(wdtype):
    from tinylm.ops.nn import layer_norm
    from tinylm.tensor import Tensor

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((12, 64, 128)) * 3 + 1).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = None if wdtype is None else (rng.standard_normal(128) + 1).astype(wdtype)
    tx = Tensor(x, requires_grad=True)
    tw = None if w is None else Tensor(w, requires_grad=True)
    y = layer_norm(tx, tw)
    y.backward(Tensor(g))
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    w64 = np.ones(128) if w is None else w.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    xhat = (x64 - mu) * rstd
    assert y.data.dtype == np.result_type(np.float32, w.dtype if w is not None else np.float32)
    np.testing.assert_allclose(y.data, xhat * w64, rtol=0, atol=4e-6 * np.abs(w64).max() * 8)
    gxhat = g64 * w64
    gx = rstd * (gxhat - gxhat.mean(-1, keepdims=True)
                 - xhat * (gxhat * xhat).mean(-1, keepdims=True))
    np.testing.assert_allclose(tx.grad, gx, rtol=0, atol=2e-5 * np.abs(gx).max())
    if w is not None:
        gw = (g64 * xhat).sum(axis=(0, 1))
        tol = 1e-6 * (2 + np.log2(768)) * np.abs(g64 * xhat).sum(axis=(0, 1)) + 1e-6
        assert np.all(np.abs(tw.grad - gw) <= tol)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_attention_backward_rowsum_from_the_output_matches_the_scores_route(H, Hkv, monkeypatch):
    """Attention.backward takes rowsum(dP * P) as rowsum(dY * Y): the same gradients as
    the scores' route (within float32 rounding), both against float64, an empty row
    (every key masked) included: it gets no gradient either way."""
    from tinylm import ops
    from tinylm.ops import attention as att_mod
    from tinylm.tensor import Tensor

    rng = np.random.default_rng(5)
    B, T, hs = 2, 12, 8
    q = rng.standard_normal((B, H, T, hs)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, T, hs)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, T, hs)).astype(np.float32)
    g = rng.standard_normal((B, H, T, hs)).astype(np.float32)
    keep = np.tril(np.ones((T, T), bool))
    keep[3] = False  # query 3 sees no key

    def grads():
        ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
        y = ops.scaled_dot_product_attention(*ts, mask=Tensor(keep), impl="naive")
        y.backward(Tensor(g))
        return y.data, [t.grad for t in ts]

    routes, backward = [], att_mod.Attention.backward

    def spy(self, xp, grad):
        routes.append(self.y is not None)
        return backward(self, xp, grad)

    monkeypatch.setattr(att_mod.Attention, "backward", spy)
    y_new, new = grads()
    forward = att_mod.Attention.forward

    def scores_route(self, xp, *arrays):
        out = forward(self, xp, *arrays)
        self.y = None
        return out

    monkeypatch.setattr(att_mod.Attention, "forward", scores_route)
    y_old, old = grads()
    assert routes == [True, False]  # the fused node, by the output's route, then the scores'
    np.testing.assert_array_equal(y_new, y_old)
    # float64 reference: dS = P * (dP - rowsum(dP * P)) * scale
    rep, scale = H // Hkv, 1 / math.sqrt(hs)
    k64, v64 = (np.repeat(a.astype(np.float64), rep, axis=1) for a in (k, v))
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    s = np.where(keep, q64 @ k64.swapaxes(-1, -2) * scale, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    p = np.divide(p, p.sum(-1, keepdims=True), out=np.zeros_like(p), where=np.isfinite(m))
    dp = g64 @ v64.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    want = [ds @ k64, (ds.swapaxes(-1, -2) @ q64).reshape(B, Hkv, rep, T, hs).sum(2),
            (p.swapaxes(-1, -2) @ g64).reshape(B, Hkv, rep, T, hs).sum(2)]
    for got_new, got_old, ref in zip(new, old, want):
        np.testing.assert_allclose(got_new, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
        np.testing.assert_allclose(got_old, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
        np.testing.assert_allclose(got_new, got_old, rtol=0, atol=2e-5 * np.abs(ref).max())
    assert not new[0][:, :, 3].any() and not old[0][:, :, 3].any()


def test_gelu_backward_into_its_slope_only_on_the_last_use():
    """The exact GELU's backward writes grad * slope into its own slope array when the
    engine releases the node after it (no retain_graph): the same bits as a fresh
    product; with retain_graph the slope is kept, so a second backward is the same."""
    from tinylm import ops
    from tinylm.tensor import Tensor

    rng = np.random.default_rng(6)
    x = (rng.standard_normal((12, 64, 512)) * 2).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    _, slope = exact_gelu(x, slope=True)  # (the op's path: compiled or NumPy)
    want = g * slope

    t = Tensor(x, requires_grad=True)
    (ops.gelu(t) * Tensor(g)).sum().backward()
    np.testing.assert_array_equal(t.grad, want)

    t = Tensor(x, requires_grad=True)
    y = ops.gelu(t)
    loss = (y * Tensor(g)).sum()
    loss.backward(retain_graph=True)
    np.testing.assert_array_equal(t.grad, want)
    first = t.grad.copy()
    t.grad = None
    loss.backward()  # the slope survived the first pass
    np.testing.assert_array_equal(t.grad, first)
    np.testing.assert_array_equal(t.grad, want)


def _cross_entropy_run(x, t, **kw):
    from tinylm.ops.nn import cross_entropy
    from tinylm.tensor import Tensor

    logits = Tensor(x, requires_grad=True)
    loss = cross_entropy(logits, Tensor(t), **kw)
    (loss.sum() if loss.ndim else loss).backward()
    return loss.data, logits.grad


@pytest.mark.parametrize("shape", [(7, 50257), (3, 5, 1000), (1, 3), (66, 4097)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"reduction": "sum"},
                                {"reduction": "none"}])
def test_blocked_cross_entropy_is_bit_identical_to_the_whole_array_path(
        shape, dtype, kw, monkeypatch):
    """NumPy cross-entropy per block of rows (no (N, V) temporary in forward, softmax
    recomputed per block in backward) gives the whole-array log_softmax path's bits, in
    loss and gradient, -inf logits and ignored targets included (one BLAS thread: the
    row sums are sgemv's, whose split over threads may round otherwise)."""
    from threadpoolctl import threadpool_limits

    import tinylm.ops.nn as nn

    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    x.reshape(-1, shape[-1])[0, :2] = -np.inf
    t = rng.integers(0, shape[-1], shape[:-1])
    t.reshape(-1)[-1] = -100
    with threadpool_limits(1, user_api="blas"), np.errstate(all="ignore"):
        loss, grad = _cross_entropy_run(x, t, **kw)
        monkeypatch.setattr(nn, "_ce_blocks", lambda xp, x2: False)
        want_loss, want_grad = _cross_entropy_run(x, t, **kw)
    assert loss.dtype == want_loss.dtype and grad.dtype == want_grad.dtype == dtype
    np.testing.assert_array_equal(loss, want_loss)
    np.testing.assert_array_equal(grad, want_grad)
    if shape[0] > 1 and not kw:  # and both are right: float64 softmax - one-hot, / count
        x64 = x.astype(np.float64).reshape(-1, shape[-1])
        p = np.exp(x64 - x64.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        tt = t.reshape(-1)
        p[np.arange(tt.size), np.where(tt < 0, 0, tt)] -= 1
        p *= (tt >= 0)[:, None] / (tt >= 0).sum()
        np.testing.assert_allclose(grad.reshape(p.shape), p, rtol=0, atol=1e-7)


def _adamw_states(dtype, amsgrad, wd, shape):
    from tinylm.optim import AdamW
    from tinylm.tensor import Tensor

    rng = np.random.default_rng(8)
    p = Tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True)
    opt = AdamW([p], lr=1e-3, weight_decay=wd, amsgrad=amsgrad)
    for i in range(3):
        p.grad = (rng.standard_normal(shape) * (i + 1)).astype(dtype)
        opt.step()
    state = opt.state[p]
    return [p.data.copy()] + [state[k].copy() for k in sorted(state) if k != "step"]


@pytest.mark.parametrize("shape", [(300, 700), (2 * 65536 + 5,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_blocked_adamw_is_bit_identical_to_the_whole_array_update(
        shape, dtype, amsgrad, wd, monkeypatch):
    """AdamW's NumPy update per L2-sized block: the same parameter, exp_avg, exp_avg_sq
    (and max_exp_avg_sq) bits after three steps as the whole-array update."""
    import tinylm.optim as optim

    got = _adamw_states(dtype, amsgrad, wd, shape)
    assert optim._adamw_blocks(np, *got)  # the blocked path did run
    monkeypatch.setattr(optim, "_adamw_blocks", lambda xp, *arrays: False)
    want = _adamw_states(dtype, amsgrad, wd, shape)
    assert len(got) == len(want) == (4 if amsgrad else 3)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b)


def test_reusable_empty_hands_back_only_arrays_nobody_holds():
    """The pool of large per-step arrays: the same memory again only when no array,
    view or buffer of it is alive; small arrays are never pooled."""
    shape = (backend.REUSE_MIN_BYTES // 4 + 1,)
    a = backend.reusable_empty("test.pool", shape, np.float32)
    address = a.ctypes.data
    b = backend.reusable_empty("test.pool", shape, np.float32)
    assert b.ctypes.data != address  # a is alive
    del b
    view = a[10:]
    del a
    c = backend.reusable_empty("test.pool", shape, np.float32)
    assert c.ctypes.data != address  # a view keeps it
    del view, c
    d = backend.reusable_empty("test.pool", shape, np.float32)
    kept = d.ctypes.data
    buffer = memoryview(d)
    del d
    e = backend.reusable_empty("test.pool", shape, np.float32)
    assert e.ctypes.data != kept  # an exported buffer keeps it
    freed = e.ctypes.data
    del buffer, e
    f = backend.reusable_empty("test.pool", shape, np.float32)
    assert f.ctypes.data == freed  # nobody holds it: the same memory
    other = backend.reusable_empty("test.pool", (shape[0] + 1,), np.float32)
    assert other.ctypes.data != f.ctypes.data and other.shape == (shape[0] + 1,)
    del f, other
    backend._REUSABLE.pop("test.pool", None)
    small = backend.reusable_empty("test.small", (4,), np.float32)
    assert "test.small" not in backend._REUSABLE and small.shape == (4,)


def test_pooled_head_logits_and_gradients_never_overwrite_live_arrays(monkeypatch):
    """A vocabulary head's logits, its cross-entropy gradient and its weight gradient
    come from the pool: two steps in a row, the first step's logits and weight
    gradient (still held) keep their values, and each step's values are those of
    fresh arrays (pool off)."""
    from tinylm.ops.matmul import linear
    from tinylm.ops.nn import cross_entropy
    from tinylm.tensor import Tensor

    monkeypatch.setattr(backend, "REUSE_MIN_BYTES", 1 << 12)  # small arrays pooled here
    rng = np.random.default_rng(9)
    V, D, N = 3000, 32, 40
    w = Tensor(rng.standard_normal((V, D)).astype(np.float32) * 0.1, requires_grad=True)
    xs = [rng.standard_normal((N, D)).astype(np.float32) for _ in range(2)]
    ts = [rng.integers(0, V, N) for _ in range(2)]

    def step(x, t):
        logits = linear(Tensor(x), w)
        cross_entropy(logits, Tensor(t)).backward()
        grad, w.grad = w.grad, None
        return logits, grad

    first_logits, first_grad = step(xs[0], ts[0])
    keep_logits, keep_grad = first_logits.data.copy(), first_grad.copy()
    second_logits, second_grad = step(xs[1], ts[1])
    np.testing.assert_array_equal(first_logits.data, keep_logits)
    np.testing.assert_array_equal(first_grad, keep_grad)
    assert second_logits.data.ctypes.data != first_logits.data.ctypes.data
    del first_logits, first_grad
    third_logits, third_grad = step(xs[0], ts[0])  # may reuse the first step's memory
    np.testing.assert_array_equal(third_logits.data, keep_logits)
    np.testing.assert_array_equal(third_grad, keep_grad)
    monkeypatch.setattr(backend, "REUSE_MIN_BYTES", 1 << 62)  # pool off: fresh arrays
    fresh_logits, fresh_grad = step(xs[1], ts[1])
    np.testing.assert_array_equal(second_logits.data, fresh_logits.data)
    np.testing.assert_array_equal(second_grad, fresh_grad)
