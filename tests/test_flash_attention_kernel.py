"""The FlashAttention kernels (tinylm/kernels/flash_attention.cu) and their oracle.

Without a GPU:
  - nvcc compiles every module (dtype x head dim, with the launcher's -D flags) for
    sm_90 and ptxas assembles it, with no warning (skipped without nvcc);
  - the NumPy oracle against an independent float64 loop and central differences;
  - the tiling algorithm (tile loops, causal skips, online softmax) in NumPy;
  - the kernel source itself, compiled for the CPU with tests/flash_attention_emu.cpp
    (threads as fibers; barriers, shuffles and mma.sync emulated; skipped without g++),
    against the oracle.
On a GPU (@pytest.mark.gpu, `pytest -m gpu`): the kernels on fresh random inputs against
the float64 oracle, every output element written (NaN poison), bitwise determinism,
input checks and the autograd op.
On both (one test body, the `kernels` fixture: emulator or CuPy): a boundary sweep of the
causal tile skipping per kernel family, spike visibility, and row-wise errors against a
reference that rounds as the kernels do (section "boundaries"; tests/test_fa_mutations.py
shows they catch two planted off-by-one bugs).

Both generations of the tensor-core kernels are tested (variant "v1" and "v2", see
flash_attention.kernel_plan): v2 on every shape, v1 (verified on an H200 before v2
existed, and unchanged since) on a smaller set.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from kernel_helpers import assert_clean_build, nvcc_ptxas, nvcc_tools
from tinylm.errors import DeviceError, ShapeError, TinyLMError
from tinylm.kernels import flash_attention as fa
from tinylm.tensor import Tensor

HERE = Path(__file__).resolve().parent
MODULES = [(dtype, d) for dtype in fa.DTYPES for d in fa.HEAD_DIMS]
# (dtype, head dim, ldmatrix): every module as the launcher builds it, plus one with the
# plain-load fallback of the tensor-core kernels (TINYLM_FA_LDMATRIX=0)
BUILDS = [(dtype, d, True) for dtype, d in MODULES] + [("float16", 64, False)]
IMPL_DTYPES = [("simt", "float32"), ("simt", "float16"), ("mma", "float16"),
               ("simt", "bfloat16"), ("mma", "bfloat16")]
# (impl, dtype, variant): every kernel family the launcher can run
CONFIGS = [(i, d, "v1") for i, d in IMPL_DTYPES] + [
    ("mma", "float16", "v2"), ("mma", "bfloat16", "v2"), ("simt", "float32", "v2")]
CONFIGS_V2 = [c for c in CONFIGS if c[2] == "v2"]
TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over the finite entries of expected; inf when
    actual has a NaN or its infinities sit elsewhere (lse = -inf on fully masked rows)."""
    a = np.asarray(actual, dtype=np.float64).reshape(np.shape(expected))
    e = np.asarray(expected, dtype=np.float64)
    if np.isnan(a).any():
        return math.inf
    fin = np.isfinite(e)
    if not np.array_equal(np.isfinite(a), fin) or not np.array_equal(a[~fin], e[~fin]):
        return math.inf
    den = np.linalg.norm(e[fin])
    num = np.linalg.norm(a[fin] - e[fin])
    return float(num / den) if den > 0 else float(num)


def random_qkv(B, H, Hkv, Tq, Tk, D, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Tq, D))
    k = rng.standard_normal((B, Hkv, Tk, D))
    v = rng.standard_normal((B, Hkv, Tk, D))
    do = rng.standard_normal((B, H, Tq, D))
    return q, k, v, do


# =========================================================================== nvcc


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    nvcc, ptxas = nvcc_tools()
    out = tmp_path_factory.mktemp("fa_nvcc")

    def build(module):
        dtype, d, ldm = module
        # Front-end optimisation -O1 (4x faster; errors are the same): all but the
        # heaviest module, which gets the full optimiser the NVRTC build uses.
        fast = [] if (dtype, d, ldm) == ("float16", 128, True) else ["-Xcicc", "-O1"]
        rc, log = nvcc_ptxas(nvcc, ptxas, fa.SOURCE_PATH, ["--ptx", "-arch=sm_90", *fast],
                             fa.compile_options(dtype, d, ldm),
                             out / f"fa_{dtype}_{d}_{int(ldm)}.ptx")
        return module, rc, log

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return {m: (rc, log) for m, rc, log in pool.map(build, BUILDS)}


@pytest.mark.parametrize("module", BUILDS,
                         ids=[f"{t}-d{d}{'' if ldm else '-noldmatrix'}" for t, d, ldm in BUILDS])
def test_cuda_source_compiles_for_sm90(nvcc_results, module):
    rc, log = nvcc_results[module]
    assert_clean_build(rc, log, fa.kernel_names(module[0]))
    # the v2 tensor-core kernels were sized to fit the registers: no local-memory spills
    for entry in log.split("Compiling entry function '")[1:]:
        name = entry.split("'")[0]
        if name.endswith("_mma2"):
            assert "0 bytes spill stores, 0 bytes spill loads" in entry, f"{name} spills:\n{entry}"


def test_launch_shapes_fit_hopper():
    for dtype, d in MODULES:
        for name in fa.kernel_names(dtype):
            rows, threads, smem = fa.launch_shape(name, d)
            assert rows % 8 == 0 and threads % 32 == 0
            assert smem <= 227 * 1024, (name, d, smem)


# =========================================================================== the oracle


