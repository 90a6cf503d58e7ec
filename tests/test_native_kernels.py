"""The compiled CPU kernels (tinylm/kernels/cpu.c via kernels.native) against float64
references and the NumPy paths they replace; the build, the switch and the fallback."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinylm import backend, optim
from tinylm.kernels import native
from tinylm.nn import Parameter
from tinylm.ops import nn as F
from tinylm.ops.elementwise import exact_gelu
from tinylm.tensor import Tensor

_erf = np.frompyfunc(math.erf, 1, 1)

needs_native = pytest.mark.skipif(native.library() is None,
                                  reason=f"no CPU kernels here: {native.status()}")


def _phi_exact(x):
    x = np.asarray(x, np.float64)
    cdf = 0.5 * (1 + _erf(x / math.sqrt(2)).astype(np.float64))
    return cdf, np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


@needs_native
def test_gelu_is_within_2_5e_7_of_the_exact_gelu_and_its_derivative():
    """y = x Phi(x) with Phi within 2.5e-7 (measured 2.11e-7 near |x| = 4.5), and the
    slope Phi + x phi within 2.5e-7 (measured 2.14e-7), over a dense grid and tiny x."""
    x = np.concatenate([np.linspace(-14, 14, 1_000_001), np.geomspace(1e-38, 1, 2001),
                        -np.geomspace(1e-38, 1, 2001)]).astype(np.float32)
    y, slope = native.gelu_forward(x, backend.GELU_RATIONAL, True)
    assert y.dtype == slope.dtype == np.float32
    cdf, phi = _phi_exact(x)
    x64 = x.astype(np.float64)
    assert np.all(np.abs(y - x64 * cdf) <= 2.5e-7 * np.abs(x64))
    assert np.abs(slope - (cdf + x64 * phi)).max() <= 2.5e-7
    y2, none = native.gelu_forward(x, backend.GELU_RATIONAL, False)
    assert none is None
    np.testing.assert_array_equal(y2, y)


@needs_native
def test_gelu_special_values():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 13.5, -13.5], np.float32)
    y, slope = native.gelu_forward(x, backend.GELU_RATIONAL, True)
    assert np.isnan(y[0]) and np.isnan(slope[0])
    assert y[1] == np.inf and slope[1] == 1.0
    assert np.isnan(y[2]) and slope[2] == 0.0  # -inf * 0, as x * Phi(x) in NumPy
    assert y[3] == 0 and y[4] == 0 and slope[3] == slope[4] == 0.5
    assert list(y[5:]) == [np.float32(1e30), 0.0, 13.5, 0.0]
    assert list(slope[5:]) == [1.0, 0.0, 1.0, 0.0]


@needs_native
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_results_do_not_depend_on_the_thread_count(monkeypatch, threads):
    """Every kernel splits its work so that each element (each parameter-gradient column)
    is computed by the same instructions at any thread count: the same bits."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 200)).astype(np.float32)
    w, b = rng.standard_normal(200).astype(np.float32), rng.standard_normal(200).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)

    def run(n):
        monkeypatch.setattr(native, "_threads", lambda *size: n)
        gy, gs = native.gelu_forward(x, backend.GELU_RATIONAL, True)
        y, mean, rstd = native.norm_forward(x, w, b, 1e-5, True)
        grads = native.norm_backward(g, x, w, mean, rstd, True, True, True)
        p, m, v = x.copy(), g.copy() * 0.1, np.abs(g) * 0.01
        native.adamw_step(p, g, m, v, None, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                          weight_decay=0.1, step=3)
        return [gy, gs, y, mean, rstd, *grads, p, m, v]

    for a, b_ in zip(run(1), run(threads)):
        np.testing.assert_array_equal(a, b_)


