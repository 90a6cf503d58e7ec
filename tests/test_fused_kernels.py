"""The fused training-step kernels (tinylm/kernels/fused.cu): norms, cross-entropy, AdamW.

Without a GPU:
  - nvcc compiles the module for sm_90 and ptxas assembles it, with no warning and no
    spill (skipped without nvcc);
  - the float64 references below against the ops they stand for (tinylm.ops.nn,
    tinylm.optim.AdamW on NumPy): they are the specification the kernels must meet;
  - the kernel source itself, compiled for the CPU with tests/fused_emu.cpp (threads as
    fibers, __syncthreads and __shfl_xor_sync emulated, outputs and shared memory
    poisoned with NaN, warps run in both orders), against the references; and
    mutated copies of the source (a barrier removed, an index off by one) must fail;
  - the ops' fused branches (reshapes, reductions, what is saved for backward), run on
    NumPy with the kernels replaced by the references;
  - the launcher itself (fused.py's grids and argument tuples, each argument's kind and
    type checked against the kernel's signature) with the kernels emulated, alone, under
    the ops and AdamW, and for two training steps of the example CharGPT.
On a GPU (@pytest.mark.gpu, `pytest -m gpu`): each kernel against the reference and
the ops with fused kernels on against the same ops with them off, outputs poisoned,
bitwise determinism, and a few training steps of the example CharGPT.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tinylm.ops as F
from kernel_helpers import assert_clean_build, nvcc_ptxas, nvcc_tools
from tinylm import backend, nn, optim
from tinylm.kernels import fused
from tinylm.tensor import Tensor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
F32 = np.float32


def assert_close(name, got, want, rtol=1e-5, atol_frac=1e-6):
    """|got - want| <= rtol |want| + atol_frac max|want|, elementwise; NaN only where want
    has NaN (an output element left unwritten stays NaN from the poison)."""
    got = np.asarray(got, dtype=np.float64).reshape(np.shape(want))
    want = np.asarray(want, dtype=np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name}: NaN where not expected"
    ok = ~np.isnan(want)
    g, w = got[ok], want[ok]
    if not w.size:
        return
    atol = atol_frac * np.abs(w).max()
    bad = np.abs(g - w) > rtol * np.abs(w) + atol
    assert not bad.any(), (
        f"{name}: {bad.sum()} of {bad.size} elements off, worst |diff| "
        f"{np.abs(g - w).max():.3g} (max |want| {np.abs(w).max():.3g})")


# =========================================================================== references
# float64, from the definitions; each checked below against the op it stands for.


def norm_reference(x, w, b, dy, eps, center, mean=None, rstd=None):
    """LayerNorm (center) or RMSNorm over the last axis of (N, D): dict of y, mean, rstd,
    dx, dw, db. Given mean and rstd (the forward's), the backward uses them."""
    x = np.asarray(x, dtype=np.float64)
    if mean is None:
        mean = x.mean(axis=-1) if center else np.zeros(x.shape[0])
        xc = x - mean[:, None]
        rstd = 1 / np.sqrt((xc * xc).mean(axis=-1) + eps)
    mean, rstd = np.asarray(mean, np.float64), np.asarray(rstd, np.float64)
    xhat = (x - mean[:, None]) * rstd[:, None]
    y = xhat * (1 if w is None else w) + (0 if b is None else b)
    out = dict(y=y, mean=mean, rstd=rstd)
    if dy is not None:
        dy = np.asarray(dy, dtype=np.float64)
        g = dy if w is None else dy * w
        m1 = g.mean(axis=-1, keepdims=True) if center else 0
        out["dx"] = rstd[:, None] * (g - m1 - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        out["dw"], out["db"] = (dy * xhat).sum(axis=0), dy.sum(axis=0)
    return out


def ce_reference(logits, targets, ignore_index, eps, grad, count=None, lse=None):
    """Softmax cross-entropy rows of (N, V): dict of loss (per row, 0 where ignored),
    lse, dlogits for upstream ``grad`` (N values, or one) divided by ``count`` if given."""
    x = np.asarray(logits, dtype=np.float64)
    N, V = x.shape
    if lse is None:
        m = x.max(axis=-1, keepdims=True)
        lse = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]
    lse = np.asarray(lse, dtype=np.float64)
    logp = x - lse[:, None]
    valid = targets != ignore_index
    safe = np.where(valid, targets, 0)
    rows = np.arange(N)
    loss = -logp[rows, safe]
    if eps:
        loss = (1 - eps) * loss - (eps / V) * logp.sum(axis=-1)
    loss = loss * valid
    scale = np.broadcast_to(np.asarray(grad, dtype=np.float64).reshape(-1), (N,))
    if count is not None:
        scale = scale / float(count)
    d = np.exp(logp)
    d[rows, safe] -= 1 - eps
    d -= eps / V
    d *= (scale * valid)[:, None]
    return dict(loss=loss, lse=lse, dlogits=d)


def adamw_reference(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step in float64 from the formula in optim.AdamW's docstring: new
    (p, m, v, vmax); vmax None without amsgrad."""
    p, g, m, v = (np.asarray(a, dtype=np.float64) for a in (p, g, m, v))
    p = p * (1 - lr * weight_decay)
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    vv = v
    if vmax is not None:
        vmax = vv = np.maximum(np.asarray(vmax, dtype=np.float64), v)
    p = p - lr / (1 - beta1**step) * m / (np.sqrt(vv) / np.sqrt(1 - beta2**step) + eps)
    return p, m, v, vmax


def _grads(fn, *arrays):
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    y = fn(*tensors)
    return y, tensors


@pytest.mark.parametrize("center,has_w,has_b", [
    (True, True, True), (True, True, False), (True, False, True), (True, False, False),
    (False, True, False)], ids=["layer", "layer-w", "layer-b", "layer-plain", "rms"])
def test_norm_reference_matches_the_op(center, has_w, has_b):
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((6, 9)) + 2, rng.standard_normal((6, 9))
    w, b = rng.standard_normal(9), rng.standard_normal(9)
    params = [a for a, keep in ((w, has_w), (b, has_b)) if keep]
    ref = norm_reference(x, w if has_w else None, b if has_b else None, dy, 1e-5, center)

    def op(t, *ps):
        if center:
            it = iter(ps)
            return F.layer_norm(t, next(it) if has_w else None, next(it) if has_b else None)
        return F.rms_norm(t, ps[0], eps=1e-5)

    y, ts = _grads(op, x, *params)
    y.backward(dy)
    np.testing.assert_allclose(y.numpy(), ref["y"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ts[0].grad, ref["dx"], rtol=1e-10, atol=1e-12)
    want = [ref[k] for k, keep in (("dw", has_w), ("db", has_b)) if keep]
    for t, wnt in zip(ts[1:], want):
        np.testing.assert_allclose(t.grad, wnt, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_reference_matches_the_op(reduction, eps):
    rng = np.random.default_rng(1)
    N, V = 7, 11
    logits = rng.standard_normal((N, V)) * 3
    t = rng.integers(0, V, N)
    t[[1, 4]] = -100
    up = rng.standard_normal(N) if reduction == "none" else np.float64(0.7)
    valid = (t != -100).sum()
    ref = ce_reference(logits, t, -100, eps, up, valid if reduction == "mean" else None)
    y, (lt,) = _grads(lambda a: F.cross_entropy(a, t, label_smoothing=eps, reduction=reduction),
                      logits)
    y.backward(up if reduction == "none" else np.asarray(up))
    want = {"none": ref["loss"], "sum": ref["loss"].sum(),
            "mean": ref["loss"].sum() / valid}[reduction]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(lt.grad, ref["dlogits"], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_reference_matches_the_optimizer(amsgrad, wd):
    rng = np.random.default_rng(2)
    p = nn.Parameter(rng.standard_normal(20))
    opt = optim.AdamW([p], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd,
                      amsgrad=amsgrad)
    q, m, v = p.data.copy(), np.zeros(20), np.zeros(20)
    vmax = np.zeros(20) if amsgrad else None
    for step in range(1, 5):
        g = rng.standard_normal(20) * step
        p.grad = g
        opt.step()
        q, m, v, vmax = adamw_reference(q, g, m, v, vmax, 0.05, 0.8, 0.95, 1e-6, wd, step)
        np.testing.assert_allclose(p.data, q, rtol=1e-12)


# =========================================================================== nvcc


def test_cuda_source_compiles_for_sm90(tmp_path):
    nvcc, ptxas = nvcc_tools()
    for dtype in fused.DTYPES:
        rc, log = nvcc_ptxas(nvcc, ptxas, fused.SOURCE_PATH, ["--ptx", "-arch=sm_90"],
                             fused.compile_options(dtype), tmp_path / f"fused_{dtype}.ptx")
        assert_clean_build(rc, log, fused.KERNEL_NAMES)
        assert "bytes spill" not in log or log.count("0 bytes spill stores") == len(
            fused.KERNEL_NAMES), f"spills:\n{log}"


def test_launcher_plans():
    assert fused.param_parts(1) == 1 and fused.param_parts(50) == 50
    assert fused.param_parts(10**6) == fused.MAX_PARAM_PARTS
    assert fused.adamw_blocks(1) == 1 and fused.adamw_blocks(257) == 2
    assert fused.adamw_blocks(10**9) == fused.ADAMW_MAX_BLOCKS
    assert fused.smem_bytes(256) == 96 and fused.SMEM_BYTES == fused.smem_bytes(fused.THREADS)


def test_enabled_only_by_the_environment(monkeypatch):
    monkeypatch.delenv("TINYLM_FUSED_KERNELS", raising=False)
    assert fused.enabled() is fused.DEFAULT_ENABLED is False
    monkeypatch.setenv("TINYLM_FUSED_KERNELS", "1")
    assert fused.enabled()
    assert not fused.usable(np.zeros(3, np.float32))  # NumPy arrays never
    monkeypatch.setenv("TINYLM_FUSED_KERNELS", "0")
    assert not fused.enabled()


# =========================================================================== the kernels on the CPU


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not on PATH")
    out = tmp_path_factory.mktemp("fz_emu")
    built = {}

    def get(threads=fused.THREADS, source=None):
        key = (threads, source)
        if key not in built:
            src = fused.SOURCE_PATH
            if source is not None:  # a mutated copy of the kernels
                src = out / f"mutant_{len(built)}.cu"
                src.write_text(source)
            exe = out / f"emu_{len(built)}"
            cmd = [gxx, "-O1", "-w", *fused.compile_options("float32", threads),
                   "-DFZ_HOST_EMULATION", f'-DFZ_CU_PATH="{src}"', str(HERE / "fused_emu.cpp"),
                   "-o", str(exe)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, f"building the emulator failed:\n{r.stdout}{r.stderr}"
            built[key] = exe
        return built[key]

    return get, out


def _run(emulator, op, args, inputs, threads, order, source=None, check=True):
    get, out = emulator
    exe = get(threads, source)
    tag = f"{op}_{abs(hash((tuple(map(str, args)), threads, order, source)))}"
    inp, res = out / f"in_{tag}.bin", out / f"out_{tag}.bin"
    inp.write_bytes(b"".join(np.ascontiguousarray(a).tobytes() for a in inputs))
    cmd = [str(exe), op, str(fused.smem_bytes(threads)), *map(str, args), str(inp), str(res)]
    env = dict(os.environ, FZ_EMU_ORDER=order)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if not check and r.returncode != 0:
        return r, None
    assert r.returncode == 0, f"emulated {op} failed:\n{r.stdout}{r.stderr}"
    return r, res.read_bytes()


def _split(buf, sizes):
    out, off = [], 0
    for n in sizes:
        out.append(np.frombuffer(buf, np.float32, n, off).astype(np.float64))
        off += 4 * n
    assert off == len(buf)
    return out


def _f(x) -> str:  # a float32 scalar, exactly, for the emulator's strtof
    return repr(float(np.float32(x)))


def emulate_norm(emulator, N, D, center, has_w, has_b, threads=fused.THREADS, order="forward",
                 seed=0, eps=1e-5, source=None, check=True):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, D)) * 2 + 3).astype(F32)  # an offset: the mean matters
    w, b = (1 + rng.standard_normal(D)).astype(F32), rng.standard_normal(D).astype(F32)
    dy = rng.standard_normal((N, D)).astype(F32)
    args = [N, D, int(center), int(has_w), int(has_b), _f(eps), fused.param_parts(N)]
    r, buf = _run(emulator, "norm", args, (x, w, b, dy), threads, order, source, check)
    if buf is None:
        return r, None
    y, mean, rstd, dx, dw, db = _split(buf, (N * D, N, N, N * D, D, D))
    got = dict(y=y, mean=mean, rstd=rstd, dx=dx, dw=dw, db=db)
    want = norm_reference(x, w if has_w else None, b if has_b else None, dy, float(F32(eps)),
                          center)
    keep = ["y", "rstd", "dx"] + ["mean"] * center + ["dw"] * has_w + ["db"] * has_b
    if not center:
        assert np.all(mean == 0), "RMSNorm's mean output must be 0"
    results = {k: (got[k], want[k]) for k in keep}
    # dx = rstd (g - ...) cancels to ~0 for D = 1: compare on the scale of rstd * g
    g_scale = np.abs(dy * (w if has_w else 1) * want["rstd"][:, None]).max()
    results["dx"] += (g_scale,)
    return r, results


def emulate_ce(emulator, N, V, reduction, eps, ignore_index=-100, threads=fused.THREADS,
               order="forward", seed=0, offset=0.0, source=None, check=True, nan_col=None):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, V)) * 3 + offset).astype(F32)
    t = rng.integers(0, V, N).astype(np.int64)
    t[rng.random(N) < 0.3] = ignore_index
    if nan_col is not None:  # row 0 holds a NaN logit (and a target that is not it)
        logits[0, nan_col] = np.nan
        t[0] = (nan_col + 1) % V
    valid = t != ignore_index
    grad = (rng.standard_normal(N) if reduction == "none" else rng.standard_normal(1)).astype(F32)
    count = np.array([valid.sum()], dtype=F32)
    use_count = reduction == "mean"
    ome, eov, smooth = fused.smoothing_args(V, eps)
    args = [N, V, ignore_index, _f(ome), _f(eov), int(smooth), grad.size, int(use_count)]
    r, buf = _run(emulator, "ce", args, (logits, t, grad, count), threads, order, source, check)
    if buf is None:
        return r, None
    loss, lse, dl = _split(buf, (N, N, N * V))
    want = ce_reference(logits, t, ignore_index, eps, grad, count[0] if use_count else None)
    return r, dict(loss=(loss, want["loss"]), lse=(lse, want["lse"]),
                   dlogits=(dl, want["dlogits"]))


def emulate_adamw(emulator, n, amsgrad, wd, step, blocks=None, threads=fused.THREADS,
                  order="forward", seed=0, source=None, check=True):
    rng = np.random.default_rng(seed)
    p, g = rng.standard_normal(n).astype(F32), rng.standard_normal(n).astype(F32)
    m = (rng.standard_normal(n) * 0.1).astype(F32)
    v = (rng.random(n) * 0.1).astype(F32)
    vmax = (v + rng.random(n) * 0.05 * (rng.random(n) < 0.5)).astype(F32)
    hp = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, step=step)
    scalars = fused.adamw_scalars(*hp.values())
    blocks = fused.adamw_blocks(n) if blocks is None else blocks
    args = [n, blocks, *map(_f, scalars[:-1]), int(scalars[-1]), int(amsgrad)]
    r, buf = _run(emulator, "adamw", args, (p, g, m, v, vmax), threads, order, source, check)
    if buf is None:
        return r, None
    gp, gm, gv, gvmax = _split(buf, (n, n, n, n))
    wp, wm, wv, wvmax = adamw_reference(p, g, m, v, vmax if amsgrad else None, **hp)
    out = dict(update=(gp - p, wp - p), m=(gm, wm), v=(gv, wv))
    if amsgrad:
        out["vmax"] = (gvmax, wvmax)
    else:
        assert np.array_equal(gvmax, vmax), "vmax written without amsgrad"
    return r, out


def _check(results, rtol=1e-5, atol_frac=1e-6):
    """results: name -> (got, want) or (got, want, scale): atol is atol_frac times scale,
    by default max |want|."""
    for name, (got, want, *scale) in results.items():
        frac = atol_frac * scale[0] / max(np.abs(want).max(), 1e-300) if scale else atol_frac
        assert_close(name, got, want, rtol, frac)


NORM_CASES = [  # N, D, center, has_w, has_b, threads, order
    (1, 1, True, True, True, 256, "forward"),
    (3, 100, True, True, True, 256, "reverse"),
    (4, 257, True, True, False, 256, "forward"),
    (2, 1000, True, False, True, 64, "reverse"),
    (5, 3000, True, False, False, 64, "forward"),
    (1, 8192, True, True, True, 256, "reverse"),  # the longest hidden size
    (200, 33, True, True, True, 64, "forward"),   # more rows than the P = 128 partials
    (130, 70, True, True, True, 256, "reverse"),
    (1, 1, False, True, False, 256, "forward"),
    (3, 257, False, True, False, 256, "reverse"),
    (2, 8192, False, True, False, 64, "forward"),
    (131, 40, False, True, False, 64, "reverse"),
]


@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: "-".join(map(str, c)))
def test_norm_kernels_emulated(emulator, case):
    N, D, center, has_w, has_b, threads, order = case
    _, results = emulate_norm(emulator, N, D, center, has_w, has_b, threads, order, seed=N + D)
    _check(results)


# Boundary sweep (issue 21): row lengths 0, 1 and -1 mod the warp (32) and the block
# (256 threads), row counts around the P = 128 partial column sums, both orders.
NORM_BOUNDARY = [(N, D, center, True, center, 256, order)
                 for (N, D), order in zip([(127, 255), (128, 256), (129, 257), (1, 31),
                                           (2, 32), (3, 33), (129, 511), (2, 513)],
                                          ["forward", "reverse"] * 4)
                 for center in (True, False)]


@pytest.mark.parametrize("case", NORM_BOUNDARY, ids=lambda c: "-".join(map(str, c)))
def test_norm_kernels_emulated_boundaries(emulator, case):
    N, D, center, has_w, has_b, threads, order = case
    _, results = emulate_norm(emulator, N, D, center, has_w, has_b, threads, order, seed=N * D)
    _check(results)


CE_CASES = [  # N, V, reduction, label smoothing, threads, order, logit offset
    (1, 1, "mean", 0.0, 256, "forward", 0.0),
    (4, 300, "mean", 0.0, 256, "reverse", 0.0),
    (5, 257, "sum", 0.1, 64, "forward", 0.0),
    (6, 1000, "none", 0.0, 64, "reverse", 0.0),
    (3, 1000, "none", 0.2, 256, "forward", 1000.0),  # large logits: the max is subtracted
    (2, 50257, "mean", 0.1, 256, "reverse", 0.0),    # GPT-2's vocabulary
    (1, 50257, "none", 0.0, 256, "forward", -50.0),
]


@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cross_entropy_kernels_emulated(emulator, case):
    N, V, reduction, eps, threads, order, offset = case
    _, results = emulate_ce(emulator, N, V, reduction, eps, threads=threads, order=order,
                            seed=N * V, offset=offset)
    _check(results, atol_frac=1e-6)


@pytest.mark.parametrize("nan_col", [0, 5, 999])
def test_cross_entropy_nan_logit_gives_a_nan_loss(emulator, nan_col):
    """A NaN logit anywhere in a row (also first, where the running max is still -inf)
    makes that row's loss and lse NaN, as on the composed path; other rows are exact."""
    _, results = emulate_ce(emulator, 3, 1000, "none", 0.0, seed=4, nan_col=nan_col)
    assert np.isnan(results["loss"][0][0]) and np.isnan(results["lse"][0][0])
    _check(results)


def test_cross_entropy_ignore_index_inside_the_vocabulary(emulator):
    _, results = emulate_ce(emulator, 8, 50, "mean", 0.1, ignore_index=0, seed=3)
    _check(results)


CE_BOUNDARY = [(N, V, "none", 0.1, 256, order, 0.0)
               for (N, V), order in zip([(3, 255), (2, 256), (3, 257), (2, 31), (3, 33),
                                         (2, 511), (1, 513)], ["forward", "reverse"] * 4)]


@pytest.mark.parametrize("case", CE_BOUNDARY, ids=lambda c: "-".join(map(str, c)))
def test_cross_entropy_kernels_emulated_boundaries(emulator, case):
    N, V, reduction, eps, threads, order, offset = case
    _, results = emulate_ce(emulator, N, V, reduction, eps, threads=threads, order=order,
                            seed=N + V, offset=offset)
    _check(results, atol_frac=1e-6)


ADAMW_CASES = [  # n, amsgrad, weight decay, step, blocks (None: the launcher's), threads
    (1, False, 0.0, 1, None, 256),
    (1000, False, 0.1, 1, None, 256),
    (5000, True, 0.1, 7, None, 64),
    (5000, False, 0.01, 3, 3, 64),   # fewer blocks than elements / threads: the stride loop
    (70001, True, 0.0, 2, 5, 256),
    (255, False, 0.1, 2, None, 256), (256, True, 0.1, 2, None, 256),  # 0, +-1 mod a block
    (257, False, 0.0, 4, None, 256), (513, True, 0.0, 3, 2, 256),
]


@pytest.mark.parametrize("case", ADAMW_CASES, ids=lambda c: "-".join(map(str, c)))
def test_adamw_kernel_emulated(emulator, case):
    n, amsgrad, wd, step, blocks, threads = case
    _, results = emulate_adamw(emulator, n, amsgrad, wd, step, blocks, threads, seed=n)
    _check(results, rtol=1e-5, atol_frac=1e-5)


def test_emulated_results_are_bitwise_reproducible_and_order_free(emulator):
    """No atomics, fixed summation orders: the same bits whichever warp runs first."""
    bufs = []
    for order in ("forward", "reverse"):
        _, results = emulate_norm(emulator, 130, 300, True, True, True, 64, order, seed=9)
        bufs.append({k: r[0].tobytes() for k, r in results.items()})
    assert bufs[0] == bufs[1]


MUTATIONS = [  # (what, original text, replacement, which emulated run must fail)
    ("block_sum without its trailing barrier",
     "    for (int w = 1; w < FZ_WARPS; ++w) s += red[w];\n    __syncthreads();\n",
     "    for (int w = 1; w < FZ_WARPS; ++w) s += red[w];\n", "norm"),
    ("ce_fwd reads the warps' partials before the barrier",
     "    __syncthreads();\n    if (threadIdx.x != 0) return;", "    if (threadIdx.x != 0) return;",
     "ce"),
    ("colsum drops the last partial", "for (int p = 0; p < P; ++p)",
     "for (int p = 0; p < P - 1; ++p)", "norm"),
    ("params partials stride by one row too few", "r += P)", "r += P - 1)", "norm"),
    ("ce_bwd subtracts at the wrong class", "if (j == t) g", "if (j == t + 1) g", "ce"),
    ("adamw stride ignores the grid", "(long long)gridDim.x * FZ_THREADS", "FZ_THREADS", "adamw"),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m[0])
def test_emulator_catches_mutated_kernels(emulator, mutation):
    what, old, new, op = mutation
    src = fused.SOURCE_PATH.read_text()
    assert src.count(old) == 1, f"mutation anchor not found once: {old!r}"
    mutant = src.replace(old, new)
    run = {"norm": lambda: emulate_norm(emulator, 200, 300, True, True, True, 64, "forward",
                                        seed=1, source=mutant, check=False),
           "ce": lambda: emulate_ce(emulator, 3, 500, "mean", 0.1, threads=64, seed=1,
                                    source=mutant, check=False),
           "adamw": lambda: emulate_adamw(emulator, 1000, False, 0.1, 2, blocks=2, threads=64,
                                          source=mutant, check=False)}[op]
    r, results = run()
    if results is None:  # the emulator itself objected (NaN read, deadlock, bad write)
        assert "EMULATION ERROR" in r.stderr, r.stderr
        return
    with pytest.raises(AssertionError):  # it ran: the results must be wrong
        _check(results)


# =========================================================================== ops' fused branches
# On NumPy, with fused.usable answering True for float32 arrays and the kernels replaced
# by the references: the branches in ops.nn and optim.AdamW must give what the composed
# path gives (reshapes, reductions, ignore_index, what backward reads).


class FakeKernels:
    """fused's launchers as float64 references on NumPy float32 arrays (while ``on``)."""

    def __init__(self):
        self.on, self.calls = False, []

    def usable(self, *arrays):
        arrays = [a for a in arrays if a is not None]
        return self.on and all(isinstance(a, np.ndarray) and a.dtype == F32
                               and a.flags.c_contiguous for a in arrays)

    def norm_forward(self, x, w, b, eps, center):
        self.calls.append("norm_forward")
        assert x.ndim == 2 and x.flags.c_contiguous
        r = norm_reference(x, w, b, None, eps, center)
        return r["y"].astype(F32), r["mean"].astype(F32), r["rstd"].astype(F32)

    def norm_backward(self, dy, x, w, mean, rstd, center, want_w, want_b):
        self.calls.append("norm_backward")
        assert dy.shape == x.shape and dy.dtype == F32 and dy.flags.c_contiguous
        r = norm_reference(x, w, None, dy, None, center, mean=mean, rstd=rstd)
        return (r["dx"].astype(F32), r["dw"].astype(F32) if want_w else None,
                r["db"].astype(F32) if want_b else None)

    def cross_entropy_forward(self, logits, targets, ignore_index, label_smoothing):
        self.calls.append("ce_forward")
        assert logits.ndim == 2 and targets.dtype == np.int64 and targets.ndim == 1
        r = ce_reference(logits, targets, ignore_index, label_smoothing, 1.0)
        return r["loss"].astype(F32), r["lse"].astype(F32)

    def cross_entropy_backward(self, logits, targets, lse, grad, count, ignore_index,
                               label_smoothing):
        self.calls.append("ce_backward")
        assert np.size(grad) in (1, logits.shape[0])
        r = ce_reference(logits, targets, ignore_index, label_smoothing, grad, count, lse=lse)
        return r["dlogits"].astype(F32)

    def adamw_step(self, p, g, m, v, vmax, *, lr, beta1, beta2, eps, weight_decay, step):
        self.calls.append("adamw")
        new = adamw_reference(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, step)
        for dst, src in zip((p, m, v, vmax), new):
            if dst is not None:
                dst[...] = src


@pytest.fixture
def fake(monkeypatch):
    k = FakeKernels()
    for name in ("usable", "norm_forward", "norm_backward", "cross_entropy_forward",
                 "cross_entropy_backward", "adamw_step"):
        monkeypatch.setattr(fused, name, getattr(k, name))
    return k


def _run_op(fn, arrays, upstream):
    y, ts = _grads(fn, *arrays)
    y.backward(upstream)
    return [y.numpy()] + [t.grad for t in ts]


def _both(fake, fn, arrays, upstream):
    fake.on = False
    composed = _run_op(fn, arrays, upstream)
    fake.on, fake.calls[:] = True, []
    fused_ = _run_op(fn, arrays, upstream)
    fake.on = False
    return composed, fused_


NORM_OPS = {
    "layer": lambda x, w, b: F.layer_norm(x, w, b),
    "layer-w": lambda x, w, b: F.layer_norm(x, w),
    "layer-b": lambda x, w, b: F.layer_norm(x, None, b),
    "layer-plain": lambda x, w, b: F.layer_norm(x, eps=1e-3),
    "rms": lambda x, w, b: F.rms_norm(x, w, eps=1e-4),
}


@pytest.mark.parametrize("kind", NORM_OPS)
def test_norm_ops_fused_branch(fake, kind):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 3, 10)) + 1).astype(F32)
    w, b = rng.standard_normal(10).astype(F32), rng.standard_normal(10).astype(F32)
    uses = {"layer": [w, b], "layer-w": [w], "layer-b": [b], "layer-plain": [], "rms": [w]}[kind]

    def fn(t, *ps):
        it = iter(ps)
        return NORM_OPS[kind](t, next(it) if kind in ("layer", "layer-w", "rms") else None,
                              next(it) if kind in ("layer", "layer-b") else None)

    up = rng.standard_normal((2, 3, 10)).astype(F32)[:, ::-1]  # a strided upstream gradient
    composed, fused_ = _both(fake, fn, [x, *uses], up)
    assert fake.calls == ["norm_forward", "norm_backward"]
    for i, (c, f) in enumerate(zip(composed, fused_)):
        assert f.dtype == F32 and f.shape == c.shape
        np.testing.assert_allclose(f, c, rtol=2e-5, atol=2e-5, err_msg=f"output {i}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_op_fused_branch(fake, reduction, eps, ignore_index):
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((3, 4, 7)) * 2).astype(F32)
    t = rng.integers(0, 7, (3, 4)).astype(np.int32)  # int32 targets are widened
    t[0, 1] = t[2, 3] = ignore_index
    up = rng.standard_normal((3, 4)).astype(F32) if reduction == "none" else np.float32(1.5)

    def fn(a):
        return F.cross_entropy(a, t, ignore_index=ignore_index, label_smoothing=eps,
                               reduction=reduction)

    composed, fused_ = _both(fake, fn, [logits], up)
    assert fake.calls == ["ce_forward", "ce_backward"]
    for i, (c, f) in enumerate(zip(composed, fused_)):
        assert f.dtype == F32 and f.shape == c.shape
        np.testing.assert_allclose(f, c, rtol=2e-5, atol=1e-6, err_msg=f"output {i}")