def loop_attention(q, k, v, causal, scale):
    """Row by row, in float64, from the definition: the oracle's oracle."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = np.zeros(q.shape)
    lse = np.full((B, H, Tq), -np.inf)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // (H // Hkv)], v[b, h // (H // Hkv)]
            for i in range(Tq):
                keys = [j for j in range(Tk) if not causal or j <= i + Tk - Tq]
                if not keys:
                    continue
                s = np.array([q[b, h, i] @ kh[j] * scale for j in keys])
                w = np.exp(s - s.max())
                o[b, h, i] = sum(wj * vh[j] for wj, j in zip(w, keys)) / w.sum()
                lse[b, h, i] = s.max() + math.log(w.sum())
    return o, lse


SHAPES = [  # B, H, Hkv, Tq, Tk, D
    (1, 2, 2, 5, 5, 4),
    (2, 4, 2, 6, 6, 3),  # GQA
    (1, 3, 1, 4, 7, 5),  # MQA, queries at the end of a longer key sequence (KV cache)
    (1, 2, 1, 6, 3, 4),  # more queries than keys: causal rows 0..2 see nothing
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_forward_matches_loop(shape, causal):
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, _ = random_qkv(B, H, Hkv, Tq, Tk, D, seed=1)
    o, lse = fa.attention_reference(np, q, k, v, causal, 0.7)
    want_o, want_lse = loop_attention(q, k, v, causal, 0.7)
    assert o.dtype == np.float64
    np.testing.assert_allclose(o, want_o, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backward_matches_finite_differences(shape, causal):
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, do = random_qkv(B, H, Hkv, Tq, Tk, D, seed=2)
    scale = 0.6
    dq, dk, dv = fa.attention_reference_backward(np, q, k, v, do, causal, scale)

    def loss(qq, kk, vv):
        return float((fa.attention_reference(np, qq, kk, vv, causal, scale)[0] * do).sum())

    eps = 1e-6
    for which, grad in ((0, dq), (1, dk), (2, dv)):
        args = [q, k, v]
        num = np.zeros_like(args[which])
        for idx in np.ndindex(*num.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            num[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8, err_msg=f"input {which}")


def test_reference_fully_masked_rows_are_zero():
    q, k, v, do = random_qkv(1, 2, 1, 6, 3, 4, seed=3)  # shift -3: rows 0..2 see no key
    o, lse = fa.attention_reference(np, q, k, v, True)
    dq, dk, dv = fa.attention_reference_backward(np, q, k, v, do, True)
    assert np.all(o[:, :, :3] == 0) and np.all(np.isneginf(lse[:, :, :3]))
    assert np.all(np.isfinite(lse[:, :, 3:])) and np.all(dq[:, :, :3] == 0)
    assert np.isfinite(dk).all() and np.isfinite(dv).all()


def test_reference_float32_inputs_compute_in_float32():
    q, k, v, _ = random_qkv(1, 1, 1, 4, 4, 8, seed=4)
    o, lse = fa.attention_reference(np, *(a.astype(np.float32) for a in (q, k, v)))
    assert o.dtype == np.float32 and lse.dtype == np.float32


def test_function_on_numpy_uses_the_reference_and_differentiates():
    from tinylm.testing import gradcheck

    q, k, v, _ = random_qkv(1, 2, 1, 4, 5, 3, seed=5)
    assert gradcheck(lambda a, b, c: fa.FlashAttention.apply(a, b, c, causal=True, scale=0.5),
                     q, k, v)
    out = fa.flash_attention(Tensor(q), Tensor(k), Tensor(v), causal=True, scale=0.5)
    np.testing.assert_allclose(out.numpy(), fa.attention_reference(np, q, k, v, True, 0.5)[0])


def test_kernels_refuse_numpy_arrays():
    q, k, v, _ = random_qkv(1, 1, 1, 4, 4, 32, seed=6)
    with pytest.raises(DeviceError, match="CuPy"):
        fa.flash_attention_forward(q.astype(np.float32), k, v)


def test_bf16_bits_round_to_nearest_even():
    # bfloat16 keeps 7 fraction bits: near 1 the spacing is 2**-7, a tie is 2**-8 away
    x = np.array([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, np.inf, np.nan],
                 dtype=np.float32)
    bits = fa.to_bf16_bits(np, x)
    assert bits.dtype == np.uint16
    back = fa.from_bf16_bits(np, bits)
    expected = [1.0, -2.5, 1.0, 1 + 2**-6, 1 + 2**-7, np.inf]  # ties go to the even one
    np.testing.assert_array_equal(back[:6], expected)
    assert np.isnan(back[6])


# =========================================================================== tiling, in NumPy
# The loops of the kernels (tile order, causal tile skipping, base-2 online softmax,
# the backward's key-tile / query-tile ownership), on whole tiles at a time. Besides
# the result, each skipped tile is checked to hold no visible (query, key) pair.


def visible_key_tiles(q0, BR, BC, Tq, Tk, causal):  # as in the .cu
    n_all = -(-Tk // BC)
    if not causal:
        return n_all
    last_key = min(q0 + BR, Tq) - 1 + (Tk - Tq)
    return 0 if last_key < 0 else min(n_all, last_key // BC + 1)


def first_query_tile(k0, BR, Tq, Tk, causal):  # as in the .cu
    if not causal:
        return 0
    r = k0 - (Tk - Tq)
    return 0 if r <= 0 else r // BR


def _visible(rows, cols, Tq, Tk, causal):
    v = (cols[None, :] < Tk) & (rows[:, None] < Tq)
    return v & (cols[None, :] <= rows[:, None] + Tk - Tq) if causal else v


def _probs(x, vis):
    with np.errstate(over="ignore"):  # masked-out entries may overflow; they are dropped
        return np.where(vis, np.exp2(x), 0)


def tiled_attention(q, k, v, do, causal, scale, fwd_tiles, kv_tiles, q_tiles):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group, sl2 = H // Hkv, scale * fa.LOG2E

    def pad(x, n):  # rows past the end read as zeros, like the shared tiles
        return np.concatenate([x, np.zeros((n, x.shape[1]))])

    o, lse = np.full(q.shape, np.nan), np.full((B, H, Tq), np.nan)
    dq, dk, dv = np.full(q.shape, np.nan), np.full(k.shape, np.nan), np.full(v.shape, np.nan)
    for b in range(B):
        for h in range(H):  # forward: one block per (b, h, query tile)
            BR, BC = fwd_tiles
            qh = pad(q[b, h], BR)
            kh, vh = pad(k[b, h // group], BC), pad(v[b, h // group], BC)
            for q0 in range(0, Tq, BR):
                rows = np.arange(q0, q0 + BR)
                n_kt = visible_key_tiles(q0, BR, BC, Tq, Tk, causal)
                m, l, acc = np.full(BR, -np.inf), np.zeros(BR), np.zeros((BR, D))
                for kt in range(-(-Tk // BC)):
                    cols = np.arange(kt * BC, kt * BC + BC)
                    vis = _visible(rows, cols, Tq, Tk, causal)
                    if kt >= n_kt:
                        assert not vis.any(), "a skipped key tile holds visible keys"
                        continue
                    s = np.where(vis, qh[rows] @ kh[cols].T * sl2, -np.inf)
                    m_new = np.maximum(m, s.max(axis=1))
                    m_use = np.where(m_new == -np.inf, 0, m_new)
                    alpha = np.exp2(m - m_use)
                    p = np.exp2(s - m_use[:, None])
                    l = l * alpha + p.sum(axis=1)
                    acc = acc * alpha[:, None] + p @ vh[cols]
                    m = m_new
                ok = rows < Tq
                safe = np.where(l > 0, l, 1)
                o[b, h, rows[ok]] = np.where(l[:, None] > 0, acc / safe[:, None], 0)[ok]
                lse_rows = np.where(l > 0, (m + np.log2(safe)) * math.log(2), -np.inf)
                lse[b, h, rows[ok]] = lse_rows[ok]
    delta = (o * do).sum(axis=-1)
    L2 = np.where(np.isneginf(lse), np.inf, lse * fa.LOG2E)
    for b in range(B):
        for hk in range(Hkv):  # dk, dv: one block per (b, kv head, key tile)
            BR, BC = kv_tiles
            kh, vh = pad(k[b, hk], BC), pad(v[b, hk], BC)
            for k0 in range(0, Tk, BC):
                cols = np.arange(k0, k0 + BC)
                dka, dva = np.zeros((BC, D)), np.zeros((BC, D))
                first = first_query_tile(k0, BR, Tq, Tk, causal)
                for h in range(hk * group, (hk + 1) * group):
                    qh, doh = pad(q[b, h], BR), pad(do[b, h], BR)
                    Lh, dh = np.append(L2[b, h], [np.inf] * BR), np.append(delta[b, h], [0] * BR)
                    for qt in range(-(-Tq // BR)):
                        rows = np.arange(qt * BR, qt * BR + BR)
                        vis = _visible(rows, cols, Tq, Tk, causal)
                        if qt < first:
                            assert not vis.any(), "a skipped query tile sees these keys"
                            continue
                        p = _probs(qh[rows] @ kh[cols].T * sl2 - Lh[rows, None], vis)
                        ds = p * (doh[rows] @ vh[cols].T - dh[rows, None])
                        dva += p.T @ doh[rows]
                        dka += ds.T @ qh[rows]
                ok = cols < Tk
                dk[b, hk, cols[ok]], dv[b, hk, cols[ok]] = (dka * scale)[ok], dva[ok]
        for h in range(H):  # dq: one block per (b, h, query tile)
            BR, BC = q_tiles
            qh, doh = pad(q[b, h], BR), pad(do[b, h], BR)
            kh, vh = pad(k[b, h // group], BC), pad(v[b, h // group], BC)
            Lh, dh = np.append(L2[b, h], [np.inf] * BR), np.append(delta[b, h], [0] * BR)
            for q0 in range(0, Tq, BR):
                rows = np.arange(q0, q0 + BR)
                acc = np.zeros((BR, D))
                for kt in range(visible_key_tiles(q0, BR, BC, Tq, Tk, causal)):
                    cols = np.arange(kt * BC, kt * BC + BC)
                    vis = _visible(rows, cols, Tq, Tk, causal)
                    p = _probs(qh[rows] @ kh[cols].T * sl2 - Lh[rows, None], vis)
                    acc += (p * (doh[rows] @ vh[cols].T - dh[rows, None])) @ kh[cols]
                ok = rows < Tq
                dq[b, h, rows[ok]] = (acc * scale)[ok]
    return o, lse, dq, dk, dv


TILINGS = [((64, 64), (64, 64), (64, 64)), ((64, 32), (32, 32), (64, 32)),
           ((16, 48), (32, 16), (16, 16)), ((64, 64), (32, 64), (64, 64)),
           ((128, 64), (64, 64), (64, 64)), ((128, 32), (32, 64), (64, 32))]  # v2's


@pytest.mark.parametrize("tiles", TILINGS, ids=str)
@pytest.mark.parametrize("T", [(1, 1), (17, 17), (64, 64), (100, 100), (17, 70), (70, 17)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_algorithm_matches_reference(tiles, T, causal):
    Tq, Tk = T
    q, k, v, do = random_qkv(1, 4, 2, Tq, Tk, 8, seed=Tq * 131 + Tk)
    got = tiled_attention(q, k, v, do, causal, 0.3, *tiles)
    want = fa.attention_reference(np, q, k, v, causal, 0.3)
    want += fa.attention_reference_backward(np, q, k, v, do, causal, 0.3)
    for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        assert rel_err(g, w) < 1e-12, name


# =========================================================================== the kernels on the CPU
# tests/flash_attention_emu.cpp compiles flash_attention.cu for the host (one binary per
# module, the launcher's -D flags) and runs fwd, pre, dkdv and dq on the given inputs.


def build_emulator(source, dtype, d, ldmatrix, exe):
    """Compile tests/flash_attention_emu.cpp around the kernel file `source` (the module
    for dtype and head dim d, the launcher's -D flags) into `exe`."""
    cmd = [shutil.which("g++"), "-O1", "-w", *fa.compile_options(dtype, d, ldmatrix),
           "-DFA_HOST_EMULATION", f'-DFA_CU_PATH="{source}"', str(HERE / "flash_attention_emu.cpp"),
           "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"building the emulator failed:\n{r.stdout}{r.stderr}"
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    out = tmp_path_factory.mktemp("fa_emu")
    built, lock = {}, threading.Lock()  # tests may run emulators from several threads

    def get(dtype, d, ldmatrix):
        with lock:
            if (dtype, d, ldmatrix) not in built:
                exe = out / f"emu_{dtype}_{d}_{int(ldmatrix)}"
                built[(dtype, d, ldmatrix)] = build_emulator(fa.SOURCE_PATH, dtype, d, ldmatrix, exe)
            return built[(dtype, d, ldmatrix)]

    return get, out


def _host_cast(x, dtype):
    """(raw array in the kernel's storage, its exact float64 values)."""
    if dtype == "bfloat16":
        bits = fa.to_bf16_bits(np, x)
        return bits, fa.from_bf16_bits(np, bits).astype(np.float64)
    raw = x.astype(dtype)
    return raw, raw.astype(np.float64)


def emulate(emulator, dtype, impl, shape, causal, host, order="forward", ldmatrix=True,
            variant="v1", cpasync="late", scale=None):
    """Run the four kernels of kernel_plan(...) in the emulator on the float64 inputs
    `host` = (q, k, v, do), rounded to dtype. Returns ({o, lse, dq, dk, dv} as float64,
    the rounded inputs as float64, scale)."""
    get, out = emulator
    B, H, Hkv, Tq, Tk, D = shape
    exe = get(dtype, D, ldmatrix)
    raws, exact = zip(*(_host_cast(x, dtype) for x in host))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    plan = fa.kernel_plan(impl, dtype, D, scale, variant)
    tag = f"{Path(exe).name}_{os.getpid()}_{next(_emu_runs)}"
    inp, res = out / f"in_{tag}.bin", out / f"out_{tag}.bin"
    inp.write_bytes(b"".join(np.ascontiguousarray(r).tobytes() for r in raws))
    args = [str(exe), B, H, Hkv, Tq, Tk, int(causal), repr(scale)]
    for step in ("fwd", "pre", "dkdv", "dq"):
        args += [plan[step], *fa.launch_shape(plan[step], D)]
    args += [str(inp), str(res)]
    env = dict(os.environ, FA_EMU_ORDER=order, FA_EMU_CPASYNC=cpasync)
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"emulated kernels {plan} failed:\n{r.stdout}{r.stderr}"
    buf = res.read_bytes()
    inp.unlink()
    res.unlink()
    store = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    nq, nk, nr = B * H * Tq * D, B * Hkv * Tk * D, B * H * Tq
    outs, off = [], 0
    for n, shp in ((nq, (B, H, Tq, D)), (nq, (B, H, Tq, D)), (nk, (B, Hkv, Tk, D)),
                   (nk, (B, Hkv, Tk, D))):
        a = np.frombuffer(buf, store, n, off)
        off += n * np.dtype(store).itemsize
        outs.append((fa.from_bf16_bits(np, a) if dtype == "bfloat16" else a)
                    .astype(np.float64).reshape(shp))
    lse = np.frombuffer(buf, np.float32, nr, off).astype(np.float64).reshape(B, H, Tq)
    o, dq, dk, dv = outs
    return dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv), exact, scale


_emu_runs = iter(range(10**9))


def run_emulated(emulator, dtype, impl, shape, causal, order="forward", ldmatrix=True, seed=0,
                 variant="v1", cpasync="late", scale=None):
    B, H, Hkv, Tq, Tk, D = shape
    host = random_qkv(B, H, Hkv, Tq, Tk, D, seed)
    got, exact, scale = emulate(emulator, dtype, impl, shape, causal, host, order, ldmatrix,
                                variant, cpasync, scale)
    q, k, v, do = exact
    ref = fa.attention_reference(np, q, k, v, causal, scale)
    ref += fa.attention_reference_backward(np, q, k, v, do, causal, scale)
    return {name: (got[name], r) for name, r in zip(("o", "lse", "dq", "dk", "dv"), ref)}


EMU_CASES = [  # (impl, variant, dtype, (B, H, Hkv, Tq, Tk, D), causal, order[, options])
    ("simt", "v1", "float32", (2, 2, 1, 17, 17, 32), True, "forward"),
    ("simt", "v1", "float32", (1, 2, 2, 100, 100, 64), True, "reverse"),
    ("simt", "v1", "float32", (1, 2, 2, 17, 70, 128), False, "forward"),
    ("simt", "v1", "float32", (1, 2, 1, 70, 17, 128), True, "reverse"),  # rows that see nothing
    ("simt", "v1", "float32", (1, 1, 1, 1, 1, 64), True, "forward"),
    ("simt", "v1", "float16", (1, 2, 1, 70, 70, 32), True, "reverse"),
    ("simt", "v1", "bfloat16", (1, 2, 2, 100, 100, 128), True, "forward"),
    ("mma", "v1", "float16", (1, 2, 1, 70, 70, 32), True, "forward"),
    ("mma", "v1", "float16", (1, 2, 2, 17, 100, 64), False, "reverse"),
    ("mma", "v1", "float16", (1, 2, 1, 70, 17, 128), True, "forward"),
    ("mma", "v1", "bfloat16", (2, 2, 2, 100, 100, 64), True, "reverse"),
    ("mma", "v1", "bfloat16", (1, 4, 2, 33, 33, 128), False, "forward"),
    ("mma", "v1", "bfloat16", (1, 2, 1, 1, 1, 32), True, "reverse"),
    ("mma", "v1", "float16", (1, 2, 1, 70, 70, 64), True, "reverse", {"ldmatrix": False}),
    ("mma", "v1", "bfloat16", (1, 2, 2, 33, 70, 128), False, "forward", {"ldmatrix": False}),
    # v2: cp.async modelled at its most adversarial (late: NaN until the copier waits),
    # warps in both orders; a 128-row forward tile plus a partial one (T = 130 ... 257);
    # GQA groups whose dk/dv work items cross query heads; rows that see nothing
    # (n_kt = 0 in the forward and dq: Tq - Tk >= 128); KV-cache shapes; one query
    ("mma", "v2", "float16", (1, 2, 1, 130, 130, 32), True, "forward"),
    ("mma", "v2", "float16", (1, 4, 2, 100, 100, 64), True, "reverse"),
    ("mma", "v2", "float16", (1, 2, 2, 17, 150, 64), False, "forward"),
    ("mma", "v2", "float16", (1, 2, 1, 200, 17, 64), True, "reverse"),
    ("mma", "v2", "float16", (1, 2, 1, 70, 140, 128), True, "forward"),
    ("mma", "v2", "bfloat16", (1, 4, 1, 97, 97, 128), True, "reverse"),
    ("mma", "v2", "bfloat16", (2, 2, 2, 130, 70, 64), False, "forward"),
    ("mma", "v2", "bfloat16", (1, 2, 1, 1, 1, 32), True, "reverse"),
    ("mma", "v2", "bfloat16", (1, 2, 1, 200, 30, 128), True, "forward"),
    ("mma", "v2", "float16", (1, 2, 2, 64, 64, 32), True, "reverse"),
    # v2 with cp.async copying at issue, with plain shared loads, and with scale <= 0
    # (the v1 forward, then the v2 backward)
    ("mma", "v2", "float16", (1, 2, 1, 130, 100, 64), True, "forward", {"cpasync": "early"}),
    ("mma", "v2", "bfloat16", (1, 2, 2, 70, 70, 128), True, "reverse", {"cpasync": "early"}),
    ("mma", "v2", "float16", (1, 2, 1, 100, 100, 64), True, "reverse", {"ldmatrix": False}),
    ("mma", "v2", "bfloat16", (1, 2, 2, 33, 70, 128), False, "forward", {"ldmatrix": False}),
    ("mma", "v2", "float16", (1, 2, 1, 70, 70, 64), True, "forward", {"scale": -0.3}),
    ("mma", "v2", "bfloat16", (1, 2, 1, 40, 70, 32), True, "reverse", {"scale": 0.0}),
    # v2 SIMT backward (lse2; its own tiles at d=128)
    ("simt", "v2", "float32", (1, 4, 2, 100, 100, 128), True, "forward"),
    ("simt", "v2", "float32", (1, 2, 1, 70, 17, 128), True, "reverse"),
    ("simt", "v2", "float32", (1, 2, 2, 17, 130, 64), False, "forward"),
    ("simt", "v2", "float32", (2, 2, 1, 33, 33, 32), True, "reverse"),
    ("simt", "v2", "bfloat16", (1, 2, 1, 70, 70, 128), True, "forward"),
]


def _emu_id(c):
    opts = c[6] if len(c) > 6 else {}
    extra = "".join(f"-{k}={v}" for k, v in opts.items())
    return (f"{c[0]}-{c[1]}-{c[2]}-{'x'.join(map(str, c[3]))}-{'causal' if c[4] else 'full'}-"
            f"{c[5]}{extra}")


@pytest.mark.parametrize("case", EMU_CASES, ids=[_emu_id(c) for c in EMU_CASES])
def test_kernels_emulated_on_cpu(emulator, case):
    impl, variant, dtype, shape, causal, order = case[:6]
    opts = case[6] if len(case) > 6 else {}
    results = run_emulated(emulator, dtype, impl, shape, causal, order, variant=variant, **opts)
    for name, (got, want) in results.items():
        err = rel_err(got, want)
        assert err < TOL[dtype], f"{name}: relative error {err:.3g}"


def test_kernel_plan_variants(monkeypatch):
    """Which kernels a call runs: by default (DEFAULT_VARIANT) v2 tensor-core kernels
    (scale > 0 for the forward), v1 on request (argument or TINYLM_FA_VARIANT); SIMT
    v2 is a backward only."""
    monkeypatch.delenv("TINYLM_FA_VARIANT", raising=False)
    v2 = {"fwd": "fa_fwd_mma2", "pre": "fa_bwd_pre2", "dkdv": "fa_bwd_dkdv_mma2",
          "dq": "fa_bwd_dq_mma2"}
    v1 = {"fwd": "fa_fwd_mma", "pre": "fa_bwd_pre", "dkdv": "fa_bwd_dkdv_mma",
          "dq": "fa_bwd_dq_mma"}
    assert fa.DEFAULT_VARIANT["mma"] == "v2"
    assert fa.kernel_plan("mma", "float16", 64, 0.125) == v2
    assert fa.kernel_plan("mma", "bfloat16", 128, 0.1, "v1") == v1
    assert fa.kernel_plan("mma", "float16", 64, -0.5)["fwd"] == "fa_fwd_mma"
    assert fa.kernel_plan("mma", "float16", 64, 0.0) == dict(v2, fwd="fa_fwd_mma")
    assert fa.kernel_plan("mma", "float16", 64, 1e-46)["fwd"] == "fa_fwd_mma"  # 0 in float32
    simt = {"fwd": "fa_fwd_simt", "pre": "fa_bwd_pre", "dkdv": "fa_bwd_dkdv_simt",
            "dq": "fa_bwd_dq_simt"}
    assert fa.kernel_plan("simt", "float32", 64, 0.125, "v1") == simt
    assert fa.kernel_plan("simt", "float32", 64, 0.125, "v2") == {
        "fwd": "fa_fwd_simt", "pre": "fa_bwd_pre2", "dkdv": "fa_bwd_dkdv_simt2",
        "dq": "fa_bwd_dq_simt2"}
    monkeypatch.setenv("TINYLM_FA_VARIANT", "v1")
    assert fa.kernel_plan("mma", "float16", 64, 0.125) == v1
    assert fa.kernel_plan("mma", "float16", 64, 0.125, "v2") == v2  # the argument wins
    monkeypatch.setenv("TINYLM_FA_VARIANT", "v3")
    with pytest.raises(TinyLMError, match="TINYLM_FA_VARIANT"):
        fa.kernel_plan("mma", "float16", 64, 0.125)
    with pytest.raises(TinyLMError, match="variant"):
        fa.kernel_plan("mma", "float16", 64, 0.125, "fast")
    for dtype, d in MODULES:  # every kernel of a plan is in its module, with a launch shape
        for impl in (("simt",) if dtype == "float32" else ("simt", "mma")):
            for variant in ("v1", "v2"):
                for name in fa.kernel_plan(impl, dtype, d, 0.1, variant).values():
                    assert name in fa.kernel_names(dtype)
                    fa.launch_shape(name, d)


# =========================================================================== on the GPU


@pytest.fixture
def cp(monkeypatch):
    cupy = pytest.importorskip("cupy")
    monkeypatch.setenv("TINYLM_POISON", "1")  # outputs start as NaN: all must be written
    return cupy


def _device(cp, host, dtype):
    """(device arrays in `dtype`, their exact float64 values, bf16_bits flag)."""
    if dtype == "bfloat16":
        try:
            import ml_dtypes

            dev = [cp.asarray(h.astype(ml_dtypes.bfloat16)) for h in host]
            return dev, [cp.asnumpy(d).astype(np.float64) for d in dev], False
        except Exception:  # no bfloat16 in this CuPy (or no ml_dtypes): raw bits
            dev = [cp.asarray(fa.to_bf16_bits(np, h)) for h in host]
            return dev, [fa.from_bf16_bits(np, cp.asnumpy(d)).astype(np.float64) for d in dev], True
    dev = [cp.asarray(h.astype(dtype)) for h in host]
    return dev, [cp.asnumpy(d).astype(np.float64) for d in dev], False


def _host(cp, a, bits):
    return fa.from_bf16_bits(np, cp.asnumpy(a)).astype(np.float64) if bits else \
        cp.asnumpy(a).astype(np.float64)


def run_gpu(cp, impl, dtype, shape, causal, seed, scale=None, variant=None):
    B, H, Hkv, Tq, Tk, D = shape
    (q, k, v, do), exact, bits = _device(cp, random_qkv(B, H, Hkv, Tq, Tk, D, seed), dtype)
    kw = dict(impl=impl, bf16_bits=bits, variant=variant)
    o, lse = fa.flash_attention_forward(q, k, v, causal, scale, **kw)
    dq, dk, dv = fa.flash_attention_backward(q, k, v, o, lse, do, causal, scale, **kw)
    cp.cuda.runtime.deviceSynchronize()  # surfaces asynchronous launch errors here
    got = [_host(cp, a, bits) for a in (o,)] + [cp.asnumpy(lse).astype(np.float64)] + \
        [_host(cp, a, bits) for a in (dq, dk, dv)]
    qx, kx, vx, dox = exact
    want = fa.attention_reference(np, qx, kx, vx, causal, scale)
    want += fa.attention_reference_backward(np, qx, kx, vx, dox, causal, scale)
    return dict(zip(("o", "lse", "dq", "dk", "dv"), zip(got, want))), (o, lse, dq, dk, dv)


def _check(results, dtype):
    errs = {name: rel_err(g, w) for name, (g, w) in results.items()}
    bad = {n: e for n, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]}: {bad} (all: {errs})"


