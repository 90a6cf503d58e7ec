"""Fused CUDA kernels for the training step: LayerNorm / RMSNorm, softmax
cross-entropy, AdamW (``fused.cu``), and when the ops use them.

A GPU training step of a small model was launch-bound (about 200 kernel launches per
step on an H200). These kernels do in one launch what the composed CuPy code does in
ten or more: a norm's forward is one kernel (one block per row: warp-shuffle and
shared-memory sums, mean and rstd saved), its backward three (dx per row; dw, db as
per-block partial column sums added in a fixed order by a second kernel: no atomics,
bitwise reproducible); cross-entropy's forward and backward one each (one-pass online
logsumexp per row; the (N, V) log-probabilities are never stored, only lse per row);
AdamW one per parameter (param, m, v updated in place, float32 master weights).

    y, mean, rstd = norm_forward(x2d, w, b, eps, center=True)          # CuPy arrays
    dx, dw, db = norm_backward(dy2d, x2d, w, mean, rstd, center=True, want_w=True, want_b=True)
    loss_rows, lse = cross_entropy_forward(logits2d, targets1d, ignore_index, eps)
    dlogits = cross_entropy_backward(logits2d, targets1d, lse, grad, count, ...)
    adamw_step(p, g, m, v, None, lr=..., beta1=..., ...)                # in place

Who uses them: ``tinylm.ops.nn`` (LayerNorm, RMSNorm, CrossEntropy) and
``tinylm.optim.AdamW`` call ``usable(*arrays)``: True only for C-contiguous float32
CuPy arrays AND when fused kernels are enabled. Everything else (NumPy, float64,
float16 outside autocast, strided views) takes the composed path, unchanged.
Under ``amp.autocast`` norms and losses already upcast half inputs to float32, so
float32 is the only dtype these kernels need (the module cache is still keyed by
dtype, for a 16-bit variant later).

**Off by default.** Enabled only by the environment variable ``TINYLM_FUSED_KERNELS=1``:
the kernels were written in a session without a GPU. They compile with nvcc for sm_90
(ptxas: no warnings) and pass the CPU emulator (tests/fused_emu.cpp: every kernel
against float64 references, NaN-poisoned outputs, both warp orders; this launcher's
own argument tuples checked against the kernel signatures), but they have not yet run
on a real GPU. A GPU session runs ``pytest -m gpu tests/test_fused_kernels.py``
and ``bench/fused_gpu.py`` and then flips ``DEFAULT_ENABLED``.

Set ``TINYLM_POISON=1`` to fill outputs with NaN before the kernels run (tests use it
to prove that every element is written).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinylm import backend
from tinylm.errors import DeviceError, ShapeError
from tinylm.kernels import runtime

SOURCE_PATH = Path(__file__).with_name("fused.cu")
DTYPES = ("float32",)
THREADS = 256
MAX_PARAM_PARTS = 128  # P: row groups of a norm's dw/db partial sums
ADAMW_MAX_BLOCKS = 4096  # fz_adamw strides over the rest
DEFAULT_ENABLED = False  # flip once the GPU tests pass on a real GPU
KERNEL_NAMES = ("fz_norm_fwd", "fz_norm_bwd_dx", "fz_norm_bwd_params", "fz_colsum",
                "fz_ce_fwd", "fz_ce_bwd", "fz_adamw")


def smem_bytes(threads: int = THREADS) -> int:
    """Dynamic shared memory of every fused kernel: [3][warps] floats of reduction scratch."""
    return 3 * (threads // 32) * 4


SMEM_BYTES = smem_bytes()


def enabled() -> bool:
    """TINYLM_FUSED_KERNELS=1 turns the fused kernels on, =0 off; unset: DEFAULT_ENABLED."""
    value = os.environ.get("TINYLM_FUSED_KERNELS", "")
    return DEFAULT_ENABLED if value == "" else value == "1"


def usable(*arrays) -> bool:
    """True when the fused kernels are enabled and may take these arrays: CuPy, float32,
    C-contiguous (None entries are skipped)."""
    if not enabled():
        return False
    arrays = [a for a in arrays if a is not None]
    return bool(arrays) and all(backend.get_array_module(a) is not np and a.dtype == np.float32
                                and a.flags.c_contiguous for a in arrays)


# --------------------------------------------------------------------------- compiling


def compile_options(dtype: str = "float32", threads: int = THREADS) -> tuple:
    """The NVRTC options of the module for ``dtype`` (nvcc and the emulator take them too)."""
    if dtype not in DTYPES:
        raise DeviceError(f"fused kernels: no module for {dtype}; they take {DTYPES}")
    return ("-std=c++17", f"-DFZ_THREADS={int(threads)}")


def param_parts(rows: int) -> int:
    """P, the number of row groups whose partial dw/db sums fz_colsum adds: a function
    of the shape only, so the sums (and their rounding) do not depend on the device."""
    return max(1, min(rows, MAX_PARAM_PARTS))


def adamw_blocks(n: int) -> int:
    return max(1, min(-(-n // THREADS), ADAMW_MAX_BLOCKS))


def _launch(name, like, grid, args, threads=THREADS):
    with like.device:
        kern = runtime.kernel(SOURCE_PATH, compile_options("float32"), name, like.device.id)
        kern(grid, (threads, 1, 1), args, shared_mem=SMEM_BYTES)


def _empty(xp, shape):
    return runtime.empty(xp, shape, np.float32, runtime.poison_on())


# --------------------------------------------------------------------------- norms


def norm_forward(x, w, b, eps: float, center: bool):
    """(y, mean, rstd) of LayerNorm (center=True) or RMSNorm (center=False) over the
    last axis of ``x`` (rows, D); ``w``, ``b`` (D,) or None. mean is 0 for RMSNorm."""
    xp = backend.get_array_module(x)
    rows, D = x.shape
    y, mean, rstd = _empty(xp, (rows, D)), _empty(xp, (rows,)), _empty(xp, (rows,))
    if rows:
        _launch("fz_norm_fwd", x, (rows, 1, 1),
                (x, x if w is None else w, x if b is None else b, y, mean, rstd, np.int32(D),
                 np.float32(eps), np.int32(center), np.int32(w is not None),
                 np.int32(b is not None)))
    return y, mean, rstd


def norm_backward(dy, x, w, mean, rstd, center: bool, want_w: bool, want_b: bool):
    """(dx, dw or None, db or None) for ``norm_forward``'s output gradient ``dy``."""
    xp = backend.get_array_module(x)
    rows, D = x.shape
    dx = _empty(xp, (rows, D))
    dw = _empty(xp, (D,)) if want_w else None
    db = _empty(xp, (D,)) if want_b else None
    if not rows:  # nothing to launch: the parameter gradients are sums over no rows
        for g in (dw, db):
            if g is not None:
                g.fill(0)
        return dx, dw, db
    _launch("fz_norm_bwd_dx", x, (rows, 1, 1),
            (dy, x, x if w is None else w, mean, rstd, dx, np.int32(D), np.int32(center),
             np.int32(w is not None)))
    if want_w or want_b:
        P = param_parts(rows)
        pw = _empty(xp, (P, D)) if want_w else dx  # dx: a placeholder never written
        pb = _empty(xp, (P, D)) if want_b else dx
        col_blocks = -(-D // THREADS)
        flags = (np.int32(want_w), np.int32(want_b))
        _launch("fz_norm_bwd_params", x, (col_blocks, P, 1),
                (dy, x, mean, rstd, pw, pb, np.int32(rows), np.int32(D)) + flags)
        _launch("fz_colsum", x, (col_blocks, 1, 1),
                (pw, pb, dx if dw is None else dw, dx if db is None else db, np.int32(P),
                 np.int32(D)) + flags)
    return dx, dw, db


# --------------------------------------------------------------------------- cross-entropy


def smoothing_args(V: int, label_smoothing: float) -> tuple:
    """(1 - eps, eps / V, smoothing on) as the CE kernels take them."""
    eps = float(label_smoothing)
    return np.float32(1 - eps), np.float32(eps / V), np.int32(eps != 0)


def cross_entropy_forward(logits, targets, ignore_index: int, label_smoothing: float):
    """(loss per row, lse per row): logits (N, V) float32, targets (N,) int64 with
    every entry ``ignore_index`` or in [0, V) (the caller checks). Ignored rows: loss 0."""
    xp = backend.get_array_module(logits)
    N, V = logits.shape
    if targets.dtype != np.int64 or not targets.flags.c_contiguous or targets.shape != (N,):
        raise ShapeError(f"cross_entropy_forward: targets must be C-contiguous int64 of shape "
                         f"({N},), got {targets.dtype} {targets.shape}")
    loss, lse = _empty(xp, (N,)), _empty(xp, (N,))
    if N:
        _launch("fz_ce_fwd", logits, (N, 1, 1),
                (logits, targets, loss, lse, np.int32(V), np.int64(ignore_index),
                 *smoothing_args(V, label_smoothing)))
    return loss, lse


def cross_entropy_backward(logits, targets, lse, grad, count, ignore_index: int,
                           label_smoothing: float):
    """dlogits (N, V) = (softmax - target distribution) * scale per row, with scale =
    grad[row] (``grad`` of shape (N,), reduction "none") or grad (a 0-d array: "sum",
    or "mean" with ``count`` the 0-d float32 number of targets not ignored), times 0 on
    ignored rows."""
    xp = backend.get_array_module(logits)
    N, V = logits.shape
    dlogits = _empty(xp, (N, V))
    # device arrays, also when 0-d or a host scalar (loss.backward(1.0))
    grad = xp.ascontiguousarray(xp.asarray(grad, dtype=np.float32))
    count = None if count is None else xp.ascontiguousarray(xp.asarray(count, dtype=np.float32))
    if grad.size not in (1, N):
        raise ShapeError(f"cross_entropy_backward: grad has {grad.size} elements, not 1 or {N}")
    if N:
        _launch("fz_ce_bwd", logits, (N, 1, 1),
                (logits, targets, lse, grad, grad if count is None else count, dlogits,
                 np.int32(V), np.int64(ignore_index), *smoothing_args(V, label_smoothing),
                 np.int32(grad.size != 1),  # per row, or one scalar for all rows
                 np.int32(count is not None)))
    return dlogits


# --------------------------------------------------------------------------- AdamW


def adamw_step(p, g, m, v, vmax, *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int) -> None:
    """One AdamW step on float32 CuPy arrays, in place on p, m, v (and vmax, the running
    maximum of v, for amsgrad; None otherwise). Same formula as optim.AdamW."""
    n = p.size
    if n:
        _launch("fz_adamw", p, (adamw_blocks(n), 1, 1),
                (p, g, m, v, v if vmax is None else vmax, np.int64(n),
                 *adamw_scalars(lr, beta1, beta2, eps, weight_decay, step),
                 np.int32(vmax is not None)))


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step) -> tuple:
    """fz_adamw's scalar arguments, from decay to use_decay (computed in float64, as
    optim.AdamW does, then rounded to float32)."""
    step_size = lr / (1 - beta1**step)
    bc2_sqrt = (1 - beta2**step) ** 0.5
    return (np.float32(1 - lr * weight_decay), np.float32(1 - beta1), np.float32(beta2),
            np.float32(1 - beta2), np.float32(step_size), np.float32(bc2_sqrt),
            np.float32(eps), np.int32(weight_decay != 0))