def test_cross_entropy_fused_branch_rejects_bad_targets(fake):
    fake.on = True
    logits = np.zeros((2, 5), F32)
    with pytest.raises(Exception, match="outside"):
        F.cross_entropy(Tensor(logits), np.array([1, 5]))
    assert fake.calls == []


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_fused_branch(fake, amsgrad):
    rng = np.random.default_rng(6)
    start = [rng.standard_normal(s).astype(F32) for s in ((4, 5), (7,))]
    runs = []
    for on in (False, True):
        fake.on = on
        params = [nn.Parameter(a.copy()) for a in start]
        opt = optim.AdamW([{"params": params[:1], "weight_decay": 0.1},
                           {"params": params[1:], "weight_decay": 0.0}], lr=0.01,
                          amsgrad=amsgrad)
        for step in range(4):
            for i, p in enumerate(params):
                p.grad = np.random.default_rng(step * 10 + i).standard_normal(p.shape).astype(F32)
            opt.step()
        runs.append([p.data for p in params] + [opt.state[p]["exp_avg_sq"] for p in params])
    assert fake.calls == ["adamw"] * 8
    for a, b in zip(*runs):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_adamw_strided_gradient_takes_the_composed_path(fake):
    fake.on = True
    p = nn.Parameter(np.ones((4, 4), F32))
    p.grad = np.ones((4, 8), F32)[:, ::2]
    optim.AdamW([p]).step()
    assert fake.calls == []