_seed = [100]


def fresh_seed():
    _seed[0] += 1
    return _seed[0]


def _cid(c):
    return "-".join(c)


# The tensor-core v2 on every length (130: one full 128-row forward tile and a partial
# one), masked and not; SIMT v2 on three; v1 (verified on an H200, unchanged since) on
# two, causal only.
MATCH_CASES = [
    (c, T, causal) for c in CONFIGS
    for T in {"mma": (1, 17, 64, 100, 130, 257), "simt": (17, 100, 257)}[c[0]]
    if c[2] == "v2" or T in (17, 257)
    for causal in ((False, True) if c[2] == "v2" else (True,))]


@pytest.mark.gpu
@pytest.mark.parametrize("config,T,causal", MATCH_CASES,
                         ids=[f"{_cid(c)}-T{T}-{'causal' if k else 'full'}"
                              for c, T, k in MATCH_CASES])
@pytest.mark.parametrize("D", fa.HEAD_DIMS)
def test_gpu_matches_float64_reference(cp, config, T, D, causal):
    impl, dtype, variant = config
    results, _ = run_gpu(cp, impl, dtype, (2, 3, 3, T, T, D), causal, fresh_seed(),
                         variant=variant)
    _check(results, dtype)


GQA_SHAPES = [(2, 4, 2, 100, 100, 64), (1, 8, 1, 65, 65, 128), (2, 4, 2, 17, 100, 32),
              (1, 4, 4, 100, 17, 64), (1, 2, 1, 1, 300, 64),
              (1, 2, 1, 200, 17, 64), (1, 4, 2, 130, 300, 128)]  # rows that see nothing; KV cache
