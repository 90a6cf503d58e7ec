"""The dequantize-and-multiply CUDA kernels (tinylm/kernels/quant_matmul.cu) for Q8_0,
Q4_0, Q4_1, NF4 and NF4-DQ weights, and the GPU path of quantized layers and QLoRA.

Without a GPU:
  - nvcc compiles the module for sm_90 and ptxas assembles it: every entry point, no
    warning, no spill (skipped without nvcc);
  - the kernel source itself, compiled as C++ with tests/quant_emu.cpp (threads as
    fibers, tests/cuda_emu.h; outputs and shared memory start as NaN; warps in both
    orders), driven through the launcher's own grids and argument tuples
    (tinylm.kernels.quant_matmul with NumPy arrays standing in for CuPy ones), against
    float64 ``x @ W.T`` of the reference dequantization, on random packed bytes (every
    code value, subnormal and negative-zero scales) and ragged shapes; the row decoder
    bit for bit; mutated kernels must fail;
  - the dispatch (tinylm.quant.kernels.matmul / matmul_t -> the kernels), QuantLinear
    forward and backward, and QLoRA training steps of a small Llama with the kernels
    emulated: the losses and LoRA gradients of the NumPy path.
On a GPU (``pytest -m gpu``): the same products on CuPy arrays, and QLoRA steps on the
GPU against the CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kernel_helpers import assert_clean_build, nvcc_ptxas, nvcc_tools
from tinylm import backend
from tinylm.errors import TinyLMError
from tinylm.kernels import quant_matmul as qm
from tinylm.quant import kernels
from tinylm.quant.registry import get_format

HERE = Path(__file__).resolve().parent
F32 = np.float32
HEAD = {"q8_0": (34, 2), "q4_0": (18, 2), "q4_1": (20, 4)}  # block bytes, header bytes


# =========================================================================== weights


def random_packed(fmt, n_out, n_in, seed=0):
    """A ``Packed`` of random bytes: every code value, random finite half scales with
    some subnormal and negative-zero ones (nf4: random absmax; nf4-dq: quantized)."""
    rng = np.random.default_rng(seed)
    if fmt in HEAD:
        bb, head = HEAD[fmt]
        nb = n_in // 32
        raw = rng.integers(0, 256, (n_out, nb, bb), dtype=np.uint8)
        halves = (rng.standard_normal((n_out, nb, head // 2)) * 0.05).astype("<f2")
        flat = halves.reshape(-1)
        flat[::7] = np.float16(3e-6)   # subnormal halves
        flat[3::11] = np.float16(-0.0)
        raw[:, :, :head] = halves.view(np.uint8).reshape(n_out, nb, head)
        return kernels.check_packed(kernels.Packed(fmt, (n_out, n_in),
                                                   {"raw": raw.reshape(n_out, -1)}))
    if fmt == "nf4":
        codes = rng.integers(0, 256, (n_out, n_in // 2), dtype=np.uint8)
        absmax = (rng.random((n_out, n_in // 64)) * 2).astype(F32)
        return kernels.check_packed(kernels.Packed(fmt, (n_out, n_in),
                                                   {"codes": codes, "absmax": absmax}))
    w = rng.standard_normal((n_out, n_in)).astype(F32) * rng.random((n_out, 1)).astype(F32)
    return kernels.pack(fmt, get_format(fmt).quantize(w), (n_out, n_in))


def reference_weight(packed) -> np.ndarray:
    """The float32 weight by the format's own reference dequantizer (tinylm.quant's
    formats, checked against gguf / bitsandbytes elsewhere), not kernels.dequantize."""
    fmt = get_format(packed.fmt)
    return fmt.dequantize(kernels.to_raw(packed), packed.shape).astype(F32)


def assert_product(got, x, packed, transpose=False, rtol=2e-6):
    """got ~ x @ W.T (or x @ W) in float64, within rtol * (|x| @ |W|.T) elementwise
    (the float32 rounding bound of a sum of products in any order, with margin)."""
    w = reference_weight(packed).astype(np.float64)
    w = w.T if transpose else w
    x = np.asarray(x, np.float64)
    want, scale = x @ w.T, np.abs(x) @ np.abs(w).T
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    assert not np.isnan(got).any(), "NaN in the result: an element was not written"
    bad = np.abs(got - want) > rtol * scale * x.shape[1] ** 0.5 + 1e-30
    assert not bad.any(), (f"{bad.sum()} of {bad.size} off, worst "
                           f"{np.abs(got - want).max():.3g} (scale {scale.max():.3g})")


def test_the_numpy_reference_meets_the_bound():
    """The oracle's own check: tinylm.quant.kernels.matmul on the CPU within the bound."""
    for fmt in qm.FORMATS:
        p = random_packed(fmt, 37, 128, seed=1)
        x = np.random.default_rng(2).standard_normal((5, 128)).astype(F32)
        assert_product(kernels.matmul(x, p), x, p)
        g = np.random.default_rng(3).standard_normal((5, 37)).astype(F32)
        assert_product(kernels.matmul_t(g, p), g, p, transpose=True)


