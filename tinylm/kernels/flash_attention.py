"""Fused attention on the GPU: FlashAttention-2 style CUDA kernels, and their oracle.

    o = softmax(q k^T * scale  [causal mask]) v        q: (B, H, Tq, D)  k, v: (B, Hkv, Tk, D)

The kernels (``flash_attention.cu``, compiled by CuPy's NVRTC on first use, one module
per dtype and head dim) never materialise the (Tq, Tk) scores: each thread block walks
over key tiles keeping a running max and sum per query row (the online softmax), and
saves only the per-row logsumexp for the backward pass, which recomputes the
probabilities tile by tile. Memory is O(T) instead of O(T^2).

    o, lse = flash_attention_forward(q, k, v, causal=True)           # CuPy arrays
    dq, dk, dv = flash_attention_backward(q, k, v, o, lse, do, causal=True)
    y = FlashAttention.apply(q_t, k_t, v_t, causal=True)              # Tensors: differentiable

Conventions, shared with ``tinylm.ops.attention``: the causal mask is bottom-right
aligned (query i sees key j iff j <= i + Tk - Tq; with a KV cache the queries are the
last Tq positions), a query row that sees no key gets o = 0 and lse = -inf, and query
head h reads key/value head h // (H // Hkv) (grouped-query attention).

Head dims 32, 64 and 128; float32, float16 and bfloat16 inputs, always with float32
accumulation. Two implementations (``impl=``):

- ``"simt"``: fp32 arithmetic on CUDA cores, for every dtype (16-bit inputs are widened
  when loaded into shared memory). The float32 path: no TF32 anywhere.
- ``"mma"``: float16 / bfloat16 only, tensor cores (``mma.sync.m16n8k16``, operands
  fetched with ``ldmatrix``) with fp32 accumulation; the probabilities P and dS are
  rounded to the input dtype before they enter a tensor-core product, as in
  FlashAttention-2. ``TINYLM_FA_LDMATRIX=0`` swaps ldmatrix for plain shared loads.

``"auto"`` picks ``mma`` for 16-bit inputs and ``simt`` for float32.

Two generations of the kernels (``variant=``, or ``TINYLM_FA_VARIANT``):

- ``"v1"``: the first kernels (verified on an H200): 4 warps x 16 rows, tiles loaded
  synchronously, two barriers per tile.
- ``"v2"``: tiles stream through two shared-memory stages with ``cp.async`` (the next
  tile loads while the current one is computed, one barrier per tile), the forward's
  warps own 32 query rows each (every K / V fragment read from shared memory feeds
  two tensor-core products), exponents are one FFMA (the backward reads lse in base 2,
  ``lse2``, written by ``fa_bwd_pre2``), and operands a warp reuses over its whole loop
  stay in registers where they fit.
  For ``impl="simt"``, v2 is a backward only: the v1 code with the lse2 exponent and
  its own tiles (``SIMT2_TILES``: larger at d=128).
- ``"auto"`` (the default): ``DEFAULT_VARIANT`` per implementation: v2 for both (on
  an H200 on 2026-11-26 every v2 kernel passed the GPU tests and compute-sanitizer;
  the tensor-core v2 is 1.3-1.6x faster than v1, the SIMT v2 backward 1.1x at d=128
  and the same elsewhere; see bench/RESULTS.md). The v2 forward needs
  scale > 0 (its running max is kept in raw score units); for scale <= 0 the v1
  forward runs, with the v2 backward. ``kernel_plan`` says which kernels a call runs.

bfloat16 arrays: CuPy builds with a bfloat16 dtype work directly; elsewhere pass uint16
arrays holding the raw bits with ``bf16_bits=True`` (see ``to_bf16_bits``/``from_bf16_bits``).

Backward: ``fa_bwd_pre`` computes delta = rowsum(dO * O); ``fa_bwd_dkdv_*`` owns a key
tile and loops over the query tiles (and, with GQA, the query heads) that see it;
``fa_bwd_dq_*`` owns a query tile. No atomics: results are bitwise deterministic.

On NumPy arrays ``FlashAttention`` falls back to ``attention_reference`` (the naive
materialised-scores formula), so the op runs and differentiates everywhere.

Set ``TINYLM_POISON=1`` (or pass ``poison=True``) to fill outputs with NaN before the
kernels run: tests use it to prove that every element is written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from tinylm import backend
from tinylm.errors import DeviceError, ShapeError, TinyLMError
from tinylm.function import Function
from tinylm.kernels import runtime

SOURCE_PATH = Path(__file__).with_name("flash_attention.cu")
HEAD_DIMS = (32, 64, 128)
DTYPES = ("float32", "float16", "bfloat16")
IMPLS = ("auto", "simt", "mma")
VARIANTS = ("auto", "v1", "v2")
LOG2E = 1.4426950408889634

_DTYPE_IDS = {"float32": 0, "float16": 1, "bfloat16": 2}
# Tile sizes per head dim, passed to the compiler as -D flags (the .cu has no table of
# its own). SIMT kernels: (BR query rows, BC key rows), 256 threads. Tensor-core
# kernels, 128 threads: fwd and dq own 64 query rows and step over BC keys; dk/dv owns
# 64 keys and steps over BR queries. Sizes keep registers under the launch bound and
# shared memory well under the 227 KB a block may have on Hopper.
SIMT_TILES = {
    32: {"FWD": (64, 64), "KV": (64, 64), "Q": (64, 64)},
    64: {"FWD": (64, 64), "KV": (64, 64), "Q": (64, 64)},
    128: {"FWD": (64, 32), "KV": (32, 32), "Q": (64, 32)},
}
MMA_TILES = {
    32: {"FWD_BC": 64, "KV_BR": 64, "Q_BC": 64},
    64: {"FWD_BC": 64, "KV_BR": 64, "Q_BC": 64},
    128: {"FWD_BC": 64, "KV_BR": 32, "Q_BC": 64},
}
# v2 tensor-core kernels, 128 threads (4 warps): the forward's warps own FWD_MT m-tiles
# of 16 rows (64 FWD_MT rows per block) and step over FWD_BC keys; dk/dv owns 64 keys
# and steps over KV_BR queries; dq owns 64 queries and steps over Q_BC keys. *_REGS:
# keep Q (forward), K and V (dk/dv), Q and dO (dq) fragments in registers. Chosen from
# ptxas -v on sm_90: no spills, registers <= 255 (see NOTES.md).
MMA2_TILES = {
    32: {"FWD_MT": 2, "FWD_BC": 64, "FWD_QREGS": 1, "KV_BR": 32, "KV_REGS": 1,
         "Q_BC": 64, "Q_REGS": 1},
    64: {"FWD_MT": 2, "FWD_BC": 64, "FWD_QREGS": 1, "KV_BR": 64, "KV_REGS": 1,
         "Q_BC": 64, "Q_REGS": 1},
    128: {"FWD_MT": 2, "FWD_BC": 32, "FWD_QREGS": 0, "KV_BR": 32, "KV_REGS": 0,
          "Q_BC": 32, "Q_REGS": 0},
}
# v2 SIMT backward: the v1 kernels with lse2 (one FFMA per exponent) and these tiles,
# (BR queries, BC keys, blocks per multiprocessor in the launch bounds). At d=128 the
# dk/dv tile doubles its keys (4 x 2 micro-tiles instead of 2 x 2) and dq its keys
# (4 x 4 instead of 4 x 2): less shared-memory traffic per FLOP, one block per SM.
SIMT2_TILES = {
    32: {"KV": (64, 64, 2), "Q": (64, 64, 2)},
    64: {"KV": (64, 64, 2), "Q": (64, 64, 2)},
    128: {"KV": (32, 64, 1), "Q": (64, 64, 1)},
}
# What variant="auto" runs, per implementation. The GPU check (bench/gpu_check.sh)
# tests both variants of every kernel; set an entry to "v1" to go back.
DEFAULT_VARIANT = {"mma": "v2", "simt": "v2"}
SIMT_THREADS = 256
MMA_THREADS = 128
MMA_ROWS = 64  # the fixed side of a tensor-core tile (4 warps x 16 rows)
PRE_ROWS_PER_BLOCK = 8  # fa_bwd_pre: one warp per row, 256 threads


# --------------------------------------------------------------------------- compiling


def ldmatrix_enabled() -> bool:
    """Tensor-core kernels load fragments with ldmatrix unless TINYLM_FA_LDMATRIX=0 (then
    with plain shared-memory loads: same results, slower; a fallback kept tested)."""
    return os.environ.get("TINYLM_FA_LDMATRIX", "1") != "0"


def compile_options(dtype: str, head_dim: int, ldmatrix=None, kernels: int = 7) -> tuple:
    """The NVRTC options of the module for ``dtype`` and ``head_dim`` (nvcc takes them too).

    ``kernels``: the families compiled in (bit mask, FA_KERNELS in the .cu): 1 SIMT, 2
    tensor-core v1, 4 tensor-core v2; the pre-passes are always there."""
    simt, mma, mma2 = SIMT_TILES[head_dim], MMA_TILES[head_dim], MMA2_TILES[head_dim]
    simt2 = SIMT2_TILES[head_dim]
    ldmatrix = ldmatrix_enabled() if ldmatrix is None else ldmatrix
    return (
        "-std=c++17",
        f"-DFA_DTYPE_ID={_DTYPE_IDS[dtype]}",
        f"-DFA_HEAD_DIM={head_dim}",
        f"-DFA_SIMT_FWD_BR={simt['FWD'][0]}", f"-DFA_SIMT_FWD_BC={simt['FWD'][1]}",
        f"-DFA_SIMT_KV_BR={simt['KV'][0]}", f"-DFA_SIMT_KV_BC={simt['KV'][1]}",
        f"-DFA_SIMT_Q_BR={simt['Q'][0]}", f"-DFA_SIMT_Q_BC={simt['Q'][1]}",
        f"-DFA_MMA_FWD_BC={mma['FWD_BC']}", f"-DFA_MMA_KV_BR={mma['KV_BR']}",
        f"-DFA_MMA_Q_BC={mma['Q_BC']}",
        *(f"-DFA_MMA2_{key}={value}" for key, value in mma2.items()),
        *(f"-DFA_SIMT2_{which}_{part}={value}" for which, tile in simt2.items()
          for part, value in zip(("BR", "BC", "MINB"), tile)),
        f"-DFA_LDMATRIX={int(bool(ldmatrix))}",
        f"-DFA_KERNELS={int(kernels)}",
    )


def kernel_names(dtype: str) -> tuple:
    names = ("fa_fwd_simt", "fa_bwd_pre", "fa_bwd_dkdv_simt", "fa_bwd_dq_simt", "fa_bwd_pre2",
             "fa_bwd_dkdv_simt2", "fa_bwd_dq_simt2")
    if dtype != "float32":
        names += ("fa_fwd_mma", "fa_bwd_dkdv_mma", "fa_bwd_dq_mma")
        names += ("fa_fwd_mma2", "fa_bwd_dkdv_mma2", "fa_bwd_dq_mma2")
    return names


def kernel_family(name: str) -> int:
    """The FA_KERNELS bit of the module that holds kernel ``name`` (0: in every module)."""
    for suffix, bit in (("_simt", 1), ("_simt2", 1), ("_mma", 2), ("_mma2", 4)):
        if name.endswith(suffix):
            return bit
    return 0


def variant_default() -> str:
    """The variant asked for by TINYLM_FA_VARIANT (v1, v2 or auto; unset: auto)."""
    value = os.environ.get("TINYLM_FA_VARIANT", "auto") or "auto"
    if value not in VARIANTS:
        raise TinyLMError(f"TINYLM_FA_VARIANT must be one of {VARIANTS}, got {value!r}")
    return value


def kernel_plan(impl: str, dtype: str, head_dim: int, scale: float, variant=None) -> dict:
    """The kernels one forward + backward runs: {"fwd", "pre", "dkdv", "dq"} -> name.

    ``impl`` is "simt" or "mma" (resolved), ``variant`` "v1", "v2", "auto" or None
    (TINYLM_FA_VARIANT, else auto). The v2 tensor-core forward needs scale > 0, so
    scale <= 0 runs the v1 forward (the backward stays v2: both forwards leave the same
    o and lse). SIMT v2 is a backward only (the forward stays v1). Every v2 backward
    reads lse2 from fa_bwd_pre2."""
    variant = variant_default() if variant is None else variant
    if variant not in VARIANTS:
        raise TinyLMError(f"flash attention: variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "auto":
        variant = DEFAULT_VARIANT[impl]
    if variant == "v2" and impl == "mma":
        # the kernel gets scale * log2(e) as a float32: it must stay > 0 (not round to 0)
        positive = np.float32(scale * LOG2E) > 0
        return {"fwd": "fa_fwd_mma2" if positive else "fa_fwd_mma", "pre": "fa_bwd_pre2",
                "dkdv": "fa_bwd_dkdv_mma2", "dq": "fa_bwd_dq_mma2"}
    if variant == "v2":
        return {"fwd": "fa_fwd_simt", "pre": "fa_bwd_pre2", "dkdv": "fa_bwd_dkdv_simt2",
                "dq": "fa_bwd_dq_simt2"}
    return {"fwd": f"fa_fwd_{impl}", "pre": "fa_bwd_pre", "dkdv": f"fa_bwd_dkdv_{impl}",
            "dq": f"fa_bwd_dq_{impl}"}


def launch_shape(name: str, head_dim: int) -> tuple:
    """(rows per block along the grid's x axis, threads, dynamic shared bytes) of a kernel.

    The shared-memory formulas mirror the tile layouts in the .cu; every kernel checks
    %dynamic_smem_size on entry and traps if it was given less than it lays out."""
    D = head_dim
    if name.endswith("_simt") or name.endswith("_simt2"):
        which = {"fa_fwd_simt": "FWD", "fa_bwd_dkdv_simt": "KV", "fa_bwd_dq_simt": "Q",
                 "fa_bwd_dkdv_simt2": "KV", "fa_bwd_dq_simt2": "Q"}[name]
        if name.endswith("2"):
            BR, BC = SIMT2_TILES[D][which][:2]
        else:
            BR, BC = SIMT_TILES[D][which]
        LD = D + 4
        if which == "FWD":  # Qs, Ks, Vs, Ps
            floats = BR * LD + 2 * BC * LD + BR * (BC + 16)
            return BR, SIMT_THREADS, 4 * floats
        if which == "KV":  # Ks, Vs, Qs, dOs, PTs, DSTs, Ls, Dd
            floats = 2 * BC * LD + 2 * BR * LD + 2 * BC * (BR + 16) + 2 * BR
            return BC, SIMT_THREADS, 4 * floats
        floats = 2 * BR * LD + 2 * BC * LD + BR * (BC + 16)  # Qs, dOs, Ks, Vs, DSs
        return BR, SIMT_THREADS, 4 * floats
    if name.endswith("_mma2"):
        LDH = D + 8
        t2 = MMA2_TILES[D]
        if name == "fa_fwd_mma2":  # Qs, then two stages of Ks, Vs (16-bit)
            BR = MMA_ROWS * t2["FWD_MT"]
            return BR, MMA_THREADS, 2 * (BR + 4 * t2["FWD_BC"]) * LDH
        if name == "fa_bwd_dkdv_mma2":  # two stages of Ls, Dd (float); Ks, Vs; two of Qs, dOs
            BR = t2["KV_BR"]
            return MMA_ROWS, MMA_THREADS, 16 * BR + 2 * (2 * MMA_ROWS + 4 * BR) * LDH
        if name == "fa_bwd_dq_mma2":  # Qs, dOs; two stages of Ks, Vs
            return MMA_ROWS, MMA_THREADS, 2 * (2 * MMA_ROWS + 4 * t2["Q_BC"]) * LDH
    if name.endswith("_mma"):
        LDH = D + 8
        tiles = MMA_TILES[D]
        if name == "fa_fwd_mma":  # Qs, Ks, Vs (16-bit)
            return MMA_ROWS, MMA_THREADS, 2 * (MMA_ROWS + 2 * tiles["FWD_BC"]) * LDH
        if name == "fa_bwd_dkdv_mma":  # Ls, Dd (float), Ks, Vs, Qs, dOs
            BR = tiles["KV_BR"]
            return MMA_ROWS, MMA_THREADS, 8 * BR + 2 * (2 * MMA_ROWS + 2 * BR) * LDH
        if name == "fa_bwd_dq_mma":  # Qs, dOs, Ks, Vs
            return MMA_ROWS, MMA_THREADS, 2 * (2 * MMA_ROWS + 2 * tiles["Q_BC"]) * LDH
    if name in ("fa_bwd_pre", "fa_bwd_pre2"):
        return PRE_ROWS_PER_BLOCK, 256, 0
    raise KeyError(name)


def tile_shape(name: str, head_dim: int) -> tuple:
    """(query rows, key rows) of one tile of kernel ``name``: for the forward and dq the
    block owns the query rows and steps over key tiles; dk/dv owns the key rows and steps
    over query tiles. Tests sweep sequence lengths around these sizes."""
    D = head_dim
    simt = {"fa_fwd_simt": SIMT_TILES[D]["FWD"], "fa_bwd_dkdv_simt": SIMT_TILES[D]["KV"],
            "fa_bwd_dq_simt": SIMT_TILES[D]["Q"],
            "fa_bwd_dkdv_simt2": SIMT2_TILES[D]["KV"][:2],
            "fa_bwd_dq_simt2": SIMT2_TILES[D]["Q"][:2]}
    if name in simt:
        return tuple(simt[name])
    mma, mma2 = MMA_TILES[D], MMA2_TILES[D]
    return {"fa_fwd_mma": (MMA_ROWS, mma["FWD_BC"]), "fa_bwd_dkdv_mma": (mma["KV_BR"], MMA_ROWS),
            "fa_bwd_dq_mma": (MMA_ROWS, mma["Q_BC"]),
            "fa_fwd_mma2": (MMA_ROWS * mma2["FWD_MT"], mma2["FWD_BC"]),
            "fa_bwd_dkdv_mma2": (mma2["KV_BR"], MMA_ROWS),
            "fa_bwd_dq_mma2": (MMA_ROWS, mma2["Q_BC"])}[name]


def _kernel(dtype: str, head_dim: int, name: str, device_id: int, family: int):
    smem = launch_shape(name, head_dim)[2]

    def setup(kern):
        if smem > 48 * 1024:  # above the default, a kernel must opt in
            kern.max_dynamic_shared_size_bytes = smem

    return runtime.kernel(SOURCE_PATH, compile_options(dtype, head_dim, kernels=family), name,
                          device_id, setup)


def precompile(dtype: str, head_dim: int, family: int, ldmatrix=None, device_id: int = 0):
    """Compile (and so put in CuPy's on-disk kernel cache, shared by later processes) the
    module of one kernel family: bench/gpu_check.sh builds them all in parallel
    processes before the tests. ``ldmatrix`` None: as TINYLM_FA_LDMATRIX says."""
    if ldmatrix is not None:
        os.environ["TINYLM_FA_LDMATRIX"] = "1" if ldmatrix else "0"
    _kernel(dtype, head_dim, "fa_bwd_pre", device_id, family)


def module_specs() -> list:
    """(dtype, head dim, family, ldmatrix) of every module the GPU tests compile."""
    specs = [(dtype, d, fam, True) for dtype, d in ((t, d) for t in DTYPES for d in HEAD_DIMS)
             for fam in ((1,) if dtype == "float32" else (1, 2, 4))]
    return specs + [("float16", 64, 4, False), ("bfloat16", 128, 4, False)]


def _launch(dtype, head_dim, name, device_id, grid, args, family=None):
    """Launch kernel ``name`` from the module of ``family`` (default: its own family; the
    pre-passes, in every module, say which one to use)."""
    _, threads, smem = launch_shape(name, head_dim)
    kern = _kernel(dtype, head_dim, name, device_id, family or kernel_family(name))
    kern(grid, (threads, 1, 1), args, shared_mem=smem)


# --------------------------------------------------------------------------- checks


def _dtype_of(a, bf16_bits: bool) -> str:
    if bf16_bits:
        if a.dtype != np.uint16:
            raise TinyLMError(
                f"flash attention: bf16_bits=True expects uint16 arrays holding bfloat16 "
                f"bits, got {a.dtype}"
            )
        return "bfloat16"
    name = np.dtype(a.dtype).name
    if name not in DTYPES:
        raise TinyLMError(
            f"flash attention supports {', '.join(DTYPES)} inputs, got {name}; cast with "
            f".astype('float32') (or pass uint16 bfloat16 bits with bf16_bits=True)"
        )
    return name


def _check_device_arrays(named: dict):
    xp = backend.get_array_module(*named.values())
    if xp is np:
        raise DeviceError(
            "flash attention kernels run on CuPy arrays on a GPU; on NumPy use "
            "attention_reference (or FlashAttention.apply, which falls back to it)"
        )
    device = None
    for label, a in named.items():
        if backend.get_array_module(a) is not xp:
            raise DeviceError(f"flash attention: {label} is a NumPy array; move it to the GPU")
        if device is None:
            device = a.device.id
        elif a.device.id != device:
            raise DeviceError(
                f"flash attention: {label} lives on GPU {a.device.id}, the others on GPU "
                f"{device}; move them to one device"
            )
        if not a.flags.c_contiguous:
            raise ShapeError(
                f"flash attention: {label} must be C-contiguous (B, H, T, D); make it so "
                f"with xp.ascontiguousarray({label})"
            )
        if a.data.ptr % 16:  # the kernels move 16 bytes at a time
            raise ShapeError(
                f"flash attention: {label} does not start on a 16-byte boundary; pass a "
                f"copy (xp.ascontiguousarray({label}.copy()))"
            )
    return xp, device


def _check_qkv(q, k, v, bf16_bits):
    for label, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ShapeError(
                f"flash attention: {label} must be 4-d (B, H, T, D), got shape {tuple(a.shape)}"
            )
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ShapeError(f"flash attention: v {tuple(v.shape)} must match k {tuple(k.shape)}")
    if Bk != B or Dk != D:
        raise ShapeError(
            f"flash attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch "
            f"and head dim"
        )
    if Hkv < 1 or H % Hkv:
        raise ShapeError(
            f"flash attention: {H} query heads cannot share {Hkv} key/value heads evenly"
        )
    if D not in HEAD_DIMS:
        raise ShapeError(
            f"flash attention: head dim {D} is not supported; use one of {HEAD_DIMS} "
            f"(or the naive path, tinylm.ops.scaled_dot_product_attention)"
        )
    if min(B, Tq, Tk) < 1:
        raise ShapeError(
            f"flash attention: empty input (q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    if B * H > 65535:
        raise ShapeError(f"flash attention: B*H = {B * H} exceeds the grid limit 65535")
    if B * H * Tq >= 2**31 or B * Hkv * Tk >= 2**31:
        raise ShapeError("flash attention: more than 2**31 rows; split the batch")
    dtype = _dtype_of(q, bf16_bits)
    for label, a in (("k", k), ("v", v)):
        if a.dtype != q.dtype:
            raise TinyLMError(
                f"flash attention: {label} is {a.dtype} but q is {q.dtype}; use one dtype"
            )
    return B, H, Hkv, Tq, Tk, D, dtype


def _resolve(impl, dtype, scale, D):
    if impl not in IMPLS:
        raise TinyLMError(f"flash attention: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "simt" if dtype == "float32" else "mma"
    if impl == "mma" and dtype == "float32":
        raise TinyLMError(
            "flash attention: the tensor-core kernels (impl='mma') take float16 or "
            "bfloat16; use impl='simt' for float32"
        )
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise TinyLMError(f"flash attention: scale must be finite, got {scale}")
    return impl, scale


# --------------------------------------------------------------------------- kernels


def flash_attention_forward(q, k, v, causal: bool = False, scale=None, *, impl: str = "auto",
                            bf16_bits: bool = False, poison=None, variant=None):
    """(o, lse): o like q, lse (B, H, Tq) float32 natural-log logsumexp of the scaled scores.

    q (B, H, Tq, D), k and v (B, Hkv, Tk, D): C-contiguous CuPy arrays of one dtype on one
    GPU. ``scale`` defaults to 1 / sqrt(D). ``variant``: see ``kernel_plan``."""
    xp, device = _check_device_arrays({"q": q, "k": k, "v": v})
    B, H, Hkv, Tq, Tk, D, dtype = _check_qkv(q, k, v, bf16_bits)
    impl, scale = _resolve(impl, dtype, scale, D)
    poison = runtime.poison_on(poison)
    with q.device:
        o = runtime.empty(xp, q.shape, q.dtype, poison, dtype)
        lse = runtime.empty(xp, (B, H, Tq), np.float32, poison)
        name = kernel_plan(impl, dtype, D, scale, variant)["fwd"]
        rows = launch_shape(name, D)[0]
        grid = ((Tq + rows - 1) // rows, B * H, 1)
        args = (q, k, v, o, lse, np.int32(H), np.int32(Hkv), np.int32(Tq), np.int32(Tk),
                np.float32(scale * LOG2E), np.int32(bool(causal)))
        _launch(dtype, D, name, device, grid, args)
    return o, lse


def flash_attention_backward(q, k, v, o, lse, do, causal: bool = False, scale=None, *,
                             impl: str = "auto", bf16_bits: bool = False, poison=None,
                             variant=None):
    """(dq, dk, dv) of ``sum(o * do)``, given the forward's o and lse (same causal, scale)."""
    xp, device = _check_device_arrays({"q": q, "k": k, "v": v, "o": o, "lse": lse, "do": do})
    B, H, Hkv, Tq, Tk, D, dtype = _check_qkv(q, k, v, bf16_bits)
    impl, scale = _resolve(impl, dtype, scale, D)
    for label, a in (("o", o), ("do", do)):
        if tuple(a.shape) != tuple(q.shape) or a.dtype != q.dtype:
            raise ShapeError(
                f"flash attention backward: {label} must be {tuple(q.shape)} {q.dtype}, got "
                f"{tuple(a.shape)} {a.dtype}"
            )
    if tuple(lse.shape) != (B, H, Tq) or lse.dtype != np.float32:
        raise ShapeError(
            f"flash attention backward: lse must be {(B, H, Tq)} float32 (from the forward), "
            f"got {tuple(lse.shape)} {lse.dtype}"
        )
    poison = runtime.poison_on(poison)
    plan = kernel_plan(impl, dtype, D, scale, variant)
    with q.device:
        delta = runtime.empty(xp, (B, H, Tq), np.float32, poison)
        dq = runtime.empty(xp, q.shape, q.dtype, poison, dtype)
        dk = runtime.empty(xp, k.shape, k.dtype, poison, dtype)
        dv = runtime.empty(xp, v.shape, v.dtype, poison, dtype)
        ints = (np.int32(H), np.int32(Hkv), np.int32(Tq), np.int32(Tk))
        floats = (np.float32(scale), np.float32(scale * LOG2E), np.int32(bool(causal)))

        nrows = B * H * Tq
        grid = ((nrows + PRE_ROWS_PER_BLOCK - 1) // PRE_ROWS_PER_BLOCK, 1, 1)
        if plan["pre"] == "fa_bwd_pre2":  # delta and lse2 = lse * log2(e) (+inf for -inf)
            lse_arg = runtime.empty(xp, (B, H, Tq), np.float32, poison)
            args = (o, do, lse, delta, lse_arg, np.int32(nrows))
        else:
            lse_arg = lse
            args = (o, do, delta, np.int32(nrows))
        _launch(dtype, D, plan["pre"], device, grid, args, family=kernel_family(plan["dq"]))

        name = plan["dkdv"]
        keys = launch_shape(name, D)[0]
        grid = ((Tk + keys - 1) // keys, B * Hkv, 1)
        _launch(dtype, D, name, device, grid,
                (q, k, v, do, lse_arg, delta, dk, dv) + ints + floats)

        name = plan["dq"]
        rows = launch_shape(name, D)[0]
        grid = ((Tq + rows - 1) // rows, B * H, 1)
        _launch(dtype, D, name, device, grid, (q, k, v, do, lse_arg, delta, dq) + ints + floats)
    return dq, dk, dv


# --------------------------------------------------------------------------- the op


class FlashAttention(Function):
    """softmax(q k^T * scale [causal]) v as one differentiable op.

    ``FlashAttention.apply(q, k, v, causal=True, scale=None, impl="auto")`` with Tensors
    (B, H, Tq, D), (B, Hkv, Tk, D). CuPy data runs the CUDA kernels; NumPy data runs the
    naive reference, so the op works (slowly) without a GPU."""

    causal = False
    scale = None
    impl = "auto"
    variant = None

    def forward(self, xp, q, k, v):
        if xp is np:
            o, lse = attention_reference(xp, q, k, v, self.causal, self.scale)
            o = o.astype(q.dtype, copy=False)
        else:
            q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
            o, lse = flash_attention_forward(q, k, v, self.causal, self.scale, impl=self.impl,
                                             variant=self.variant)
        if self.needs_grad:
            self.saved = (q, k, v, o, lse)
        return o

    def backward(self, xp, grad):
        q, k, v, o, lse = self.saved
        grad = xp.ascontiguousarray(grad.astype(q.dtype, copy=False))
        if xp is np:
            grads = attention_reference_backward(xp, q, k, v, grad, self.causal, self.scale)
            return tuple(g.astype(a.dtype, copy=False) for g, a in zip(grads, (q, k, v)))
        return flash_attention_backward(q, k, v, o, lse, grad, self.causal, self.scale,
                                        impl=self.impl, variant=self.variant)


def flash_attention(q, k, v, causal: bool = False, scale=None, impl: str = "auto", variant=None):
    """Tensor-level entry point: ``FlashAttention.apply`` with keyword defaults."""
    return FlashAttention.apply(q, k, v, causal=causal, scale=scale, impl=impl, variant=variant)


# --------------------------------------------------------------------------- the oracle


def _reference_probs(xp, q, k, causal, scale):
    """(p, lse, dtype): softmax probabilities (B, H, Tq, Tk), logsumexp (B, H, Tq)."""
    dtype = np.float64 if q.dtype == np.float64 else np.float32
    H, Hkv = q.shape[1], k.shape[1]
    Tq, Tk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q = q.astype(dtype)
    k = xp.repeat(k.astype(dtype), H // Hkv, axis=1)  # head h reads kv head h // group
    s = (q @ xp.swapaxes(k, -1, -2)) * dtype(scale)  # (B, H, Tq, Tk)
    if causal:
        seen = xp.arange(Tk)[None, :] <= xp.arange(Tq)[:, None] + (Tk - Tq)  # (Tq, Tk)
        s = xp.where(seen, s, -xp.inf)
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)  # a row that sees nothing: exp(-inf - 0) = 0
    p = xp.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    some = denom > 0
    p = p / xp.where(some, denom, 1)
    lse = xp.where(some, xp.log(xp.where(some, denom, 1)) + m, -xp.inf)[..., 0]
    return p, lse, dtype, scale


def attention_reference(xp, q, k, v, causal: bool = False, scale=None):
    """Naive attention (materialises the (B, H, Tq, Tk) scores): the kernels' oracle.

    Works on NumPy or CuPy arrays. Computes in float64 for float64 inputs and in
    float32 otherwise; returns (o, lse) in that dtype, lse (B, H, Tq)."""
    p, lse, dtype, _ = _reference_probs(xp, q, k, causal, scale)
    v = xp.repeat(v.astype(dtype), q.shape[1] // v.shape[1], axis=1)
    return p @ v, lse


def attention_reference_backward(xp, q, k, v, do, causal: bool = False, scale=None):
    """(dq, dk, dv) of sum(o * do) for o = attention_reference(...)[0], naively."""
    p, _, dtype, scale = _reference_probs(xp, q, k, causal, scale)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = H // Hkv
    q, do = q.astype(dtype), do.astype(dtype)
    kr = xp.repeat(k.astype(dtype), group, axis=1)
    vr = xp.repeat(v.astype(dtype), group, axis=1)
    dv = xp.swapaxes(p, -1, -2) @ do  # (B, H, Tk, D)
    dp = do @ xp.swapaxes(vr, -1, -2)  # (B, H, Tq, Tk)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    dq = (ds @ kr) * dtype(scale)
    dk = (xp.swapaxes(ds, -1, -2) @ q) * dtype(scale)
    # a kv head collects the gradients of every query head in its group
    dk = dk.reshape(B, Hkv, group, Tk, D).sum(axis=2)
    dv = dv.reshape(B, Hkv, group, Tk, D).sum(axis=2)
    return dq, dk, dv


# --------------------------------------------------------------------------- bfloat16 bits


def to_bf16_bits(xp, x):
    """uint16 bfloat16 bits of ``x`` (rounded to nearest even), for CuPy without bfloat16."""
    u = xp.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return xp.where(nan, np.uint32(0x7FC0), rounded).astype(np.uint16)


def from_bf16_bits(xp, bits):
    """float32 values of uint16 bfloat16 bits (exact)."""
    return (xp.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)