GQA_CASES = [(c, shape, causal) for c in CONFIGS for shape in GQA_SHAPES
             for causal in ((False, True) if c[0] == "mma" and c[2] == "v2" else (True,))]


@pytest.mark.gpu
@pytest.mark.parametrize("config,shape,causal", GQA_CASES,
                         ids=[f"{_cid(c)}-{s}-{'causal' if k else 'full'}"
                              for c, s, k in GQA_CASES])
def test_gpu_gqa_and_unequal_lengths(cp, config, shape, causal):
    impl, dtype, variant = config
    results, _ = run_gpu(cp, impl, dtype, shape, causal, fresh_seed(), scale=0.3, variant=variant)
    _check(results, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D", [("float16", 64), ("bfloat16", 128)])
@pytest.mark.parametrize("T", [(100, 100), (33, 70), (70, 33)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_mma_plain_load_fallback(cp, monkeypatch, dtype, D, T, causal):
    """TINYLM_FA_LDMATRIX=0 builds the tensor-core kernels with plain shared loads: if
    the ldmatrix path ever fails on a device, this one tells whether the rest holds.
    (v2 here: the v1 kernels passed this on an H200.)"""
    monkeypatch.setenv("TINYLM_FA_LDMATRIX", "0")
    results, _ = run_gpu(cp, "mma", dtype, (2, 4, 2, *T, D), causal, fresh_seed(), variant="v2")
    _check(results, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_gpu_v2_nonpositive_scale(cp, dtype, scale):
    """scale <= 0: the plan runs the v1 forward (the v2 one needs scale > 0), then the
    v2 backward."""
    assert fa.kernel_plan("mma", dtype, 64, scale, "v2")["fwd"] == "fa_fwd_mma"
    results, _ = run_gpu(cp, "mma", dtype, (1, 4, 2, 100, 100, 64), True, fresh_seed(),
                         scale=scale, variant="v2")
    _check(results, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=[_cid(c) for c in CONFIGS])
def test_gpu_is_deterministic(cp, config):
    impl, dtype, variant = config
    shape, seed = (2, 4, 2, 257, 257, 64), fresh_seed()
    _, first = run_gpu(cp, impl, dtype, shape, True, seed, variant=variant)
    _, second = run_gpu(cp, impl, dtype, shape, True, seed, variant=variant)
    for a, b in zip(first, second):
        assert cp.asnumpy(a).tobytes() == cp.asnumpy(b).tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("impl,dtype,variant", [("simt", "float32", "v1"), ("mma", "float16", "v1"),
                                                ("mma", "float16", None)])
def test_gpu_function_is_differentiable(cp, monkeypatch, impl, dtype, variant):
    monkeypatch.delenv("TINYLM_FA_VARIANT", raising=False)  # None: the default, v2 for mma
    B, H, Hkv, T, D = 2, 4, 2, 100, 64
    (q, k, v, w), exact, _ = _device(cp, random_qkv(B, H, Hkv, T, T, D, fresh_seed()), dtype)
    tq, tk, tv = (Tensor(a, requires_grad=True) for a in (q, k, v))
    y = fa.FlashAttention.apply(tq, tk, tv, causal=True, impl=impl, variant=variant)
    y.backward(w)
    qx, kx, vx, wx = exact
    want = [fa.attention_reference(np, qx, kx, vx, True)[0]]
    want += fa.attention_reference_backward(np, qx, kx, vx, wx, True)
    for name, got, ref in zip(("o", "dq", "dk", "dv"), (y.data, tq.grad, tk.grad, tv.grad), want):
        assert rel_err(cp.asnumpy(got).astype(np.float64), ref) < TOL[dtype], name


@pytest.mark.gpu
def test_gpu_input_checks(cp):
    (q, k, v), _, _ = _device(cp, random_qkv(1, 4, 2, 8, 8, 64, 0)[:3], "float32")
    with pytest.raises(ShapeError, match="head dim"):
        fa.flash_attention_forward(q[..., :48].copy(), k[..., :48].copy(), v[..., :48].copy())
    with pytest.raises(ShapeError, match="contiguous"):
        fa.flash_attention_forward(q.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2), k, v)
    with pytest.raises(ShapeError, match="share"):
        fa.flash_attention_forward(q[:, :3].copy(), k, v)
    with pytest.raises(TinyLMError, match="dtype"):
        fa.flash_attention_forward(q, k.astype(cp.float16), v)
    with pytest.raises(TinyLMError, match="mma"):
        fa.flash_attention_forward(q, k, v, impl="mma")
    with pytest.raises(TinyLMError, match="supports"):
        fa.flash_attention_forward(q.astype(cp.float64), k.astype(cp.float64), v.astype(cp.float64))
    with pytest.raises(TinyLMError, match="variant"):
        fa.flash_attention_forward(q, k, v, variant="v9")
    with pytest.raises(ShapeError, match="lse"):
        o, lse = fa.flash_attention_forward(q, k, v)
        fa.flash_attention_backward(q, k, v, o, lse[:, :1].copy(), o)


# =========================================================================== boundaries (issue 21)
# The same tests on two backends: the CPU emulator, and the GPU (cupy; `pytest -m gpu`).
# For every kernel family and variant:
#   - a boundary sweep of the causal tile skipping: Tk - Tq in {-1, 0, 1, BR-1, BR, BR+1}
#     (BR: the query tile of dk/dv), Tq and Tk = 0, 1 and -1 mod every tile size, GQA
#     ratios 1 to 3, plus one unmasked shape;
#   - spike visibility: v = 0 but for key j0 and dO = 0 but for row i0, so exactly the
#     rows that may see key j0 have o != 0, and exactly the keys row i0 may see have
#     dK, dV != 0 (every other element exactly 0);
#   - each output checked row by row (max error over a row / that row's largest value)
#     against a float64 reference that rounds P and dS to the input dtype where the
#     tensor-core kernels do (and o to its storage dtype before delta), so the
#     tolerance is near the dtype's rounding: a dropped or extra (row, key) pair moves
#     some row by far more. tests/test_fa_mutations.py plants two off-by-one bugs in the
#     tile skipping and checks that these tests catch them.

ROW_TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 8e-3}
LSE_TOL = 1e-4  # absolute, natural-log units (lse is float32 in every kernel)
FAMILIES = [("simt", "v1"), ("simt", "v2"), ("mma", "v1"), ("mma", "v2")]


def round_to(dtype):
    """float64 -> the value the kernel would store in `dtype` (from float32, RNE)."""
    if dtype == "float32":
        return lambda x: x.astype(np.float32).astype(np.float64)
    if dtype == "float16":
        return lambda x: x.astype(np.float32).astype(np.float16).astype(np.float64)
    return lambda x: fa.from_bf16_bits(np, fa.to_bf16_bits(np, x.astype(np.float32))).astype(np.float64)


def rounding_reference(q, k, v, do, causal, scale, dtype, impl, fwd_bc):
    """Forward and backward in float64 with the tensor-core kernels' roundings: in the
    forward P = exp2(x - running max) over key tiles of fwd_bc, rounded to dtype before
    P V (the sum l is of unrounded P); in the backward P = exp2(x - lse2) and
    dS = P (dP - delta), both rounded before their products; delta from o as stored.
    impl "simt" rounds nothing but o (its tiles hold float32)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = H // Hkv
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    rnd = round_to(dtype) if impl == "mma" else (lambda x: x)
    vis = np.ones((Tq, Tk), bool)
    if causal:
        vis = np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)
    x = np.where(vis, q @ kk.swapaxes(-1, -2) * scale * fa.LOG2E, -np.inf)
    m = np.full((B, H, Tq), -np.inf)
    l, acc = np.zeros((B, H, Tq)), np.zeros(q.shape)
    for c0 in range(0, Tk, fwd_bc):
        xt = x[..., c0:c0 + fwd_bc]
        m_new = np.maximum(m, xt.max(-1))
        mu = np.where(m_new == -np.inf, 0, m_new)
        alpha = np.exp2(m - mu)
        p = np.exp2(xt - mu[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + rnd(p) @ vv[..., c0:c0 + fwd_bc, :]
        m = m_new
    seen = l > 0
    o = np.where(seen[..., None], acc / np.where(seen, l, 1)[..., None], 0)
    lse = np.where(seen, (m + np.log2(np.where(seen, l, 1))) * math.log(2), -np.inf)
    delta = (round_to(dtype)(o) * do).sum(-1)
    L2 = np.where(seen, lse * fa.LOG2E, np.inf)
    p = np.where(vis, np.exp2(x - L2[..., None]), 0)
    dp = do @ vv.swapaxes(-1, -2)
    ds = p * (dp - delta[..., None])
    ds_mag = p * (np.abs(dp) + np.abs(delta)[..., None])  # before the cancellation

    def kv_sum(a):
        return a.reshape(B, Hkv, g, Tk, D).sum(2)

    want = dict(o=o, lse=lse, dq=scale * rnd(ds) @ kk,
                dk=kv_sum(scale * rnd(ds).swapaxes(-1, -2) @ q),
                dv=kv_sum(rnd(p).swapaxes(-1, -2) @ do))
    # the size of each output's terms (absolute values): the scale its rounding errors have
    mag = dict(o=p @ np.abs(vv), dq=scale * ds_mag @ np.abs(kk),
               dk=kv_sum(scale * ds_mag.swapaxes(-1, -2) @ np.abs(q)),
               dv=kv_sum(p.swapaxes(-1, -2) @ np.abs(do)))
    return want, mag


def row_error(got, want, mag) -> float:
    """max over rows (last axis) of max |got - want| / max |want| in that row, where a row
    whose result cancels to below 5 % of its terms' size (mag) is measured against that."""
    g = np.asarray(got, np.float64).reshape(-1, want.shape[-1])
    w = want.reshape(-1, want.shape[-1])
    if not np.isfinite(g).all():
        return math.inf
    den = np.maximum(np.abs(w).max(1), 0.05 * mag.reshape(w.shape).max(1))
    err = np.abs(g - w).max(1)
    return float(np.where(den > 0, err / np.where(den > 0, den, 1), np.where(err > 0, math.inf, 0))
                 .max(initial=0.0))


def lse_error(got, want) -> float:
    if np.isnan(got).any() or not np.array_equal(np.isneginf(got), np.isneginf(want)):
        return math.inf
    fin = np.isfinite(want)
    return float(np.abs(got[fin] - want[fin]).max(initial=0.0))


def check_rows(got, exact, causal, scale, dtype, impl, plan, D):
    q, k, v, do = exact
    want, mag = rounding_reference(q, k, v, do, causal, scale, dtype, impl,
                                   fa.tile_shape(plan["fwd"], D)[1])
    errs = {n: row_error(got[n], want[n], mag[n]) for n in ("o", "dq", "dk", "dv")}
    bad = {n: e for n, e in errs.items() if not e < ROW_TOL[dtype]}
    e_lse = lse_error(got["lse"], want["lse"])
    if not e_lse < LSE_TOL:
        bad["lse"] = e_lse
    assert not bad, f"row-wise errors over {ROW_TOL[dtype]} (lse {LSE_TOL}): {bad} (all: {errs})"


def run_gpu_on(cp, dtype, impl, shape, causal, host, variant, scale):
    (q, k, v, do), exact, bits = _device(cp, host, dtype)
    kw = dict(impl=impl, bf16_bits=bits, variant=variant)
    o, lse = fa.flash_attention_forward(q, k, v, causal, scale, **kw)
    dq, dk, dv = fa.flash_attention_backward(q, k, v, o, lse, do, causal, scale, **kw)
    cp.cuda.runtime.deviceSynchronize()
    got = {n: _host(cp, a, bits) for n, a in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv))}
    got["lse"] = cp.asnumpy(lse).astype(np.float64)
    return got, exact