def test_the_bound_catches_a_wrong_weight():
    p = random_packed("q4_1", 37, 96, seed=1)
    x = np.random.default_rng(2).standard_normal((3, 96)).astype(F32)
    y = kernels.matmul(x, p)
    y[1, 5] += 1e-3 * np.abs(y).max()
    with pytest.raises(AssertionError):
        assert_product(y, x, p)


def test_the_kernels_layer_imports_nothing_from_quant():
    """Imports go down: tinylm.kernels sits below tinylm.quant (which calls it), so no
    kernel module imports tinylm.quant, at the top or inside a function."""
    import ast

    import tinylm.kernels

    for path in sorted(Path(tinylm.kernels.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "tinylm":
                names = [f"tinylm.{a.name}" for a in node.names]
            bad = [n for n in names if n == "tinylm.quant" or n.startswith("tinylm.quant.")]
            assert not bad, f"{path.name}:{node.lineno} imports {bad[0]}"


# =========================================================================== nvcc


def test_cuda_source_compiles_for_sm90(tmp_path):
    nvcc, ptxas = nvcc_tools()
    rc, log = nvcc_ptxas(nvcc, ptxas, qm.SOURCE_PATH, ["--ptx", "-arch=sm_90"], qm.OPTIONS,
                         tmp_path / "quant_matmul.ptx")
    names = [f"qm_{op}_{f}" for op in ("gemv", "gemm", "gemm_t", "rows")
             for f in qm.KERNEL_FORMATS]
    assert_clean_build(rc, log, names)
    assert log.count("0 bytes spill stores") == len(names), f"spills:\n{log}"


def test_launch_plans():
    assert qm.plan("gemv", 1, 64, 1) == ((1, 1, 1), 0)
    assert qm.plan("gemv", 17, 64, 3) == ((3, 1, 1), 0)
    assert qm.plan("gemv", 10**7, 64, 1)[0][0] == qm.GEMV_MAX_BLOCKS  # rows strided
    assert qm.plan("gemm", 65, 96, 64) == ((2, 1, 1), qm.GEMM_SMEM)
    assert qm.plan("gemm_t", 65, 96, 65) == ((2, 2, 1), qm.GEMM_SMEM)
    assert qm.plan("rows", 9, 32, 4) == ((4, 1, 1), 0)
    assert qm.GEMM_SMEM <= 48 * 1024  # no opt-in to more dynamic shared memory needed


# =========================================================================== the emulator


class Emulator:
    """quant_matmul._launch on the CPU: the launcher's arguments checked against the
    kernels' signatures, written to a file, run by the emulated kernel."""

    def __init__(self, exe, tmp, order="forward"):
        self.exe, self.tmp, self.order, self.calls = exe, tmp, order, []

    def __call__(self, name, like, grid, args, smem):
        op, fmt = next((op, name[len(f"qm_{op}_"):]) for op in ("gemv", "gemm_t", "gemm", "rows")
                       if name.startswith(f"qm_{op}_") and name[len(f"qm_{op}_"):]
                       in qm.KERNEL_FORMATS)
        if op == "rows":
            w, absmax, a, out, n_in, row_bytes = args
            n_out, n_tok = w.shape[0], a.size
            assert a.dtype == np.int64 and isinstance(n_in, np.int32)
        else:
            w, absmax, a, out, n_out, n_in, n_tok, row_bytes = args
            assert all(isinstance(v, np.int32) for v in (n_out, n_in, n_tok))
            assert a.dtype == F32 and a.shape == (int(n_tok), int(n_in if op != "gemm_t"
                                                                  else n_out))
        assert isinstance(row_bytes, np.int64) and w.dtype == np.uint8
        assert w.shape == (int(n_out), int(row_bytes)) and absmax.dtype == F32
        if fmt == "nf4":
            assert absmax.shape == (int(n_out), int(n_in) // 64)
        assert out.dtype == F32 and all(x.flags.c_contiguous for x in (w, absmax, a, out))
        tag = len(self.calls)
        inp, res = self.tmp / f"in_{tag}.bin", self.tmp / f"out_{tag}.bin"
        inp.write_bytes(w.tobytes() + (absmax.tobytes() if fmt == "nf4" else b"")
                        + a.tobytes())
        cmd = [str(self.exe), op, fmt, *map(str, grid[:2]), str(qm.THREADS), str(smem),
               str(int(n_out)), str(int(n_in)), str(int(n_tok)), str(int(row_bytes)),
               str(inp), str(res)]
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env=dict(os.environ, QM_EMU_ORDER=self.order))
        self.calls.append((name, grid, smem, r))
        if r.returncode:
            raise EmulationError(r.stderr)
        out[...] = np.frombuffer(res.read_bytes(), F32).reshape(out.shape)


class EmulationError(RuntimeError):
    pass


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not on PATH")
    out = tmp_path_factory.mktemp("qm_emu")
    built = {}

    def get(source=None):
        if source not in built:
            src = qm.SOURCE_PATH
            if source is not None:  # a mutated copy of the kernels
                src = out / f"mutant_{len(built)}.cu"
                src.write_text(source)
            exe = out / f"emu_{len(built)}"
            opt = "-O1" if source is None else "-O0"  # mutants: run small, build fast
            cmd = [gxx, "-std=c++17", opt, "-w", f"-DQM_THREADS={qm.THREADS}",
                   f'-DQM_CU_PATH="{src}"', str(HERE / "quant_emu.cpp"), "-o", str(exe)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, f"building the emulator failed:\n{r.stdout}{r.stderr}"
            built[source] = exe
        return built[source]

    return get, out


@pytest.fixture
def emulated(build, monkeypatch, tmp_path):
    """The launcher with its kernels emulated; outputs NaN-poisoned."""
    get, _ = build
    emu = Emulator(get(), tmp_path)
    monkeypatch.setattr(qm, "_launch", emu)
    monkeypatch.setenv("TINYLM_POISON", "1")
    return emu


def _n_in(fmt, n_in):
    return n_in if fmt not in ("nf4", "nf4-dq") else -(-n_in // 64) * 64


CASES = [  # n_out, n_in (rounded up to 64 for nf4), N
    (1, 64, 1), (37, 96, 3), (70, 192, 8),  # the GEMV: ragged rows, 3 and 6 blocks
    (70, 192, 9), (130, 96, 64),            # the GEMM: a partial k-tile, ragged tiles
]


@pytest.mark.parametrize("fmt", qm.FORMATS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matmul_emulated(emulated, fmt, case):
    n_out, n_in, n = case
    n_in = _n_in(fmt, n_in)
    p = random_packed(fmt, n_out, n_in, seed=n_out + n)
    x = np.random.default_rng(n).standard_normal((n, n_in)).astype(F32)
    y = qm.matmul(x, p)
    assert [c[0] for c in emulated.calls] == [
        f"qm_{'gemv' if n <= qm.GEMV_MAX_ROWS else 'gemm'}_{fmt.replace('-dq', '')}"]
    assert_product(y, x, p)


@pytest.mark.parametrize("fmt", qm.FORMATS)
@pytest.mark.parametrize("case", [(37, 96, 3), (130, 192, 65)], ids=lambda c: "x".join(map(str, c)))
def test_matmul_t_emulated(emulated, fmt, case):
    n_out, n_in, n = case
    n_in = _n_in(fmt, n_in)
    p = random_packed(fmt, n_out, n_in, seed=n_out)
    g = np.random.default_rng(n).standard_normal((n, n_out)).astype(F32)
    assert_product(qm.matmul_t(g, p), g, p, transpose=True)


@pytest.mark.parametrize("fmt", qm.FORMATS)
def test_rows_emulated_bit_for_bit(emulated, fmt):
    p = random_packed(fmt, 37, _n_in(fmt, 96), seed=4)
    ids = np.array([36, 0, 5, 5, 17])
    got = qm.dequantize_rows(p, ids)
    want = reference_weight(p)[ids]
    assert got.dtype == F32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_reverse_warp_order_gives_the_same_bits(build, monkeypatch, tmp_path):
    get, _ = build
    p = random_packed("q4_1", 70, 192, seed=5)
    x = np.random.default_rng(5).standard_normal((66, 192)).astype(F32)
    ys = []
    for order in ("forward", "reverse"):
        monkeypatch.setattr(qm, "_launch", Emulator(get(), tmp_path, order))
        ys.append(qm.matmul(x, p).tobytes() + qm.matmul(x[:3], p).tobytes()
                  + qm.matmul_t(x[:, :70].copy(), p).tobytes())
    assert ys[0] == ys[1]


def test_gemv_strides_over_rows_beyond_its_grid(emulated, monkeypatch):
    """Past GEMV_MAX_BLOCKS * 8 rows (a 49152-row LM head: 32768 rows a pass) each warp
    takes several rows; here with a grid of 2 blocks for 70 rows."""
    monkeypatch.setattr(qm, "GEMV_MAX_BLOCKS", 2)
    p = random_packed("q8_0", 70, 96, seed=11)
    x = np.random.default_rng(11).standard_normal((2, 96)).astype(F32)
    y = qm.matmul(x, p)
    assert emulated.calls[0][1] == (2, 1, 1)
    assert_product(y, x, p)


def test_float64_inputs_and_empty_shapes(emulated):
    p = random_packed("q8_0", 37, 96, seed=6)
    x = np.random.default_rng(6).standard_normal((2, 96))
    y = qm.matmul(x, p)
    assert y.dtype == np.float64
    assert_product(y, x.astype(F32), p)
    assert qm.matmul(np.zeros((0, 96), F32), p).shape == (0, 37)
    assert not emulated.calls[1:]  # nothing launched for no rows
    with pytest.raises(Exception, match="features|shape"):
        qm.matmul(np.zeros((2, 64), F32), p)


def test_formats_without_a_kernel_say_what_to_do():
    p = kernels.pack("f16", np.zeros((4, 32), F32), (4, 32))
    with pytest.raises(TinyLMError, match="dequantize"):
        qm.matmul(np.zeros((1, 32), F32), p)


MUTATIONS = [  # what, original, replacement, (op, fmt, n_out, n_in, N)
    ("q4 high nibbles one feature early", "col[4 + j] = 32 * b + 16 + 4 * p + j;",
     "col[4 + j] = 32 * b + 15 + 4 * p + j;", ("gemv", "q4_0", 37, 96, 3)),
    ("the GEMM's tile overwritten before every warp has read it",
     "                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * wv[j];\n        }\n"
     "        __syncthreads();\n",
     "                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * wv[j];\n        }\n",
     ("gemm", "q8_0", 70, 192, 20)),
    ("the transposed tile reads W as if not transposed",
     "TRANS ? ws[k * QM_PAD + tn + 16 * j]", "TRANS ? ws[(tn + 16 * j) * QM_PAD + k]",
     ("gemm_t", "q8_0", 70, 128, 9)),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m[0])
def test_the_emulator_catches_mutated_kernels(build, monkeypatch, tmp_path, mutation):
    what, old, new, (op, fmt, n_out, n_in, n) = mutation
    src = qm.SOURCE_PATH.read_text()
    assert src.count(old) == 1, f"mutation anchor not found once: {old!r}"
    get, _ = build
    monkeypatch.setattr(qm, "_launch", Emulator(get(src.replace(old, new)), tmp_path))
    p = random_packed(fmt, n_out, n_in, seed=7)
    rng = np.random.default_rng(7)
    assert op == "gemm_t" or (n > qm.GEMV_MAX_ROWS) == (op == "gemm")
    with pytest.raises((AssertionError, EmulationError)):
        if op == "gemm_t":
            g = rng.standard_normal((n, n_out)).astype(F32)
            assert_product(qm.matmul_t(g, p), g, p, transpose=True)
        else:
            x = rng.standard_normal((n, n_in)).astype(F32)
            assert_product(qm.matmul(x, p), x, p)


# =========================================================================== the dispatch


@pytest.fixture
def device_path(emulated, monkeypatch):
    """tinylm.quant.kernels dispatching to the (emulated) CUDA kernels as it does for
    CuPy arrays; NumPy arrays stand in for them."""
    monkeypatch.setattr(kernels, "on_device", lambda *a: True)
    return emulated


@pytest.mark.parametrize("fmt", ["q4_1", "nf4-dq"])
def test_dequantize_through_the_dispatch(device_path, monkeypatch, fmt):
    p = random_packed(fmt, 37, 128, seed=10)
    with monkeypatch.context() as m:
        m.setattr(kernels, "on_device", lambda *a: False)
        want = kernels.dequantize(p)
    got = kernels.dequantize(p)
    assert [c[0] for c in device_path.calls] == [f"qm_rows_{fmt.replace('-dq', '')}"]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_quant_linear_forward_backward_through_the_dispatch(device_path):
    from tinylm import nn
    from tinylm.quant import QuantLinear
    from tinylm.tensor import Tensor

    backend.seed(0)
    lin = nn.Linear(128, 70)
    q = QuantLinear.from_linear(lin, "nf4")
    x = np.random.default_rng(8).standard_normal((2, 6, 128)).astype(F32)
    t = Tensor(x, requires_grad=True)
    y = q(t)
    g = np.random.default_rng(9).standard_normal(y.shape).astype(F32)
    y.backward(g)
    names = [c[0] for c in device_path.calls]
    assert names == ["qm_gemm_nf4", "qm_gemm_t_nf4"]
    p = q.packed
    assert_product(y.numpy().reshape(12, 70) - lin.bias.numpy(), x.reshape(12, 128), p)
    assert_product(t.grad.reshape(12, 128), g.reshape(12, 70), p, transpose=True)


def _qlora(scheme, steps, device_kernels, monkeypatch, emu=None):
    from tinylm import optim, peft
    from tinylm.models import LlamaConfig, build_model
    from tinylm.quant.model import quantize

    with monkeypatch.context() as m:
        if device_kernels:
            m.setattr(kernels, "on_device", lambda *a: True)
            m.setattr(qm, "_launch", emu)
        backend.seed(0)
        c = LlamaConfig(vocab_size=67, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128,
                        max_positions=32)
        model = quantize(build_model(c), scheme, skip=["lm_head"])
        peft.apply(model, "lora", r=4, target_modules=["q_proj", "v_proj", "o_proj",
                                                       "up_proj", "down_proj"])
        params = [p for p in model.parameters() if p.requires_grad]
        opt = optim.AdamW(params, lr=1e-2)
        rng = np.random.default_rng(0)
        ids, losses = rng.integers(0, 67, (2, 6)), []
        for _ in range(steps):  # one batch: the loss must go down
            out = model(ids, targets=np.roll(ids, -1, axis=1))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.numpy()))
        logits = model.eval()(rng.integers(0, 67, (1, 3))).logits.numpy()  # decode-sized
        return np.array(losses), [p.data.copy() for p in params], logits


@pytest.mark.parametrize("scheme", ["nf4", "q4_1"])
def test_qlora_steps_with_the_kernels_equal_the_numpy_path(build, monkeypatch, tmp_path, scheme):
    get, _ = build
    emu = Emulator(get(), tmp_path)
    l_cpu, p_cpu, y_cpu = _qlora(scheme, 2, False, monkeypatch)
    l_dev, p_dev, y_dev = _qlora(scheme, 2, True, monkeypatch, emu)
    names = {c[0] for c in emu.calls}
    fmt = scheme.replace("-dq", "")
    assert {f"qm_gemm_{fmt}", f"qm_gemm_t_{fmt}", f"qm_gemv_{fmt}"} <= names
    assert l_cpu[-1] < l_cpu[0]  # it trains
    np.testing.assert_allclose(l_dev, l_cpu, rtol=1e-5)
    for a, b in zip(p_dev, p_cpu):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(y_dev, y_cpu, rtol=1e-4, atol=1e-4 * np.abs(y_cpu).max())


# =========================================================================== on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", qm.FORMATS)
def test_kernels_on_the_gpu(fmt, monkeypatch):
    import cupy as cp

    monkeypatch.setenv("TINYLM_POISON", "1")
    for n_out, n_in, n in CASES + [(576, 1536, 1), (1536, 576, 128), (49152, 576, 2)]:
        n_in = _n_in(fmt, n_in)
        p = random_packed(fmt, n_out, n_in, seed=n)
        dev = kernels.Packed(p.fmt, p.shape, {k: cp.asarray(v) for k, v in p.arrays.items()})
        x = np.random.default_rng(n).standard_normal((n, n_in)).astype(F32)
        assert_product(cp.asnumpy(kernels.matmul(cp.asarray(x), dev)), x, p)
        g = np.random.default_rng(n + 1).standard_normal((n, n_out)).astype(F32)
        assert_product(cp.asnumpy(kernels.matmul_t(cp.asarray(g), dev)), g, p, transpose=True)
        ids = np.array([n_out - 1, 0, n_out // 2])
        rows = cp.asnumpy(qm.dequantize_rows(dev, cp.asarray(ids)))
        assert np.array_equal(rows, reference_weight(p)[ids])


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["nf4", "q4_1", "q8_0"])
def test_qlora_on_the_gpu_equals_the_cpu(scheme):
    from tinylm import optim, peft
    from tinylm.models import LlamaConfig, build_model
    from tinylm.quant.model import quantize

    runs = []
    for device in ("cpu", "cuda"):
        backend.seed(0)
        c = LlamaConfig(vocab_size=67, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128,
                        max_positions=32)
        model = quantize(build_model(c), scheme, skip=["lm_head"]).to(device)
        peft.apply(model, "lora", r=4, target_modules=["q_proj", "v_proj", "o_proj",
                                                       "up_proj", "down_proj"])
        opt = optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        rng, losses = np.random.default_rng(0), []
        xp = backend.xp_for(device)
        for _ in range(5):
            ids = xp.asarray(rng.integers(0, 67, (2, 6)))
            out = model(ids, targets=xp.roll(ids, -1, axis=1))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(backend.to_numpy(out.loss.data)))
        runs.append(losses)
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4)