def _char_gpt():
    spec = importlib.util.spec_from_file_location("char_gpt", ROOT / "examples" / "char_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train_losses(device, steps, d=32, n_layer=2, block=16, batch=4, vocab=20):
    ex = _char_gpt()
    data = np.random.default_rng(0).integers(0, vocab, 2000)
    backend.seed(1234)
    model = ex.CharGPT(vocab, block, d, n_layer).to(device)
    return ex.train(model, data, steps, block, batch, 1e-3, device, seed=0, log=None)


def test_training_steps_through_the_fused_branches(fake):
    """The example CharGPT (LayerNorms, cross-entropy, AdamW) for a few steps: the same
    losses with the fused branches (reference kernels) as without."""
    fake.on = False
    composed = _train_losses("cpu", 4)
    fake.on = True
    fused_ = _train_losses("cpu", 4)
    kernels = {"norm_forward", "norm_backward", "ce_forward", "ce_backward", "adamw"}
    assert kernels <= set(fake.calls)
    np.testing.assert_allclose(fused_, composed, rtol=1e-5)


# =========================================================================== on the GPU


@pytest.fixture
def cp(monkeypatch):
    cupy = pytest.importorskip("cupy")
    monkeypatch.setenv("TINYLM_POISON", "1")  # outputs start as NaN: all must be written
    monkeypatch.setenv("TINYLM_FUSED_KERNELS", "1")
    return cupy


def _gpu_op(cp, monkeypatch, fn, arrays, upstream, fused_on):
    monkeypatch.setenv("TINYLM_FUSED_KERNELS", "1" if fused_on else "0")
    ts = [Tensor(cp.asarray(a), requires_grad=a.dtype.kind == "f") for a in arrays]
    y = fn(*ts)
    y.backward(cp.asarray(upstream))
    cp.cuda.runtime.deviceSynchronize()
    return [cp.asnumpy(y.data)] + [cp.asnumpy(t.grad) for t in ts if t.requires_grad]


GPU_NORM_SHAPES = [(1, 1), (3, 100), (64, 768), (5, 1000), (2, 8192), (300, 257), (8192, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_NORM_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["layer", "layer-plain", "rms"])
def test_gpu_norm_kernels(cp, monkeypatch, shape, kind):
    N, D = shape
    rng = np.random.default_rng(N * D)
    x = (rng.standard_normal((N, D)) * 2 + 3).astype(F32)
    w, b = (1 + rng.standard_normal(D)).astype(F32), rng.standard_normal(D).astype(F32)
    dy = rng.standard_normal((N, D)).astype(F32)
    center = kind != "rms"
    W = None if kind == "layer-plain" else w
    B = b if kind == "layer" else None
    # the kernels against float64
    y, mean, rstd = fused.norm_forward(cp.asarray(x), None if W is None else cp.asarray(W),
                                       None if B is None else cp.asarray(B), 1e-5, center)
    dx, dw, db = fused.norm_backward(cp.asarray(dy), cp.asarray(x),
                                     None if W is None else cp.asarray(W), mean, rstd, center,
                                     W is not None, B is not None)
    want = norm_reference(x, W, B, dy, float(F32(1e-5)), center)
    got = dict(y=y, mean=mean, rstd=rstd, dx=dx, dw=dw, db=db)
    for name in ("y", "rstd", "dx") + ("mean",) * center + ("dw",) * (W is not None) + (
            "db",) * (B is not None):
        scale = np.abs(dy * (1 if W is None else W) * want["rstd"][:, None]).max() \
            if name == "dx" else np.abs(want[name]).max()
        assert_close(name, cp.asnumpy(got[name]), want[name], 1e-5,
                     1e-6 * scale / max(np.abs(want[name]).max(), 1e-300))
    # the op with fused kernels against the op without
    params = [a for a in (W, B) if a is not None]

    def fn(t, *ps):
        if not center:
            return F.rms_norm(t, ps[0], eps=1e-5)
        it = iter(ps)
        return F.layer_norm(t, next(it) if W is not None else None,
                            next(it) if B is not None else None)

    on = _gpu_op(cp, monkeypatch, fn, [x, *params], dy, True)
    off = _gpu_op(cp, monkeypatch, fn, [x, *params], dy, False)
    for i, (a, c) in enumerate(zip(on, off)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * np.abs(c).max() + 1e-30,
                                   err_msg=f"output {i}")


GPU_CE_CASES = [(1, 1, "mean", 0.0), (7, 300, "sum", 0.1), (64, 1000, "none", 0.0),
                (512, 50257, "mean", 0.0), (3, 50257, "mean", 0.1), (100, 65, "none", 0.2)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CE_CASES, ids=str)
def test_gpu_cross_entropy_kernels(cp, monkeypatch, case):
    N, V, reduction, eps = case
    rng = np.random.default_rng(N + V)
    logits = (rng.standard_normal((N, V)) * 3).astype(F32)
    t = rng.integers(0, V, N).astype(np.int64)
    t[rng.random(N) < 0.2] = -100
    up = rng.standard_normal(N).astype(F32) if reduction == "none" else np.float32(0.7)
    valid = np.float32((t != -100).sum())
    count = cp.asarray(valid) if reduction == "mean" else None
    loss, lse = fused.cross_entropy_forward(cp.asarray(logits), cp.asarray(t), -100, eps)
    dl = fused.cross_entropy_backward(cp.asarray(logits), cp.asarray(t), lse, cp.asarray(up),
                                      count, -100, eps)
    want = ce_reference(logits, t, -100, eps, up, valid if reduction == "mean" else None)
    assert_close("loss", cp.asnumpy(loss), want["loss"])
    assert_close("lse", cp.asnumpy(lse), want["lse"])
    assert_close("dlogits", cp.asnumpy(dl), want["dlogits"])

    def fn(a, tt):
        return F.cross_entropy(a, tt, label_smoothing=eps, reduction=reduction)

    on = _gpu_op(cp, monkeypatch, fn, [logits, t], up, True)
    off = _gpu_op(cp, monkeypatch, fn, [logits, t], up, False)
    for i, (a, c) in enumerate(zip(on, off)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * np.abs(c).max() + 1e-30,
                                   err_msg=f"output {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("amsgrad", [False, True])
def test_gpu_adamw_kernel(cp, monkeypatch, amsgrad):
    rng = np.random.default_rng(7)
    shapes = [(1,), (1000,), (768, 3072), (257, 33)]
    start = [rng.standard_normal(s).astype(F32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(F32) for s in shapes] for _ in range(3)]
    runs = []
    for on in (True, False):
        monkeypatch.setenv("TINYLM_FUSED_KERNELS", "1" if on else "0")
        params = [nn.Parameter(cp.asarray(a)) for a in start]
        opt = optim.AdamW([{"params": params[:2], "weight_decay": 0.1},
                           {"params": params[2:], "weight_decay": 0.0}], lr=0.01,
                          amsgrad=amsgrad)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = cp.asarray(g)
            opt.step()
        runs.append([cp.asnumpy(p.data) for p in params])
    # against float64
    ref = [a.astype(np.float64) for a in start]
    m = [np.zeros_like(a) for a in ref]
    v = [np.zeros_like(a) for a in ref]
    vmax = [np.zeros_like(a) if amsgrad else None for a in ref]
    for step, step_grads in enumerate(grads, 1):
        for i, g in enumerate(step_grads):
            ref[i], m[i], v[i], vmax[i] = adamw_reference(
                ref[i], g, m[i], v[i], vmax[i], 0.01, 0.9, 0.999, 1e-8, 0.1 if i < 2 else 0.0,
                step)
    for fz, unf, r, a in zip(*runs, ref, start):
        assert_close("update vs float64", fz - a, r - a, 1e-4, 1e-4)
        np.testing.assert_allclose(fz, unf, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_fused_kernels_are_deterministic(cp):
    rng = np.random.default_rng(8)
    x = cp.asarray(rng.standard_normal((4096, 768)).astype(F32))
    dy = cp.asarray(rng.standard_normal((4096, 768)).astype(F32))
    w = cp.asarray(rng.standard_normal(768).astype(F32))
    logits = cp.asarray(rng.standard_normal((256, 50257)).astype(F32))
    t = cp.asarray(rng.integers(0, 50257, 256))
    outs = []
    for _ in range(2):
        y, mean, rstd = fused.norm_forward(x, w, w, 1e-5, True)
        dx, dw, db = fused.norm_backward(dy, x, w, mean, rstd, True, True, True)
        loss, lse = fused.cross_entropy_forward(logits, t, -100, 0.1)
        dl = fused.cross_entropy_backward(logits, t, lse, cp.float32(1.0), None, -100, 0.1)
        outs.append([cp.asnumpy(a).tobytes() for a in (y, dx, dw, db, loss, lse, dl)])
    assert outs[0] == outs[1]


@pytest.mark.gpu
def test_gpu_training_steps_match_unfused(cp, monkeypatch):
    """The example CharGPT on the GPU: losses with fused kernels equal those without. The
    first loss (no update yet) to float32 rounding; later ones within 1e-4, since Adam's
    first steps turn tiny gradient differences into lr-sized ones (sign of ~0)."""
    runs = []
    for on in ("1", "0"):
        monkeypatch.setenv("TINYLM_FUSED_KERNELS", on)
        runs.append(_train_losses("cuda", 5, d=64, n_layer=2, block=32, batch=8, vocab=65))
    fused_, composed = np.array(runs)
    assert abs(fused_[0] - composed[0]) <= 1e-6 * abs(composed[0]), runs
    assert np.abs(fused_ - composed).max() <= 1e-4, runs


# =========================================================================== the launcher, emulated
# fused.py's own launches (grids, argument tuples) run through the emulator: every
# argument's kind and type is checked against the kernel's signature, and the ops and
# AdamW reach the kernels through their real fused branches (on NumPy arrays).


def _encode_launch(args):
    """The IN file of `emu launch` for the launcher's argument tuple, and its buffers."""
    bufs, index, parts = [], {}, []
    for a in args:
        if isinstance(a, np.ndarray):
            key = a.__array_interface__["data"][0]
            if key not in index:
                assert a.flags.c_contiguous, "kernels take contiguous arrays"
                index[key] = len(bufs)
                bufs.append(a)
            assert bufs[index[key]].nbytes == a.nbytes, "one pointer, two array sizes"
            parts.append(np.array([0, a.itemsize, a.dtype.kind == "f", index[key]], np.int32))
        else:
            assert isinstance(a, np.generic), f"argument {a!r} is not a NumPy scalar"
            parts.append(np.array([1, a.itemsize, a.dtype.kind == "f"], np.int32))
            parts.append(np.frombuffer(a.tobytes(), np.uint8))
    head = [np.int32(len(bufs)).tobytes()]
    for b in bufs:
        head += [np.int64(b.nbytes).tobytes(), b.tobytes()]
    head.append(np.int32(len(args)).tobytes())
    return b"".join(head + [p.tobytes() for p in parts]), bufs


@pytest.fixture
def emulated_launcher(emulator, monkeypatch, tmp_path):
    """fused._launch runs the kernel in the emulator; usable() accepts NumPy float32."""
    exe = emulator[0]()
    launches = []

    def launch(name, like, grid, args, threads=fused.THREADS):
        data, bufs = _encode_launch(args)
        inp, res = tmp_path / "launch_in.bin", tmp_path / "launch_out.bin"
        inp.write_bytes(data)
        cmd = [str(exe), "launch", name, str(grid[0]), str(grid[1]), str(threads),
               str(fused.SMEM_BYTES), str(inp), str(res)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"emulated {name} {grid} failed:\n{r.stdout}{r.stderr}"
        assert grid[2] == 1
        out, off = res.read_bytes(), 0
        for b in bufs:  # in place, as on the device
            b.view(np.uint8).reshape(-1)[:] = np.frombuffer(out, np.uint8, b.nbytes, off)
            off += b.nbytes
        launches.append(name)

    def usable(*arrays):
        arrays = [a for a in arrays if a is not None]
        return all(isinstance(a, np.ndarray) and a.dtype == F32 and a.flags.c_contiguous
                   for a in arrays)

    monkeypatch.setattr(fused, "_launch", launch)
    monkeypatch.setattr(fused, "usable", usable)
    monkeypatch.setenv("TINYLM_POISON", "1")
    return launches


def test_launcher_runs_the_emulated_kernels(emulated_launcher):
    rng = np.random.default_rng(11)
    N, D, V = 5, 300, 1000
    x, dy = (rng.standard_normal((N, D)) + 2).astype(F32), rng.standard_normal((N, D)).astype(F32)
    w, b = rng.standard_normal(D).astype(F32), rng.standard_normal(D).astype(F32)
    for center, W, B in ((True, w, b), (True, None, b), (True, w, None), (False, w, None)):
        y, mean, rstd = fused.norm_forward(x, W, B, 1e-5, center)
        dx, dw, db = fused.norm_backward(dy, x, W, mean, rstd, center, W is not None, B is not None)
        want = norm_reference(x, W, B, dy, float(F32(1e-5)), center)
        _check({"y": (y, want["y"]), "rstd": (rstd, want["rstd"]), "dx": (dx, want["dx"])})
        assert (dw is None) == (W is None) and (db is None) == (B is None)
        if W is not None:
            _check({"dw": (dw, want["dw"])})
        if B is not None:
            _check({"db": (db, want["db"])})
    logits = (rng.standard_normal((N, V)) * 3).astype(F32)
    t = rng.integers(0, V, N)
    t[2] = -100
    for eps, grad, count in ((0.0, np.float32(0.5), np.float32(4)),
                             (0.1, rng.standard_normal(N).astype(F32), None)):
        loss, lse = fused.cross_entropy_forward(logits, t, -100, eps)
        dl = fused.cross_entropy_backward(logits, t, lse, grad, count, -100, eps)
        want = ce_reference(logits, t, -100, eps, grad, count)
        _check({"loss": (loss, want["loss"]), "lse": (lse, want["lse"]),
                "dlogits": (dl, want["dlogits"])})
    for vmax in (None, (rng.random(700) * 0.1).astype(F32)):
        p, g = rng.standard_normal(700).astype(F32), rng.standard_normal(700).astype(F32)
        m, v = (0.1 * rng.standard_normal(700)).astype(F32), (0.1 * rng.random(700)).astype(F32)
        p0, m0, v0 = p.copy(), m.copy(), v.copy()
        vmax0 = None if vmax is None else vmax.copy()
        fused.adamw_step(p, g, m, v, vmax, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                         weight_decay=0.1, step=3)
        wp, wm, wv, wvmax = adamw_reference(p0, g, m0, v0, vmax0, 0.1, 0.9, 0.99, 1e-8, 0.1, 3)
        _check({"update": (p - p0, wp - p0), "m": (m, wm), "v": (v, wv)}, atol_frac=1e-5)
        if vmax is not None:
            _check({"vmax": (vmax, wvmax)})
    assert set(emulated_launcher) == set(fused.KERNEL_NAMES)


def test_ops_reach_the_emulated_kernels(emulated_launcher):
    """LayerNorm, RMSNorm, cross-entropy and AdamW through their fused branches and the
    real launcher, kernels emulated: the composed path's results."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((2, 3, 40)) + 1).astype(F32)
    w, b = rng.standard_normal(40).astype(F32), rng.standard_normal(40).astype(F32)
    up = rng.standard_normal((2, 3, 40)).astype(F32)
    logits = (rng.standard_normal((2, 3, 50)) * 2).astype(F32)
    t = rng.integers(0, 50, (2, 3))
    t[1, 1] = -100
    ops = [(lambda a, ww, bb: F.layer_norm(a, ww, bb), [x, w, b], up),
           (lambda a, ww: F.rms_norm(a, ww), [x, w], up),
           (lambda a: F.cross_entropy(a, t, label_smoothing=0.1), [logits], np.float32(1.0))]
    for fn, arrays, upstream in ops:
        got = _run_op(fn, arrays, upstream)
        fused_calls = len(emulated_launcher)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused, "usable", lambda *a: False)
            want = _run_op(fn, arrays, upstream)
        assert len(emulated_launcher) == fused_calls and fused_calls > 0
        for i, (g, c) in enumerate(zip(got, want)):
            np.testing.assert_allclose(g, c, rtol=2e-5, atol=2e-6, err_msg=f"output {i}")
    start = rng.standard_normal((6, 7)).astype(F32)
    runs = []
    for on in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not on:
                mp.setattr(fused, "usable", lambda *a: False)
            p = nn.Parameter(start.copy())
            opt = optim.AdamW([p], lr=0.01, weight_decay=0.1, amsgrad=True)
            for step in range(3):
                p.grad = np.random.default_rng(step).standard_normal((6, 7)).astype(F32)
                opt.step()
            runs.append(p.data)
    assert "fz_adamw" in emulated_launcher
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_training_step_on_the_emulated_kernels(emulated_launcher):
    """Two steps of the example CharGPT with every norm, the loss and AdamW on the
    emulated kernels: the losses of the composed path."""
    got = _train_losses("cpu", 2, d=32, n_layer=1, block=8, batch=2, vocab=12)
    assert {"fz_norm_fwd", "fz_ce_bwd", "fz_adamw"} <= set(emulated_launcher)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "usable", lambda *a: False)
        want = _train_losses("cpu", 2, d=32, n_layer=1, block=8, batch=2, vocab=12)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_launcher_with_no_rows(emulated_launcher):
    x = np.zeros((0, 8), F32)
    y, mean, rstd = fused.norm_forward(x, np.ones(8, F32), None, 1e-5, True)
    dx, dw, db = fused.norm_backward(x, x, np.ones(8, F32), mean, rstd, True, True, True)
    assert y.shape == dx.shape == (0, 8) and np.all(dw == 0) and np.all(db == 0)
    assert emulated_launcher == []