def _norm_reference(x, w, b, g, eps, center):
    """LayerNorm (center) / RMSNorm in float64: y and the gradients of sum(y * g)."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    mu = x.mean(-1, keepdims=True) if center else 0.0
    rstd = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    wd = np.ones(x.shape[-1]) if w is None else w.astype(np.float64)
    y = xhat * wd + (0 if b is None else b.astype(np.float64))
    gh = g * wd
    m1 = gh.mean(-1, keepdims=True) if center else 0.0
    gx = rstd * (gh - m1 - xhat * (gh * xhat).mean(-1, keepdims=True))
    return y, gx, (g * xhat).reshape(-1, x.shape[-1]).sum(0), g.reshape(-1, x.shape[-1]).sum(0)


@needs_native
@given(rows=st.integers(1, 40), d=st.integers(1, 300), weight=st.booleans(),
       bias=st.booleans(), center=st.booleans(), seed=st.integers(0, 2**16))
def test_norm_kernels_match_float64(rows, d, weight, bias, center, seed):
    if bias and not center:
        bias = False  # RMSNorm has no bias
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, d)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32) if weight else None
    b = rng.standard_normal(d).astype(np.float32) if bias else None
    g = rng.standard_normal((rows, d)).astype(np.float32)
    y, mean, rstd = native.norm_forward(x, w, b, 1e-5, center)
    dx, dw, db = native.norm_backward(g, x, w, mean, rstd, center, weight, bias)
    ry, rgx, rgw, rgb = _norm_reference(x, w, b, g, 1e-5, center)
    scale = max(1.0, np.abs(ry).max())
    np.testing.assert_allclose(y, ry, rtol=0, atol=2e-6 * scale)
    # (gh - mean(gh) cancels: float32 rounding of gh, times rstd, is the floor)
    gh = np.abs(g * (1 if w is None else w)).max()
    np.testing.assert_allclose(dx, rgx, rtol=0, atol=5e-6 * max(1.0, np.abs(rgx).max())
                               + 1e-6 * float(rstd.max()) * gh)
    if weight:
        np.testing.assert_allclose(dw, rgw, rtol=0, atol=2e-6 * rows * max(1.0, np.abs(rgw).max()))
    else:
        assert dw is None
    if bias:
        np.testing.assert_allclose(db, rgb, rtol=0, atol=2e-6 * rows)


@needs_native
@pytest.mark.parametrize("module,bias", [("layer", True), ("layer", False), ("rms", False)])
def test_norm_ops_run_the_kernels_and_agree_with_the_numpy_path(monkeypatch, module, bias):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)

    def run():
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
        bt = Tensor(b, requires_grad=True) if bias else None
        y = F.layer_norm(xt, wt, bt) if module == "layer" else F.rms_norm(xt, wt)
        kernels = y.creator.kernels  # (before backward releases the node)
        (y * Tensor(g)).sum().backward()
        return [y.data, xt.grad, wt.grad] + ([bt.grad] if bias else []), kernels

    got, kernels = run()
    assert kernels is native
    monkeypatch.setattr(native, "usable", lambda *a: False)
    want, kernels = run()
    assert kernels is None
    for a, b_ in zip(got, want):
        np.testing.assert_allclose(a, b_, rtol=0, atol=2e-5 * max(1.0, np.abs(b_).max()))


@needs_native
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_kernel_matches_the_numpy_update(monkeypatch, amsgrad, weight_decay):
    """Five AdamW steps through the kernel and through the NumPy update (the formula of
    torch.optim.AdamW, tested against torch in test_optim): within float32 rounding."""
    rng = np.random.default_rng(2)
    data = rng.standard_normal(70_001).astype(np.float32)
    grads = [rng.standard_normal(data.shape).astype(np.float32) for _ in range(5)]

    def run():
        p = Parameter(data.copy())
        opt = optim.AdamW([p], lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay,
                          amsgrad=amsgrad)
        for g in grads:
            p.grad = g.copy()
            opt.step()
        return p.data, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]

    calls = []
    real = native.adamw_step
    monkeypatch.setattr(native, "adamw_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = run()
    assert len(calls) == 5
    monkeypatch.setattr(native, "usable", lambda *a: False)
    want = run()
    for a, b_ in zip(got, want):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)


@needs_native
def test_gelu_op_runs_the_kernel_and_its_gradient_matches_the_numpy_path(monkeypatch):
    from tinylm import ops

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 7, 33)) * 2).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    calls = []
    real = native.gelu_forward
    monkeypatch.setattr(native, "gelu_forward", lambda *a: calls.append(1) or real(*a))

    def run():
        t = Tensor(x, requires_grad=True)
        y = ops.gelu(t)
        (y * Tensor(g)).sum().backward()
        return y.data, t.grad

    got = run()
    assert calls
    monkeypatch.setattr(native, "usable", lambda *a: False)
    want = run()
    for a, b_ in zip(got, want):
        np.testing.assert_allclose(a, b_, rtol=0, atol=1e-6 * max(1.0, np.abs(b_).max()))
    # a strided view, float64 and an empty array take the other paths
    assert exact_gelu(x[:, ::2], slope=True)[0].shape == (4, 4, 33)
    assert exact_gelu(x.astype(np.float64), slope=True)[0].dtype == np.float64
    assert exact_gelu(np.zeros((0, 3), np.float32), slope=True)[0].shape == (0, 3)


def _child(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=300)


_PROBE = ("from tinylm.kernels import native; from tinylm import ops; import numpy as np; "
          "from tinylm.tensor import Tensor; "
          "y = ops.gelu(Tensor(np.linspace(-3, 3, 7, dtype=np.float32))); "
          "print(native.status()); print(float(y.data.sum()))")


def test_switched_off_and_without_a_compiler_the_numpy_paths_run(tmp_path):
    off = _child(_PROBE, TINYLM_NATIVE="0", TINYLM_CACHE=str(tmp_path / "a"))
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines()[0] == "off (TINYLM_NATIVE=0)"
    broken = _child(_PROBE, CC="false", TINYLM_CACHE=str(tmp_path / "b"))
    assert broken.returncode == 0, broken.stderr
    line = broken.stdout.splitlines()[0]
    assert line.startswith("not available (") and "NumPy paths run instead" in line
    assert not list((tmp_path / "b").rglob("*.so"))  # no half-built library left behind
    assert abs(float(off.stdout.splitlines()[1]) - float(broken.stdout.splitlines()[1])) < 1e-6


@needs_native
def test_a_build_goes_to_the_cache_once(tmp_path):
    first = _child(_PROBE, TINYLM_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    built = list((tmp_path / "native").glob("tinylm_cpu-*.so"))
    assert len(built) == 1 and first.stdout.startswith(f"loaded {built[0]}")
    stamp = built[0].stat().st_mtime_ns
    again = _child(_PROBE, TINYLM_CACHE=str(tmp_path))
    assert again.returncode == 0 and again.stdout == first.stdout
    assert built[0].stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "native").iterdir()] == [built[0].name]


@needs_native
@pytest.mark.parametrize("heads,kv_heads,causal", [(4, 4, True), (4, 2, True), (2, 1, False)])
def test_attention_compiled_path_matches_the_numpy_path_and_any_split(monkeypatch, heads,
                                                                      kv_heads, causal):
    """The fused attention node's compiled path (softmax kernels, batch rows split over
    threads) against its NumPy path; one thread and three give the same bits."""
    from tinylm.ops import attention
    from tinylm.threads import blas_threads

    rng = np.random.default_rng(5)
    B, T, hs = 5, 9, 8
    q = rng.standard_normal((B, heads, T, hs)).astype(np.float32)
    k, v = (rng.standard_normal((B, kv_heads, T, hs)).astype(np.float32) for _ in range(2))
    g = rng.standard_normal(q.shape).astype(np.float32)

    def run():
        ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
        y = attention.scaled_dot_product_attention(*ts, is_causal=causal, impl="naive")
        compiled = y.creator.compiled
        (y * Tensor(g)).sum().backward()
        return [y.data] + [t.grad for t in ts], compiled

    monkeypatch.setattr(attention, "PARALLEL_SCORES", 0)  # split even these few scores
    monkeypatch.setattr(attention, "cpu_threads", lambda: 1)
    one, compiled = run()
    assert compiled
    monkeypatch.setattr(attention, "cpu_threads", lambda: 3)
    with blas_threads(3):
        three, _ = run()
    for a, b_ in zip(one, three):
        np.testing.assert_array_equal(a, b_)
    monkeypatch.setattr(native, "usable", lambda *a: False)
    numpy_path, compiled = run()
    assert not compiled
    for a, b_ in zip(one, numpy_path):
        np.testing.assert_allclose(a, b_, rtol=0, atol=2e-6 * max(1.0, np.abs(b_).max()))


@needs_native
def test_softmax_kernel_rows_with_nan_and_without_keys():
    x = np.array([[np.nan, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf], [1.0, 2.0, 3.0]],
                 np.float32)
    out = np.empty_like(x)
    native.softmax(x, out, None, 1.0)
    assert np.isnan(out[0]).all()
    assert (out[1] == 0).all()
    np.testing.assert_allclose(out[2], F.softmax_array(x[2]), rtol=1e-6)


def test_attention_with_a_broadcast_kv_batch_takes_the_numpy_path():
    """k, v of batch 1 against q of batch 2 (NumPy broadcasting): not the compiled path's
    case; the result and gradients are the broadcast ones."""
    from tinylm.ops import attention

    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 3, 4)).astype(np.float32) for _ in range(2))
    ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    y = attention.scaled_dot_product_attention(*ts, is_causal=True, impl="naive")
    assert not y.creator.compiled
    y.sum().backward()
    assert ts[1].grad.shape == k.shape and ts[2].grad.shape == v.shape


@needs_native
def test_adamw_with_a_gradient_of_another_shape_does_not_reach_the_kernel(monkeypatch):
    p = Parameter(np.ones(8, np.float32))
    p.grad = np.full(1, 0.5, np.float32)  # broadcasts in the NumPy update
    called = []
    monkeypatch.setattr(native, "adamw_step", lambda *a, **k: called.append(1))
    optim.AdamW([p], lr=0.1).step()
    assert not called and np.all(p.data < 1)


@pytest.mark.skipif(not native.can_own_threads(), reason="the kernels cannot own threads here")
def test_owned_threads_run_the_products_with_the_same_values(monkeypatch):
    """Inside blas_threads(3) the kernels own the threads: the BLAS library is held at one,
    linear layers and attention run their products on the kernels' pool; a nested
    blas_threads(1) gives them back one thread. Values as on one thread (within
    float32 rounding: sgemm on row blocks)."""
    from tinylm import threads
    from tinylm.ops import attention
    from tinylm.ops.matmul import linear

    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 40, 48)).astype(np.float32)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    q = rng.standard_normal((6, 4, 40, 16)).astype(np.float32)
    kv = rng.standard_normal((6, 40, 2, 2, 16)).astype(np.float32).transpose(2, 0, 3, 1, 4)

    def run():
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
        qt, kt, vt = (Tensor(a, requires_grad=True) for a in (q, kv[0], kv[1]))
        y = linear(xt, wt)
        a = attention.scaled_dot_product_attention(qt, kt, vt, is_causal=True, impl="naive")
        owned = a.creator.owned
        ((y * y).sum() + (a * a).sum()).backward()
        return [y.data, a.data, xt.grad, wt.grad, qt.grad, kt.grad, vt.grad], owned

    with threads.blas_threads(1):
        assert threads.owned_threads() == 1
        one, owned = run()
    assert not owned
    calls = []
    real = native.gemm_many

    def counted(products):
        calls.extend(products)  # (gemm hands its one product to gemm_many)
        return real(products)

    monkeypatch.setattr(native, "gemm_many", counted)
    with threads.blas_threads(3):
        assert threads.owned_threads() == min(3, threads.cores())
        if threads.cores() > 1:
            many, owned = run()
            assert owned and len(calls) == 3 + 6  # products: linear 1 + 2, attention 2 + 4
            for a, b_ in zip(one, many):
                np.testing.assert_allclose(a, b_, rtol=0, atol=1e-5 * max(1.0, np.abs(a).max()))
        with threads.blas_threads(1):
            assert threads.owned_threads() == 1
    assert threads.owned_threads() == 1


@pytest.mark.skipif(not native.can_own_threads(), reason="the kernels cannot own threads here")
@given(m=st.integers(1, 70), n=st.integers(1, 100), k=st.integers(0, 50), ta=st.booleans(),
       tb=st.booleans(), batch=st.sampled_from([(), (3,), (2, 3)]), seed=st.integers(0, 99))
def test_gemm_matches_numpy(m, n, k, ta, tb, batch, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(batch + ((k, m) if ta else (m, k))).astype(np.float32)
    b = rng.standard_normal(batch + ((n, k) if tb else (k, n))).astype(np.float32)
    out = np.empty(batch + (m, n), np.float32)
    from tinylm import threads
    with threads.blas_threads(2):
        native.gemm(a, b, out, transa=ta, transb=tb)
    want = (a.swapaxes(-1, -2) if ta else a) @ (b.swapaxes(-1, -2) if tb else b)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * k)


@pytest.mark.skipif(not native.can_own_threads(), reason="the kernels cannot own threads here")
def test_gemm_refuses_operands_that_do_not_fit():
    a, b = np.ones((4, 3), np.float32), np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        native.gemm(a, b, np.empty((4, 2), np.float32))
    with pytest.raises(ValueError, match="unit column stride"):
        native.gemm(a[:, ::2], np.ones((2, 2), np.float32), np.empty((4, 2), np.float32))


def test_attention_with_mismatched_head_sizes_raises_on_every_path():
    from tinylm import threads
    from tinylm.errors import TinyLMError
    from tinylm.ops import attention

    q = Tensor(np.ones((2, 2, 5, 16), np.float32))
    k = v = Tensor(np.ones((2, 2, 5, 8), np.float32))
    for n in (1, 2):
        with threads.blas_threads(n), pytest.raises((ValueError, TinyLMError)):
            attention.scaled_dot_product_attention(q, k, v, is_causal=True, impl="naive")


@pytest.mark.skipif(not native.can_own_threads(), reason="the kernels cannot own threads here")
@settings(deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 60), st.integers(0, 40),
                                 st.booleans(), st.booleans()), min_size=1, max_size=4),
       threads_=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_gemm_many_runs_each_product_as_numpy_does(shapes, threads_, seed):
    """Independent products in one call: side by side in thread teams (as many threads
    as products or more), else one after another; each output is its own product."""
    from tinylm import threads

    rng = np.random.default_rng(seed)
    products, wants = [], []
    for m, n, k, ta, tb in shapes:
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
        out = np.full((m, n), np.nan, np.float32)
        products.append((a, b, out, ta, tb))
        wants.append((a.T if ta else a) @ (b.T if tb else b))
    with threads.blas_threads(threads_):
        native.gemm_many(products)
    for (_, _, out, _, _), want, (m, n, k, _, _) in zip(products, wants, shapes):
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * max(k, 1))


def test_array_addresses_are_those_numpy_reports():
    """The kernels read an array's data address from the array object (fast); it must
    be the address NumPy's ctypes interface gives, for arrays and views alike."""
    base = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)
    for a in (base, base[1:], base[:, 2:, 1:], base.transpose(2, 0, 1), base[::2, ::-1],
              base[4, 6, 2:], np.empty(0, np.float32), base.astype(np.float64)[2:]):
        assert native._ptr(a) == a.ctypes.data
    assert native._ptr(None) is None