@pytest.fixture(params=["emu", pytest.param("cupy", marks=pytest.mark.gpu)])
def kernels(request):
    """(run, workers): run(dtype, impl, variant, shape, causal, host) -> (outputs, exact
    inputs, scale, plan) on the emulator or on the GPU, the same test body for both;
    workers: how many runs may go at once (emulator processes; 1 on the GPU)."""
    if request.param == "emu":
        emu = request.getfixturevalue("emulator")

        def run(dtype, impl, variant, shape, causal, host):
            got, exact, scale = emulate(emu, dtype, impl, shape, causal, host, variant=variant)
            return got, exact, scale, fa.kernel_plan(impl, dtype, shape[-1], scale, variant)
        return run, os.cpu_count() or 2
        cp = request.getfixturevalue("cp")

        def run(dtype, impl, variant, shape, causal, host):
            scale = 1.0 / math.sqrt(shape[-1])
            got, exact = run_gpu_on(cp, dtype, impl, shape, causal, host, variant, scale)
            return got, exact, scale, fa.kernel_plan(impl, dtype, shape[-1], scale, variant)
        return run, 1


def family_tiles(impl, variant, dtype, D):
    """(largest tile side of the plan, dk/dv's query tile BR)."""
    plan = fa.kernel_plan(impl, dtype, D, 1.0 / math.sqrt(D), variant)
    sides = [s for step in ("fwd", "dkdv", "dq") for s in fa.tile_shape(plan[step], D)]
    return max(sides), fa.tile_shape(plan["dkdv"], D)[0]


