"""split_threads: BLAS at one thread, ops splitting their own work (Linear's products,
the exact GELU, the fused attention node, the optimizer step) give what the unsplit
ops give, and really split."""

import importlib
import threading

import numpy as np
import pytest

from tinylm import threads
from tinylm.optim import AdamW
from tinylm.tensor import Tensor
import tinylm.ops as F
from tinylm.ops import attention as attention_ops


def test_split_covers_the_range_in_aligned_near_equal_slices():
    assert threads.split(768, 2) == [slice(0, 384), slice(384, 768)]
    assert threads.split(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    for n, parts, align in [(1, 2, 1), (5, 8, 1), (1000, 3, 64), (7, 2, 4)]:
        got = threads.split(n, parts, align)
        assert got[0].start == 0 and got[-1].stop == n and len(got) <= parts
        assert all(a.stop == b.start for a, b in zip(got, got[1:]))
        assert all(s.start % align == 0 for s in got)


def test_split_threads_sets_one_blas_thread_and_the_split_count():
    before = threads.cpu_threads()
    with threads.split_threads(2):
        if threads.cores() < 2:
            assert threads.splitting() == 0
        else:
            assert threads.cpu_threads() == 2 and threads.splitting() == 2
            assert threads._blas_limit() == 1  # BLAS itself single-threaded
            seen = threads.run_parts(lambda p: (threading.get_ident(), threads.splitting(),
                                                threads.cpu_threads()), [1, 2])
            assert seen[0][0] == threading.get_ident()  # the first part on this thread
            assert seen[1][0] != seen[0][0]
            assert [s[1:] for s in seen] == [(0, 1), (0, 1)]  # inside a part: no splitting
    assert threads.cpu_threads() == before and threads.splitting() == 0


@pytest.mark.skipif(threads.cores() < 2, reason="needs 2 cores")
def test_split_run_parts_reraises_and_stays_usable():
    def fn(p):
        if p == 2:
            raise ValueError("part 2")
        return p

    with threads.split_threads(2):
        with pytest.raises(ValueError, match="part 2"):
            threads.run_parts(fn, [1, 2])
        with pytest.raises(ValueError, match="part 2"):
            threads.run_parts(fn, [2, 1])
        assert threads.run_parts(lambda p: p * 3, [1, 2, 3]) == [3, 6, 9]


def _grads(fn, *arrays):
    ts = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    y = fn(*ts)
    y.backward(np.random.default_rng(1).standard_normal(y.shape).astype(y.data.dtype))
    return y.data, [t.grad for t in ts]


def _both(fn, *arrays):
    with threads.blas_threads(1):
        ref = _grads(fn, *arrays)
    calls = []
    real = threads.run_parts

    def counting(f, parts):
        calls.append(len(parts))
        return real(f, parts)

    with threads.split_threads(2):
        mp = pytest.MonkeyPatch()
        for module in ("tinylm.ops.matmul", "tinylm.ops.elementwise", "tinylm.ops.attention"):
            mp.setattr(importlib.import_module(module), "run_parts", counting)
        try:
            got = _grads(fn, *arrays)
        finally:
            mp.undo()
    return ref, got, calls


pytestmark_two = pytest.mark.skipif(threads.cores() < 2, reason="needs 2 cores")


@pytestmark_two
def test_split_linear_matches_the_whole_products():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, 128)).astype(np.float32)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    (y0, g0), (y1, g1), calls = _both(lambda a, b: F.linear(a, b), x, w)
    assert calls == [2, 2]  # forward and backward each split in two
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-4)  # BLAS may block rows differently
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)  # float32 sums, |g| ~ 20


@pytestmark_two
def test_split_gelu_is_bit_identical():
    x = np.random.default_rng(0).standard_normal((8, 64, 256)).astype(np.float32)
    (y0, g0), (y1, g1), calls = _both(F.gelu, x)
    assert calls == [2, 2]
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(g1[0], g0[0])


@pytestmark_two
@pytest.mark.parametrize("hkv", [4, 2])
def test_split_attention_matches(hkv):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 4, 64, 32)).astype(np.float32)
    k, v = (rng.standard_normal((6, hkv, 64, 32)).astype(np.float32) for _ in range(2))
    fn = lambda a, b, c: attention_ops.scaled_dot_product_attention(a, b, c, is_causal=True)
    (y0, g0), (y1, g1), calls = _both(fn, q, k, v)
    assert calls == [2, 2]
    np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)  # float32 sums, |g| ~ 20


@pytestmark_two
def test_split_adamw_step_is_bit_identical():
    shapes = [(512, 256), (256,), (300, 300), (7,)]
    results = []
    for mode in ("one", "split"):
        rng = np.random.default_rng(0)  # the same values both times
        ps = [Tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True)
              for s in shapes]
        opt = AdamW(ps, lr=1e-2, weight_decay=0.1)
        ctx = threads.split_threads(2) if mode == "split" else threads.blas_threads(1)
        with ctx:
            for step in range(3):
                for p in ps:
                    p.grad = np.full(p.shape, 0.1 * (step + 1), np.float32) + p.data
                opt.step()
        results.append([p.data.copy() for p in ps])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
