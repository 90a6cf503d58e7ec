"""Dequantize-and-multiply on the GPU: ``y = x @ W.T``, ``dx = dy @ W`` and row lookups
from packed Q8_0 / Q4_0 / Q4_1 / NF4 (and NF4-DQ) weights (``quant_matmul.cu``).

    y = matmul(x2, packed)        # x2 (N, in) CuPy; packed: tinylm.quant.kernels.Packed
    dx = matmul_t(dy2, packed)    # dy2 (N, out) -> (N, in)
    rows = dequantize_rows(packed, ids)   # (n, in) float32: an embedding lookup

``tinylm.quant.kernels.matmul`` / ``matmul_t`` route here when x or the packed arrays
are CuPy arrays (so ``QuantLinear``, ``QuantTiedHead``, LoRA/QLoRA hosts and their
backward run on the GPU after ``model.to("cuda")``); this module is imported only
then, never on a CPU path. The packed bytes go to the device once: either they are
already CuPy buffers (``Module.to`` moved them), or the first call uploads them into
``packed.cache`` (a layer keeps that cache from call to call). NF4-DQ's 8-bit absmax
is dequantized to float32 once (on the host, cached on the device): 4 bytes per 64
weights more than the packed form, the codes stay packed.

Kernels (see the .cu's header for the layouts):

- Decode (``N <= GEMV_TOKENS`` rows of x): ``qm_gemv_<fmt>``, one warp per output row.
  Each lane walks the row's 8-weight sub-blocks with a stride of 32, reads their
  packed bytes (4 or 8 bytes, plus the block's half scale), decodes 8 weights in
  registers and multiplies them with up to 8 rows of x, then a warp butterfly sum.
  This is the bandwidth-bound case: each weight byte is read once per token batch;
  the design goal is to stream the packed bytes at near DRAM bandwidth (a 4-bit
  weight moves 0.5-0.625 bytes, a float32 one 4).
- Prefill and backward (more rows): ``qm_gemm_<fmt>`` / ``qm_gemm_t_<fmt>``, 64 x 64
  output tiles, k-steps of 64: the x (or dy) tile and the decoded W tile go to shared
  memory as float32, then each of the 256 threads accumulates a 4 x 4 micro-tile
  (columns strided by 16: no bank conflicts). The W tile is decoded once per 64 tokens,
  so decoding is amortised and the kernel is compute-bound. ``dx = dy @ W`` uses the
  same decoded tiles with the reduction over the weight's rows (no transposed copy).
- ``qm_rows_<fmt>``: the float32 rows of given ids (``QuantEmbedding`` on the GPU).

Performance design, and what is not done: the GEMM is a correctness-first CUDA-core
float32 kernel (about what a simple 64 x 64 SGEMM reaches, far below the tensor
cores). The next steps, in order: decode the W tile to half / bf16 and multiply with
``mma.sync`` (tensor cores; the decoded tile is a ready B operand), double-buffer the
tiles (``cp.async`` for x), 128-wide tiles. The GEMV reads bytes one at a time (the
Q8_0 / Q4_x blocks are only 2-byte aligned); 4-byte loads with a funnel shift, x
staged in shared memory, and several rows per warp for short rows (SmolLM2's 576
inputs are 72 sub-blocks: lanes 8-31 do two, the others three) are the known
improvements. Other formats (f16, bf16, int8, q4_k, q6_k) have no kernel here: a
``TinyLMError`` says to dequantize them.

Verified without a GPU (tests/test_quant_kernels.py): nvcc compiles the module for
sm_90 and ptxas assembles it (no spills); the .cu itself, compiled as C++ against
tests/cuda_emu.h (tests/quant_emu.cpp), against the NumPy reference for every format,
op and ragged shape, driven through this launcher's own grids and argument tuples;
QuantMatmul forward/backward and a QLoRA step through the dispatch with the kernels
emulated. On a GPU: the same checks on CuPy arrays (``pytest -m gpu``) and
``bench/quant_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinylm import backend
from tinylm.errors import TinyLMError
from tinylm.kernels import runtime

SOURCE_PATH = Path(__file__).with_name("quant_matmul.cu")
THREADS = 256
WARPS = THREADS // 32
TILE = 64
GEMV_TOKENS = 8                       # rows of x one GEMV launch takes (QM_GEMV_TOKENS)
GEMV_MAX_ROWS = GEMV_TOKENS          # matmul takes the GEMM from this many rows of x + 1
GEMV_MAX_BLOCKS = 4096                # the GEMV strides over more rows than this covers
GEMM_SMEM = 2 * TILE * (TILE + 1) * 4  # the x/dy tile and the decoded W tile, float32
KERNEL_FORMATS = ("q8_0", "q4_0", "q4_1", "nf4")
FORMATS = KERNEL_FORMATS + ("nf4-dq",)
OPTIONS = ("-std=c++17", f"-DQM_THREADS={THREADS}")


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise TinyLMError(f"the GPU has kernels for {', '.join(FORMATS)} weights, not {fmt}; "
                          f"quantize to one of them, or dequantize the model "
                          f"(tinylm.quant.model.dequantize_model)")
    return "nf4" if fmt == "nf4-dq" else fmt


def plan(op: str, n_out: int, n_in: int, n_tok: int) -> tuple:
    """(grid, dynamic shared bytes) of one launch of ``op`` (gemv, gemm, gemm_t, rows)."""
    if op == "gemv":
        return (max(1, min(-(-n_out // WARPS), GEMV_MAX_BLOCKS)), 1, 1), 0
    if op == "gemm":
        return (-(-n_out // TILE), -(-n_tok // TILE), 1), GEMM_SMEM
    if op == "gemm_t":
        return (-(-n_in // TILE), -(-n_tok // TILE), 1), GEMM_SMEM
    if op == "rows":
        return (n_tok, 1, 1), 0
    raise ValueError(op)


def _launch(name, like, grid, args, smem):
    """Run kernel ``name`` of the module on ``like``'s device (tests replace this with
    the CPU emulator)."""
    with like.device:
        kern = runtime.kernel(SOURCE_PATH, OPTIONS, name, like.device.id)
        kern(grid, (THREADS, 1, 1), args, shared_mem=smem)


def device_arrays(packed, xp) -> tuple:
    """(w, absmax, row_bytes) of ``packed`` on ``xp``'s device: w the packed rows (out,
    row_bytes) uint8, absmax (out, in/64) float32 for NF4 (NF4-DQ: the one
    ``packed.float_absmax()`` gives; a 1-element placeholder otherwise); kept in
    ``packed.cache`` after the first call."""
    cached = packed.cache.get("device")
    if cached is not None and cached[0] is xp:
        return cached[1]
    fmt, a = packed.fmt, packed.arrays
    if fmt in ("nf4", "nf4-dq"):
        w = xp.ascontiguousarray(xp.asarray(a["codes"]))
        if fmt == "nf4":
            absmax = xp.asarray(a["absmax"], dtype=np.float32)
        else:  # the 8-bit absmax, dequantized once on the host by the packed weight
            absmax = xp.asarray(packed.float_absmax(), dtype=np.float32)
        absmax = xp.ascontiguousarray(absmax)
    else:
        w = xp.ascontiguousarray(xp.asarray(a["raw"]))
        absmax = xp.zeros(1, np.float32)
    out = (w, absmax, int(w.shape[1]) if w.ndim == 2 else 0)
    packed.cache["device"] = (xp, out)
    return out


def _prepare(a, n_cols: int, what: str):
    xp = backend.get_array_module(a)
    if a.ndim != 2 or a.shape[1] != n_cols:
        raise TinyLMError(f"quantized linear: {what} has shape {tuple(a.shape)}, expected "
                          f"(N, {n_cols})")
    return xp, xp.ascontiguousarray(a, dtype=np.float32)


def _empty(xp, shape):
    return runtime.empty(xp, shape, np.float32, runtime.poison_on())


def _products(op, a, packed, n_cols_in, n_cols_out):
    """One product (op gemv, gemm or gemm_t) of ``a`` with the packed weight."""
    fmt = _check_format(packed.fmt)
    xp, a32 = _prepare(a, n_cols_in, "the gradient" if op == "gemm_t" else "the input")
    n_out, n_in = packed.shape
    w, absmax, row_bytes = device_arrays(packed, xp)
    n_tok = a32.shape[0]
    out = _empty(xp, (n_tok, n_cols_out))
    if n_tok and n_cols_out and not n_cols_in:  # an empty reduction
        out.fill(0)
    elif n_tok and n_cols_out:
        if op == "gemv" and n_tok > GEMV_TOKENS:
            raise ValueError(f"the GEMV takes at most {GEMV_TOKENS} rows of x")
        grid, smem = plan(op, n_out, n_in, n_tok)
        args = (w, absmax, a32, out, np.int32(n_out), np.int32(n_in), np.int32(n_tok),
                np.int64(row_bytes))
        _launch(f"qm_{op}_{fmt}", a32, grid, args, smem)
    return out if a.dtype == np.float32 else out.astype(a.dtype)


def matmul(x2, packed):
    """``x2 (N, in) @ W.T`` -> (N, out) on x2's device, in x2's float dtype (computed in
    float32). Up to GEMV_MAX_ROWS rows: the GEMV; more: the tiled GEMM."""
    n_out, n_in = packed.shape
    op = "gemv" if x2.shape[0] <= GEMV_MAX_ROWS else "gemm"
    return _products(op, _on_device(x2, packed), packed, n_in, n_out)


def matmul_t(g2, packed):
    """``g2 (N, out) @ W`` -> (N, in): the input gradient of ``matmul``."""
    n_out, n_in = packed.shape
    return _products("gemm_t", _on_device(g2, packed), packed, n_out, n_in)


def _on_device(a, packed):
    """``a`` as an array of the device the packed weight is on (x may be NumPy while the
    buffers are CuPy, or the other way round: the weight then goes up once)."""
    xp = backend.get_array_module(a, *packed.arrays.values())
    return xp.asarray(a)


def dequantize_rows(packed, ids):
    """The float32 rows ``ids`` (1-D ints) of the weight, (len(ids), in), on the device."""
    fmt = _check_format(packed.fmt)
    xp = backend.get_array_module(ids, *packed.arrays.values())
    ids = xp.ascontiguousarray(xp.asarray(ids).reshape(-1), dtype=np.int64)
    n_out, n_in = packed.shape
    w, absmax, row_bytes = device_arrays(packed, xp)
    out = _empty(xp, (ids.size, n_in))
    if ids.size and n_in:
        grid, smem = plan("rows", n_out, n_in, ids.size)
        _launch(f"qm_rows_{fmt}", ids, grid,
                (w, absmax, ids, out, np.int32(n_in), np.int64(row_bytes)), smem)
    return out