def sweep_shapes(impl, variant, dtype, D):
    """(H, Hkv, Tq, Tk, causal): every shift of {-1, 0, 1, BR-1, BR, BR+1}; with M the
    largest tile (every tile size divides it) Tq and Tk each land on 0, 1 and -1 mod M."""
    M, BR = family_tiles(impl, variant, dtype, D)
    pairs = [(M + 1, -1), (M - 1, 0), (M, 1), (M + 1, BR - 1), (M - 1, BR), (M, BR + 1)]
    heads = [(2, 1), (1, 1), (3, 1), (2, 2), (2, 1), (3, 3)]  # GQA ratios 2, 1, 3
    cases = [(h, hk, tq, tq + s, True) for (h, hk), (tq, s) in zip(heads, pairs)]
    return cases + [(2, 1, M + 1, M - 1, False)]


# (impl, variant, dtype, D, shapes): every family at D=32 (the cheapest module) and at
# D=128 (other tiles: BC = 32 in the forward and dq, BR = 32 in dk/dv), the v2
# tensor-core kernels at D=64 too (dk/dv's BR = 64 there, 32 at D=32); the 16-bit
# dtypes alternate. shapes: "all", or the indices of sweep_shapes to run.
SWEEP_FAMILIES = [("simt", "v1", "float32", 32, "all"), ("simt", "v2", "bfloat16", 32, "all"),
                  ("mma", "v1", "float16", 32, "all"), ("mma", "v2", "bfloat16", 32, "all"),
                  ("mma", "v2", "float16", 64, "all"),
                  ("simt", "v1", "float16", 128, "all"), ("simt", "v2", "float32", 128, "all"),
                  ("mma", "v1", "bfloat16", 128, "all"), ("mma", "v2", "float16", 128, "all")]


