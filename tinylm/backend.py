"""Array backends: NumPy always, CuPy when installed and asked for.

This is the ONLY module that imports cupy. Everything else asks it for the array
module of its inputs (``xp = get_array_module(x)``), Chainer-style, and writes one
code path that runs on both.

    >>> xp = get_array_module(np.zeros(3))
    >>> xp is np
    True
"""

from __future__ import annotations

import math
import os

import numpy as np

from tinylm.errors import DeviceError

try:  # CuPy is optional: the `cuda` extra installs it.
    import cupy as _cupy
    import cupyx as _cupyx
    import cupyx.scipy.special  # noqa: F401  (erf)
except Exception:  # ImportError, or a CUDA runtime that fails to load
    _cupy = None
    _cupyx = None

DEVICES = ("cpu", "cuda")


# --------------------------------------------------------------------------- devices


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def has_cupy() -> bool:
    """Whether CuPy is imported (else every array is a NumPy one)."""
    return _cupy is not None


def get_array_module(*arrays):
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def xp_for(device: str):
    """The array module that stores arrays on ``device`` ("cpu" or "cuda")."""
    device = normalize_device(device)
    if device == "cpu":
        return np
    if not cuda_available():
        raise DeviceError(
            "device 'cuda' was asked for but CuPy or a GPU is not available; "
            "install the `cuda` extra (pip install 'tinylm[cuda]') on a machine with an "
            "NVIDIA GPU, or use device='cpu'"
        )
    return _cupy


def normalize_device(device) -> str:
    if device is None:
        return "cpu"
    name = str(device).lower()
    if name.startswith("cuda") or name == "gpu":
        return "cuda"
    if name == "cpu":
        return "cpu"
    raise DeviceError(f"unknown device {device!r}; expected one of {DEVICES}")


def device_of(array) -> str:
    return "cuda" if get_array_module(array) is not np else "cpu"


def to_device(array, device: str):
    """Copy ``array`` to ``device``; a no-op when it is already there."""
    xp = xp_for(device)
    if xp is np:
        return _cupy.asnumpy(array) if get_array_module(array) is not np else np.asarray(array)
    return _cupy.asarray(array)


def to_numpy(array) -> np.ndarray:
    """A NumPy view or copy of ``array`` wherever it lives."""
    if get_array_module(array) is not np:
        return _cupy.asnumpy(array)
    return np.asarray(array)