@pytest.mark.parametrize("threads_", [1, 2])
def test_attention_gradients_of_shared_or_broadcast_inputs_are_summed(threads_):
    """q is k is v (one leaf), or k broadcast over the heads: each use's gradient must be
    summed, never written to one place twice (the gradients sit in their inputs'
    places only when those do not overlap)."""
    from tinylm import threads
    from tinylm.ops import attention
    from tinylm.ops.movement import broadcast_to

    rng = np.random.default_rng(21)
    a = rng.standard_normal((2, 2, 8, 4)).astype(np.float32)
    kb = rng.standard_normal((2, 1, 8, 4)).astype(np.float32)

    def grads(shared):
        t = Tensor(a, requires_grad=True)
        k = Tensor(kb, requires_grad=True)
        with threads.blas_threads(threads_):
            if shared:
                y = attention.scaled_dot_product_attention(t, t, t, is_causal=True, impl="naive")
            else:
                y = attention.scaled_dot_product_attention(
                    t * 1.0, broadcast_to(k, (2, 2, 8, 4)), t * 1.0, is_causal=True,
                    impl="naive")
            (y * y).sum().backward()
        return t.grad, k.grad

    def separate(shared):  # the reference: every use its own copy
        q, k, v = (Tensor(a.copy(), requires_grad=True) for _ in range(3))
        kk = Tensor(kb, requires_grad=True)
        kin = k if shared else broadcast_to(kk, (2, 2, 8, 4))
        y = attention.scaled_dot_product_attention(q, kin, v, is_causal=True, impl="naive")
        (y * y).sum().backward()
        return (q.grad + k.grad + v.grad) if shared else (q.grad + v.grad), kk.grad

    got, want = grads(True), separate(True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    got, want = grads(False), separate(False)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
