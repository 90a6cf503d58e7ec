"""The CPU kernels of ``cpu.c``: built once per machine with the system C compiler, loaded
with ctypes, used where they apply; without them every caller runs its NumPy path.

    lib = native.library()          # the ctypes library, or None
    if native.usable(x): native.gelu_forward(x, slope=True, threads=1)

Why C at all: the exact GELU, LayerNorm and AdamW are a dozen or more NumPy passes each
(one ufunc call per arithmetic operation, every one a trip through memory), where one
compiled loop does the same arithmetic once per element, vectorised. On the nanoGPT
character recipe they were a fifth of a training step (bench/RESULTS.md).

The build: ``$CC`` (else ``cc``, ``gcc``, ``clang`` on PATH) with ``-O3 -march=native``
and OpenMP when the compiler has it (without it the kernels run on one thread), into
``$TINYLM_CACHE/native`` (default ``$XDG_CACHE_HOME/tinylm/native`` or
``~/.cache/tinylm/native``, as the token caches) under a name that hashes
the source, the compiler, the flags and this CPU (so a shared home directory never hands
one machine another's build); written to a temporary file and renamed, so a process
that loads it never sees half a file. A failed build is remembered for the process and
said by ``status()`` (``tinylm info`` shows it); ``TINYLM_NATIVE=0`` turns the kernels
off (every op then runs its NumPy path, the reference the tests hold them to).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from tinylm.backend import default_cache_dir
from tinylm.threads import owned_threads  # (threads imports nothing of tinylm's at import)

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
OPENMP = ("-fopenmp",)

_lock = threading.Lock()
_lib = None
_status = None  # why there is no library (or "loaded PATH")
_sgemm = None  # the BLAS library's ILP64 cblas_sgemm (a function pointer), or 0: none

_P, _I, _N, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "tl_gelu_forward": (_P, _P, _P, _N, _I, _P, _I),
    "tl_norm_forward": (_P, _P, _P, _P, _P, _P, _N, _N, _F, _I, _I),
    "tl_norm_backward": (_P, _P, _P, _P, _P, _P, _P, _P, _N, _N, _I, _I),
    "tl_adamw": (_P, _P, _P, _P, _P, _N, _F, _F, _F, _F, _F, _F, _F, _I),
    "tl_softmax": (_P, _P, _P, _N, _N, _N, _F, _I),
    "tl_softmax_backward": (_P, _P, _P, _N, _N, _F, _I),
    "tl_openmp": (),
    "tl_gemm": (_P, _N, _P, _I),
}


def enabled() -> bool:
    """False when ``TINYLM_NATIVE=0`` (or ``off``/``false``/``no``)."""
    return os.environ.get("TINYLM_NATIVE", "1").strip().lower() not in ("0", "off", "false", "no")


def library():
    """The loaded kernels (a ``ctypes.CDLL``), built on first use; None when they are
    off or cannot be built here (``status()`` says why)."""
    global _lib, _status
    if _lib is not None or _status is not None:
        return _lib
    with _lock:
        if _lib is None and _status is None:
            if not enabled():
                _status = "off (TINYLM_NATIVE=0)"
            else:
                try:
                    path = _build()
                    try:
                        lib = _load(path)
                    except OSError:  # a damaged file in the cache: build it afresh, once
                        path.unlink(missing_ok=True)
                        path = _build()
                        lib = _load(path)
                    for name, args in _SIGNATURES.items():
                        fn = getattr(lib, name)
                        fn.argtypes, fn.restype = args, ctypes.c_int if not args else None
                    _lib, _status = lib, f"loaded {path}"
                except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                    _status = f"not available ({_one_line(e)}): the NumPy paths run instead"
    return _lib


def _load(path):
    return ctypes.CDLL(str(path))


def status() -> str:
    """One line: where the kernels were loaded from, or why they were not."""
    library()
    return _status


def summary() -> str:
    """A few words for a log line: "compiled CPU kernels", or why not."""
    if library() is not None:
        return "compiled CPU kernels"
    return "NumPy only: " + _status.split(": the NumPy")[0]


def usable(*arrays) -> bool:
    """Whether the kernels apply to ``arrays`` (None entries are skipped): NumPy float32,
    C-contiguous, and a library to run them."""
    for a in arrays:
        if a is None:
            continue
        if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous):
            return False
    return library() is not None


def _data_offset():
    """Where a NumPy array object keeps its data address, in bytes from the object's
    start (CPython: ``id`` is that start), or None where that cannot be relied on.

    ``a.ctypes.data`` costs ~2 us a call (it builds a ctypes helper object); a training
    step makes a few hundred kernel calls with two to six arrays each. NumPy's C API
    reads the address as the first field after the object header (``PyArray_DATA``,
    part of NumPy's ABI), so reading it there takes ~0.3 us; checked here against
    ``a.ctypes.data`` on a few arrays and views, else the slow way is used."""
    import sys

    if sys.implementation.name != "cpython":
        return None
    offset = object.__basicsize__  # the object header (larger on free-threaded builds)
    probe = np.arange(12, dtype=np.float32).reshape(3, 4)
    views = (probe, probe.T, probe[1:], probe[:, 2:], probe[2, 1:], np.empty(0, np.int64))
    read = ctypes.c_void_p.from_address
    if all(read(id(v) + offset).value == v.ctypes.data for v in views):
        return offset
    return None


_OFFSET = _data_offset()
_read = ctypes.c_void_p.from_address


def address(a):
    """The data address of NumPy array ``a`` (None for None)."""
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise TypeError(f"address: a NumPy array, not {type(a).__name__}")
    if _OFFSET is None:
        return a.ctypes.data
    return _read(id(a) + _OFFSET).value


_ptr = address


# Elements a kernel call must touch before it uses more than one thread (the pool's
# threads wait spinning between calls: waking them costs ~1 us).
PARALLEL_MIN = 1 << 15


def _threads(n: int = PARALLEL_MIN) -> int:
    """Threads for a kernel call over ``n`` elements: ``owned_threads()`` (more than one
    only inside ``threads.blas_threads(N)`` when these kernels own the threads; see
    ``tinylm.threads``), one below PARALLEL_MIN."""
    return 1 if n < PARALLEL_MIN else owned_threads()


def sgemm_pointer() -> int:
    """The address of the BLAS library's ILP64 ``cblas_sgemm`` that NumPy itself uses
    (the ``scipy_cblas_sgemm64_`` of the scipy-openblas64 build NumPy's wheels ship),
    or 0: another BLAS (MKL, Accelerate, a 32-bit-integer OpenBLAS), where tinylm's
    threads never run products and the BLAS library keeps its own threads."""
    global _sgemm
    if _sgemm is None:
        _sgemm = 0
        try:
            from threadpoolctl import threadpool_info

            libs = threadpool_info()
        except ImportError:
            libs = []
        for lib in libs:
            if lib.get("internal_api") == "openblas" and lib.get("prefix") == "libscipy_openblas":
                try:
                    fn = getattr(ctypes.CDLL(lib["filepath"]), "scipy_cblas_sgemm64_")
                except (OSError, AttributeError):  # (a 32-bit-integer build: no 64_ names)
                    continue
                _sgemm = ctypes.cast(fn, ctypes.c_void_p).value or 0
                break
    return _sgemm


def can_own_threads() -> bool:
    """Whether the kernels can run every product and kernel of an op on their own pool
    of threads: the library built with OpenMP and the BLAS's sgemm found."""
    global _can_own
    if _can_own is None:
        lib = library()
        _can_own = lib is not None and lib.tl_openmp() == 1 and sgemm_pointer() != 0
    return _can_own


_can_own = None


# --------------------------------------------------------------------------- the build


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise OSError("no C compiler (cc, gcc or clang) on PATH")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags",
                                                                  "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    return Path(default_cache_dir()) / "native"


def _build() -> Path:
    cc = _compiler()
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_identity().encode()])).hexdigest()[:20]
    folder = cache_dir()
    path = folder / f"tinylm_cpu-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        errors = ""
        for extra in (OPENMP, ()):  # without OpenMP the pragmas are ignored: one thread
            done = subprocess.run([cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
            errors = done.stderr.strip() or f"exit status {done.returncode}, no message"
        else:
            raise OSError(f"{Path(cc).name} failed to build {SOURCE.name}: "
                          f"{errors.splitlines()[-1]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- kernels


def gelu_forward(x, coefficients, slope: bool):
    """(x Phi(x), Phi(x) + x phi(x)) with ``slope``, else (x Phi(x), None), as fresh
    arrays of x's shape; ``coefficients``: float32 (14,), ``tinylm.backend.GELU_RATIONAL``."""
    y = np.empty_like(x)
    g = np.empty_like(x) if slope else None
    library().tl_gelu_forward(_ptr(x), _ptr(y), _ptr(g), x.size, int(slope),
                              _ptr(coefficients), _threads(x.size))
    return y, g


def norm_forward(x, w, b, eps: float, center: bool):
    """(y, mean, rstd) of LayerNorm (center=True) or RMSNorm (center=False) over the last
    axis of ``x`` (rows, D); ``w``, ``b`` (D,) or None; mean is 0 for RMSNorm. The same
    interface as ``tinylm.kernels.fused.norm_forward`` (the CUDA kernels)."""
    rows, d = x.shape
    y = np.empty_like(x)
    mean, rstd = np.empty(rows, np.float32), np.empty(rows, np.float32)
    library().tl_norm_forward(_ptr(x), _ptr(w), _ptr(b), _ptr(y), _ptr(mean), _ptr(rstd),
                              rows, d, eps, int(center), _threads(x.size))
    return y, mean, rstd


def norm_backward(dy, x, w, mean, rstd, center: bool, want_w: bool, want_b: bool):
    """(dx, dw or None, db or None) for ``norm_forward``'s output gradient ``dy``."""
    rows, d = x.shape
    dx = np.empty_like(x)
    dw = np.empty(d, np.float32) if want_w else None
    db = np.empty(d, np.float32) if want_b else None
    library().tl_norm_backward(_ptr(x), _ptr(w), _ptr(dy), _ptr(mean), _ptr(rstd), _ptr(dx),
                               _ptr(dw), _ptr(db), rows, d, int(center), _threads(x.size))
    return dx, dw, db


def adamw_step(p, g, m, v, vmax, *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int) -> None:
    """One AdamW step, in place on p, m, v (and vmax for amsgrad; else None): the
    formula of ``tinylm.optim.AdamW``, its scalars computed in double as there."""
    library().tl_adamw(_ptr(p), _ptr(g), _ptr(m), _ptr(v), _ptr(vmax), p.size,
                       1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps,
                       lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, _threads(p.size))


def softmax(x, out, bias, scale: float) -> None:
    """out = softmax(x * scale + bias) over the last axis (out may be x: in place);
    ``bias`` None or (T, n) float32, added to row r as its row r % T (attention's
    causal or ALiBi bias over stacked heads). A row of -inf gets zeros."""
    n = x.shape[-1]
    rows = x.size // n if n else 0
    library().tl_softmax(_ptr(x), _ptr(out), _ptr(bias), rows, n,
                         1 if bias is None else bias.shape[0], scale, _threads(x.size))


def softmax_backward(dp, p, delta, scale: float) -> None:
    """Attention's score gradient in place on ``dp``: (dp - delta) * p * scale, with
    ``delta`` one value per row (rowsum(dY * Y))."""
    n = dp.shape[-1]
    rows = dp.size // n if n else 0
    library().tl_softmax_backward(_ptr(dp), _ptr(p), _ptr(delta), rows, n, scale,
                                  _threads(dp.size))


def _layout(a):
    """(leading dimension, batch stride 1, batch stride 2) in elements of ``a`` as a
    ``gemm`` operand: a NumPy float32 array of 2 to 4 axes (..., rows, cols) whose rows
    are unit-stride runs that do not overlap, batch strides non-negative (a missing
    batch axis: stride 0); None when it is not one."""
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and 2 <= a.ndim <= 4):
        return None
    st, shape = a.strides, a.shape
    rows, cols = shape[-2], shape[-1]
    if cols > 1 and st[-1] != 4:
        return None
    if rows > 1:
        if st[-2] % 4 or st[-2] < 4 * cols:
            return None
        ld = max(st[-2] // 4, cols, 1)
    else:
        ld = max(cols, 1)
    if a.ndim == 2:
        return ld, 0, 0
    if any(x % 4 or x < 0 for x in st[:-2]):
        return None
    return (ld, 0, st[0] // 4) if a.ndim == 3 else (ld, st[0] // 4, st[1] // 4)


def is_matrix(a, ndim: int) -> bool:
    """Whether ``gemm`` takes ``a`` as an operand: a NumPy float32 array of ``ndim``
    axes (2 to 4) whose rows are unit-stride runs that do not overlap."""
    return getattr(a, "ndim", None) == ndim and _layout(a) is not None


def disjoint(a) -> bool:
    """Whether no two elements of ``a`` share an address (threads may write them all):
    C-contiguous, or each axis's stride, in decreasing order, at least the extent of the
    axes below it (a transposed view of a contiguous array: attention's heads)."""
    if a.flags.c_contiguous:
        return True
    axes = sorted(((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1), reverse=True)
    extent = a.itemsize
    for st, n in reversed(axes):
        if st < extent:
            return False
        extent = st * n
    return True


def owns_products(ndim: int, *arrays) -> bool:
    """Whether an op's products over these operands run as ``gemm`` on the kernels'
    threads: they own the threads (``tinylm.threads.owned_threads``), and every array
    is a float32 matrix stack of ``ndim`` axes that ``gemm`` takes (linear layers: 2,
    attention's heads: 4)."""
    return (owned_threads() > 1 and all(is_matrix(a, ndim) for a in arrays)
            and can_own_threads())


def gemm(a, b, out, transa: bool = False, transb: bool = False) -> None:
    """out = op(a) @ op(b) on the kernels' threads (op: transpose the last two axes when
    trans*), ``out`` float32 with unit column stride, its elements disjoint (C-contiguous,
    or a transposed view of a contiguous array); a, b float32 with unit column stride and
    the same (up to two) batch axes as out, or none (a shared matrix). Call only where
    ``owned_threads() > 1`` (see ``tinylm.threads``)."""
    gemm_many(((a, b, out, transa, transb),))


def gemm_many(products) -> None:
    """Several independent products ``(a, b, out, transa, transb)`` (as ``gemm``; no
    output is another's operand) in one call: with as many threads as products, each
    product runs on its own share of the threads, side by side (the two gradients of
    a linear layer's backward: each on whole rows, instead of both split in halves)."""
    fn = sgemm_pointer()
    if not fn:
        raise ValueError("gemm: no BLAS sgemm to call (see can_own_threads)")
    args, work = [], 0
    for a, b, out, transa, transb in products:
        m, n = out.shape[-2], out.shape[-1]
        am, k = (a.shape[-1], a.shape[-2]) if transa else a.shape[-2:]
        bk, bn = (b.shape[-1], b.shape[-2]) if transb else b.shape[-2:]
        if (am, bk, bn) != (m, k, n) or not (a.shape[:-2] == b.shape[:-2] == out.shape[:-2]):
            raise ValueError(f"gemm: shapes {a.shape}{'^T' if transa else ''} @ "
                             f"{b.shape}{'^T' if transb else ''} -> {out.shape} do not match")
        if k == 0 or out.size == 0:  # a sum of no products (sgemm may leave C untouched)
            out.fill(0)
            continue
        la, lb, lc = _layout(a), _layout(b), _layout(out)
        if la is None or lb is None or lc is None or not disjoint(out):
            raise ValueError("gemm: operands must be float32 matrix stacks with unit column "
                             "stride, the output's elements each at its own address")
        nb = out.shape[:-2]
        args += (int(transa), int(transb), nb[0] if len(nb) == 2 else 1, nb[-1] if nb else 1,
                 m, n, k, _ptr(a), la[1], la[2], la[0], _ptr(b), lb[1], lb[2], lb[0],
                 _ptr(out), lc[1], lc[2], lc[0])
        work += out.size * k
    if args:
        packed = np.array(args, np.int64)
        library().tl_gemm(fn, len(args) // 19, _ptr(packed), _threads(work))