def _family_id(f):
    return f"{f[0]}-{f[1]}-{f[2]}-d{f[3]}"


def family_shapes(family):
    shapes = sweep_shapes(*family[:4])
    return shapes if family[4] == "all" else [shapes[i] for i in family[4]]


def sweep_case(run, family, shape, seed=7):
    impl, variant, dtype, D = family[:4]
    H, Hkv, Tq, Tk, causal = shape
    full = (1, H, Hkv, Tq, Tk, D)
    got, exact, scale, plan = run(dtype, impl, variant, full, causal,
                                  random_qkv(*full, seed))
    check_rows(got, exact, causal, scale, dtype, impl, plan, D)


def run_all(run, workers, fn, family, cases):
    """fn(run, family, case) for every case (emulator runs in parallel processes); one
    assertion that lists every failing case."""
    def one(case):
        try:
            fn(run, family, case)
            return None
        except AssertionError as e:
            return f"{case}: {str(e).splitlines()[0]}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        failures = [f for f in pool.map(one, cases) if f]
    assert not failures, f"{_family_id(family)}: {len(failures)} of {len(cases)} cases fail:\n" + \
        "\n".join(failures)


@pytest.mark.parametrize("family", SWEEP_FAMILIES, ids=_family_id)
def test_boundary_sweep(kernels, family):
    run, workers = kernels
    run_all(run, workers, sweep_case, family, family_shapes(family))