# --------------------------------------------------------------------------- kernels
# The few operations whose spelling differs between NumPy and CuPy live here, so no
# op file ever branches on the backend.


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` with repeated indices accumulated (in place)."""
    if get_array_module(target) is not np:
        _cupy.add.at(target, indices, values)
    elif _is_row_scatter(target, indices, values):
        # Rows by 1-D ids (an embedding's backward): sort the ids once and sum each
        # run of equal ids with one reduceat, several times faster than np.add.at.
        order = np.argsort(indices, kind="stable")
        ids = indices[order]
        starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
        target[ids[starts]] += np.add.reduceat(values[order], starts, axis=0)
    else:
        np.add.at(target, indices, values)


def _is_row_scatter(target, indices, values) -> bool:
    return (
        isinstance(indices, np.ndarray) and indices.ndim == 1 and indices.dtype.kind in "iu"
        and indices.size > 0 and isinstance(values, np.ndarray)
        and values.shape == indices.shape + target.shape[1:]
        and int(indices.min()) >= 0  # negative ids would split one row into two runs
    )


def erf(x):
    """The error function, elementwise, on either backend.

    CuPy has one. NumPy does not: float64 arrays (gradchecks, references) go through
    ``math.erf`` exactly; other dtypes are computed in float32 (float16 inputs are
    upcast, then cast back) as ``x P(x^2) / Q(x^2)``, a degree-5/5 rational fitted
    (minimax in relative error, Lawson-weighted least squares) to ``erf(x) / x`` on
    |x| <= 3.92, with x clipped there first (beyond it erf rounds to +-1 in float32).
    Every coefficient is positive, so Horner's rule cancels nothing: the fit itself is
    within 1.9e-8 relative, and float32 evaluation keeps the result within 7 float32
    ulps of the correctly rounded erf everywhere (measured max 6.93 ulps, near
    |x| = 3.6; mean 0.8; relative, so also near 0 and for subnormal x). No exp, no
    branch: 25 array passes in place on three scratch arrays, about 30% less time than
    the Numerical Recipes erfc it replaced (which lost relative accuracy near 0).
    nan stays nan, +-inf gives +-1, -0.0 gives -0.0.
    """
    if get_array_module(x) is not np:
        return _cupyx.scipy.special.erf(x)
    if x.dtype == np.float64:
        return np.asarray(_exact_erf(x), dtype=np.float64)  # 0-d input gives a float
    # (out= everywhere: a 0-d array would otherwise decay to a scalar.)
    x = np.asarray(x)
    work = np.promote_types(x.dtype, np.float32)
    xc = np.clip(x, -_ERF_CLIP, _ERF_CLIP, out=np.empty(x.shape, work))
    s = np.multiply(xc, xc, out=np.empty_like(xc))
    p = _horner(s, _ERF_P, np.empty_like(s))
    p *= xc
    q = _horner(s, _ERF_Q, xc)  # xc is no longer needed
    p /= q
    return np.clip(p, -1.0, 1.0, out=p).astype(x.dtype, copy=False)  # rounding may pass 1


def normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt(2))) / 2, elementwise: the exact GELU's gate.

    float64 and CuPy: exactly that expression, with ``erf`` above. Other dtypes (float32
    math): ``1/2 + tanh(x R(x^2)) / 2`` with x clipped to [-6, 6], where x R(x^2) (R of
    degree 6, fitted by weighted least squares to atanh(erf(x / sqrt 2)) on [0, 5.9])
    stands for the exact atanh(2 Phi - 1), not the tanh GELU's cubic: 19 NumPy passes
    (numpy's float32 tanh is vectorised) instead of the 26 of the erf rational. Within
    9.6e-8 of the exact Phi over float32 (1.6 ulps of 1; the erf route: 2.1e-7; tested
    to 2.5e-7), exactly 0 and 1 at -inf and inf (tanh saturates in float32 past 9),
    NaN stays NaN; in [0, 1]. A fresh array of x's shape and dtype.
    """
    if get_array_module(x) is not np or x.dtype == np.float64:
        xp = get_array_module(x)
        cdf = xp.asarray(erf(x * _INV_SQRT_2))  # a fresh array
        cdf += 1
        cdf *= 0.5
        return cdf
    x = np.asarray(x)
    xc = np.clip(x, -_PHI_CLIP, _PHI_CLIP, out=np.empty(x.shape, np.promote_types(x.dtype,
                                                                                 np.float32)))
    s = np.multiply(xc, xc, out=np.empty_like(xc))
    g = _horner(s, _PHI_TANH, np.empty_like(s))  # R(x^2)
    g *= xc
    np.tanh(g, out=g)
    g *= 0.5
    g += 0.5
    return g.astype(x.dtype, copy=False)


# Elements per block of the chunked float32 GELU: its ~20 passes then run on blocks
# that stay in the core's L2 cache (4 arrays of 256 KiB: x's block, x^2, Phi, y)
# instead of streaming the whole (B, T, 4d) activation through memory each pass (the
# recipe's (12, 64, 512): forward 1.38 -> 0.87 ms, backward 0.61 -> 0.51 on one core).
# Smaller blocks lose to the per-call overhead of ~0.6 us a ufunc call (on a 2 MiB-L2
# SPR core, forward with slope: 16384 1.20 ms, 32768 1.09, 65536 1.04, 131072 1.05).
GELU_BLOCK = 65536


def _gelu_blocks(x) -> bool:
    """Whether the chunked float32 GELU kernels apply: a host float32 array."""
    return isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim > 0


def gelu_forward(x, slope: bool = False):
    """(x Phi(x), Phi(x)) as fresh arrays: the exact GELU and its gate; with ``slope``,
    (x Phi(x), Phi(x) + x phi(x)): the GELU and its derivative, which is all that the
    backward needs (``grad * slope``: one pass, and x itself need not be kept).
    float32 host arrays: ``normal_cdf``'s formula, evaluated per block of GELU_BLOCK
    elements, the slope's ~6 extra passes too while the block is in cache (the same
    operations in the same order: bit-identical to ``x * normal_cdf(x)`` and to
    ``x * phi(x) + normal_cdf(x)``); others: exactly those expressions."""
    if not _gelu_blocks(x):
        cdf = normal_cdf(x)
        y = x * cdf
        if slope:
            xp = get_array_module(x)
            d = xp.asarray(x * x)
            d *= -0.5
            xp.exp(d, out=d)
            d *= _INV_SQRT_2PI  # phi(x)
            d *= x
            d += cdf
            return y, d
        return y, cdf
    # No clip to [-6, 6] here (normal_cdf's): R(s) has no real root (its leading
    # coefficient is positive), so x R(x^2) keeps x's sign and, in float32, is at least
    # 11.8 in magnitude for every |x| >= 6 (checked over every float32 in [6, 2^20];
    # past that it only grows, to inf where x^2 or the polynomial overflows), where
    # tanh is exactly +-1 as it is at the clipped +-6: the same bits for every x, inf
    # and NaN included (tests/test_perf_equivalence.py), one pass less, and x^2 is
    # then the slope's x^2 too (another pass less).
    flat = np.ascontiguousarray(x).reshape(-1)
    n = flat.size
    # (arrays of x's shape that own their memory, written through flat views: a
    # gradient made in place from one is then no view a leaf's .grad must copy)
    y, cdf = np.empty(x.shape, np.float32), np.empty(x.shape, np.float32)
    y_flat, cdf_flat = y.reshape(-1), cdf.reshape(-1)
    sq = np.empty(min(GELU_BLOCK, n), np.float32)
    with np.errstate(over="ignore"):  # R(x^2) overflows to inf past |x| ~ 9e3 (x^2 past 1.8e19)
        for start in range(0, n, GELU_BLOCK):
            part = flat[start:start + GELU_BLOCK]
            m = part.size
            s, g = sq[:m], cdf_flat[start:start + m]
            _gelu_block(part, s, g, y_flat[start:start + m], slope)
    return y, cdf


def _gelu_block(part, s, g, y, slope: bool) -> None:
    """One block of ``gelu_forward``: y <- x Phi(x), g <- Phi(x) (or, with ``slope``,
    Phi(x) + x phi(x)); ``s`` is scratch."""
    np.multiply(part, part, out=s)
    _horner(s, _PHI_TANH, g)  # R(x^2)
    g *= part
    np.tanh(g, out=g)
    g *= 0.5
    g += 0.5
    np.multiply(part, g, out=y)
    if slope:  # g <- Phi(x) + x phi(x); s still holds x^2
        s *= -0.5
        np.exp(s, out=s)
        s *= _INV_SQRT_2PI
        s *= part
        g += s


def _horner(s, coeffs, out):
    """sum_k coeffs[k] s^k into ``out`` by Horner's rule, in place (no temporaries)."""
    np.multiply(s, coeffs[-1], out=out)
    for c in coeffs[-2:0:-1]:
        out += c
        out *= s
    out += coeffs[0]
    return out


_ERF_CLIP = 3.92
_ERF_P = (1.1283791462512538, 0.19040058940962173, 0.052747582349098265,
          0.003765270745916698, 0.0002848591710135176, 2.049925447870243e-06)
_ERF_Q = (1.0, 0.5020708724800264, 0.1141063545166097, 0.014968528679727805,
          0.0011624224647935112, 3.808880183651688e-05)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Phi(x) = (1 + tanh(x R(x^2))) / 2: R's coefficients, constant first (the first is
# sqrt(2 / pi), as in the tanh GELU; the fit's own error is 2.9e-8 in Phi)
_PHI_CLIP = 6.0
_PHI_TANH = (0.7978849414934731, 0.0363330844042023, -3.259476116112948e-05,
             -5.5306295343354186e-05, 3.964765173291879e-06, -1.3226516004487265e-07,
             1.7562260881676117e-09)


_exact_erf = np.frompyfunc(math.erf, 1, 1)

# The compiled exact GELU's (tinylm.kernels.native, cpu.c) coefficients, float32: erf's
# rational above rescaled to Phi(x) = 1/2 + x A(x^2) / B(x^2) with A_k = P_k / (2^k 2
# sqrt 2), B_k = Q_k / 2^k (erf(t) = t P(t^2) / Q(t^2) at t = x / sqrt 2; the same fit,
# so erf's error analysis holds), then the clip in x (3.92 sqrt 2) and 1 / sqrt(2 pi).
GELU_RATIONAL = np.array(
    [p / (2**k * 2 * math.sqrt(2.0)) for k, p in enumerate(_ERF_P)]
    + [q / 2**k for k, q in enumerate(_ERF_Q)]
    + [_ERF_CLIP * math.sqrt(2.0), _INV_SQRT_2PI], dtype=np.float32)


def default_cache_dir() -> str:
    """Where tinylm keeps files it can make again (token caches, compiled kernels,
    downloads): ``$TINYLM_CACHE``, else ``$XDG_CACHE_HOME/tinylm``, else
    ``~/.cache/tinylm``."""
    if os.environ.get("TINYLM_CACHE"):
        return os.environ["TINYLM_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tinylm")


# Arrays of at least this many bytes come from ``reusable_empty``'s pool: glibc serves
# them by mmap (its threshold tops out at 32 MB), so each is page-faulted anew; in a VM
# that hands freed guest memory back to the host, a fresh 206 MB (GPT-2's logits) costs
# 0.4-0.5 s of faults at a step's peak against ~35 ms when its pages are kept.
REUSE_MIN_BYTES = 64 << 20
_REUSABLE: dict = {}


def reusable_empty(key, shape, dtype) -> np.ndarray:
    """An uninitialised NumPy array, the one handed out for ``key`` last time when
    nothing else refers to it any more (no array, view or buffer of it is alive: its
    reference count says so), else a new one, kept for next time. For large per-step
    arrays that an op fills completely (a gradient); small ones are np.empty."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    if math.prod(shape) * dtype.itemsize < REUSE_MIN_BYTES:
        return np.empty(shape, dtype)
    import sys

    array = _REUSABLE.get(key)
    # references: the pool's, ``array`` here, getrefcount's argument: 3 when free
    if array is not None and array.shape == shape and array.dtype == dtype \
            and sys.getrefcount(array) == 3:
        return array
    array = _REUSABLE[key] = np.empty(shape, dtype)
    return array


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; True when it took effect.

    Process-wide, so commands call it (``tinylm train``), never a library import. By
    default glibc serves each array above its adaptive mmap threshold with a fresh
    mmap and hands freed heap tops back to the OS, so every step's large activations
    page-fault anew: on the nanoGPT character recipe ~6,500 minor faults per step,
    ~18 ms of system time (a sixth of the step). Arrays up to 32 MB from the heap
    (glibc's own ceiling for the adaptive threshold) and no trimming below 128 MB
    free remove nearly all of them (15k faults in 60 steps instead of 390k) with the
    same peak RSS (108 MB either way). A no-op off glibc, and when the user set
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (their choice wins).
    """
    import ctypes
    import os

    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not a glibc-style libc (macOS, Windows)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 128 << 20))


def raw_module(source: str, options: tuple = ()):
    """Compile a CUDA source holding several kernels; ``.get_function(name)`` gives one."""
    if _cupy is None:
        raise DeviceError("CUDA kernels need CuPy; install the `cuda` extra")
    return _cupy.RawModule(code=source, options=options)


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if _cupy is not None and cuda_available():
        _cupy.cuda.get_current_stream().synchronize()


# --------------------------------------------------------------------------- RNG
# One seeded generator per backend. ``seed(n)`` resets both, so one seed gives the
# same run, bit for bit, on the same machine.

_generators: dict = {}
_seed_value = 0


def seed(value: int) -> None:
    """Seed every backend's generator (and forget the old streams)."""
    global _seed_value
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise DeviceError(f"seed must be a non-negative integer, got {value!r}")
    _seed_value = int(value)
    _generators.clear()


def rng(xp=np):
    """The seeded generator of backend ``xp`` (``numpy.random.Generator`` or CuPy's)."""
    gen = _generators.get(xp.__name__)
    if gen is None:
        gen = xp.random.default_rng(_seed_value)
        _generators[xp.__name__] = gen
    return gen


def get_rng_state() -> dict:
    """The NumPy generator's state (JSON-serialisable), for exact resume."""
    return {"seed": _seed_value, "numpy": rng(np).bit_generator.state}


def set_rng_state(state: dict) -> None:
    seed(state["seed"])
    rng(np).bit_generator.state = state["numpy"]