def spike_inputs(shape, i0, j0, seed):
    B, H, Hkv, Tq, Tk, D = shape
    q, k, _, _ = random_qkv(B, H, Hkv, Tq, Tk, D, seed)
    rng = np.random.default_rng(seed + 1)
    v, do = np.zeros((B, Hkv, Tk, D)), np.zeros((B, H, Tq, D))
    v[:, :, j0] = 30.0 * (1 + rng.random((B, Hkv, D)))
    do[:, :, i0] = 1 + rng.random((B, H, D))
    return 0.5 * q, k, v, do


def check_spike(got, shape, causal, i0, j0):
    B, H, Hkv, Tq, Tk, D = shape
    rows, cols = np.arange(Tq), np.arange(Tk)
    sees_j0 = (j0 <= rows + Tk - Tq) if causal else np.ones(Tq, bool)
    i0_sees = (cols <= i0 + Tk - Tq) if causal else np.ones(Tk, bool)
    nz = {n: np.abs(a).max(-1) > 0 for n, a in got.items() if n != "lse"}
    for b in range(B):
        for h in range(H):
            np.testing.assert_array_equal(nz["o"][b, h], sees_j0, err_msg=f"o rows that see key {j0}")
            want_dq = (rows == i0) & sees_j0[i0]
            np.testing.assert_array_equal(nz["dq"][b, h], want_dq, err_msg="dq rows")
        for hk in range(Hkv):
            np.testing.assert_array_equal(nz["dv"][b, hk], i0_sees, err_msg=f"dv keys row {i0} sees")
            np.testing.assert_array_equal(nz["dk"][b, hk], i0_sees & sees_j0[i0],
                                          err_msg=f"dk keys row {i0} sees")


def spike_cases(impl, variant, dtype, D):
    """(H, Hkv, Tq, Tk, causal, i0, j0): the last key starting a tile, seen only by the
    last row, itself the last row of a dk/dv query tile; an interior tile start; full."""
    M, BR = family_tiles(impl, variant, dtype, D)
    return [(2, 1, M, M + 1, True, M - 1, M), (3, 3, M + 1, M + 1, True, 64, 64),
            (2, 2, M - 1, M + BR + 1, True, M - 2, M + BR),
            (2, 1, M - 1, M + 1, False, 0, M)]


SPIKE_FAMILIES = [("simt", "v1", "float16", 32), ("simt", "v2", "float32", 32),
                  ("mma", "v1", "bfloat16", 32), ("mma", "v2", "float16", 32),
                  ("mma", "v2", "bfloat16", 32)]


def spike_case(run, family, case, seed=11):
    impl, variant, dtype, D = family[:4]
    H, Hkv, Tq, Tk, causal, i0, j0 = case
    full = (1, H, Hkv, Tq, Tk, D)
    got, exact, scale, plan = run(dtype, impl, variant, full, causal, spike_inputs(full, i0, j0, seed))
    check_spike(got, full, causal, i0, j0)
    check_rows(got, exact, causal, scale, dtype, impl, plan, D)


@pytest.mark.parametrize("family", SPIKE_FAMILIES, ids=_family_id)
def test_spike_visibility(kernels, family):
    run, workers = kernels
    run_all(run, workers, spike_case, family, spike_cases(*family))


@pytest.mark.parametrize("dtype,impl", [("float16", "mma"), ("bfloat16", "mma"), ("float16", "simt")])
@pytest.mark.parametrize("causal", [False, True])
def test_rounding_reference_is_the_reference_up_to_rounding(dtype, impl, causal):
    """Without its roundings (float32 "dtype") the rounding reference is the oracle; with
    them it moves by about the dtype's rounding, never more."""
    q, k, v, do = random_qkv(1, 4, 2, 37, 70, 8, seed=21)
    plain = fa.attention_reference(np, q, k, v, causal, 0.4)
    plain += fa.attention_reference_backward(np, q, k, v, do, causal, 0.4)
    exact, _ = rounding_reference(q, k, v, do, causal, 0.4, "float32", "simt", 16)
    rounded, mag = rounding_reference(q, k, v, do, causal, 0.4, dtype, impl, 16)
    eps = {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
    for name, want in zip(("o", "lse", "dq", "dk", "dv"), plain):
        np.testing.assert_allclose(exact[name], want, rtol=1e-5, atol=1e-6)
        if name != "lse":
            err = row_error(rounded[name], want, mag[name])
            assert err < 30 * eps and (err > eps / 100 or impl == "simt"), name
