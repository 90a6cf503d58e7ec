"""Test helpers for tinylm and its plugins: gradcheck, assert_close, Hypothesis strategies.

A plugin author checks a new op in three lines::

    from tinylm import testing

    x = np.random.default_rng(0).standard_normal((3, 4))      # float64
    testing.gradcheck(lambda t: my_op(t) * 2, x)              # backward vs finite differences
    testing.assert_close(my_op(Tensor(x)), reference(x))      # forward vs a reference

``gradcheck`` and ``assert_close`` need only NumPy (and CuPy for GPU arrays). The
Hypothesis strategies (``shapes``, ``broadcastable_shapes``, ``arrays``,
``positive_arrays``, ``axes``, ``reduction_case``) import Hypothesis when first called,
so ``import tinylm.testing`` works without it.
"""

from __future__ import annotations

import numpy as np

from tinylm import backend
from tinylm.autograd import no_grad
from tinylm.errors import TinyLMError
from tinylm.tensor import Tensor

__all__ = [
    "gradcheck", "assert_close", "to_numpy",
    "shapes", "broadcastable_shapes", "arrays", "positive_arrays", "axes", "reduction_case",
]

# --------------------------------------------------------------------------- conversion


def to_numpy(x) -> np.ndarray:
    """A NumPy array from a Tensor, a NumPy/CuPy array, a torch tensor or a number."""
    if isinstance(x, Tensor):
        return x.numpy()
    if type(x).__module__.split(".")[0] == "torch":  # no torch import needed to spot one
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.cpu().numpy()
    return backend.to_numpy(x)


# --------------------------------------------------------------------------- assert_close

# Default tolerances by the least precise dtype compared (those of torch.testing).
_TOLERANCES = {
    np.dtype(np.float16): (1e-3, 1e-5),
    np.dtype(np.float32): (1.3e-6, 1e-5),
    np.dtype(np.float64): (1e-7, 1e-7),
}


def _index(flat: int, shape: tuple) -> tuple:
    """A flat position as a tuple of Python ints (prints as (1, 2))."""
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _max_rel(err, ref, bad) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(bad, err / np.abs(ref), 0.0)
    return float(np.max(np.where(np.isnan(rel), np.inf, rel)))


def _default_tolerances(*arrays) -> tuple:
    rtol, atol = 0.0, 0.0
    for a in arrays:
        r, t = _TOLERANCES.get(a.dtype, (0.0, 0.0))  # integers and bools: exact
        rtol, atol = max(rtol, r), max(atol, t)
    return rtol, atol


def assert_close(actual, expected, rtol=None, atol=None, msg: str = "") -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    Either side may be a Tensor, a NumPy or CuPy array, a torch tensor or a number.
    Shapes must be equal (no broadcasting); NaNs must sit in the same places. Without
    ``rtol``/``atol`` the tolerances follow the less precise dtype of the two (float64:
    1e-7, float32: 1.3e-6 relative and 1e-5 absolute). The failure message names the
    worst element, the largest errors and how many elements are off.
    """
    a, e = to_numpy(actual), to_numpy(expected)
    d_rtol, d_atol = _default_tolerances(a, e)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    prefix = f"{msg}: " if msg else ""
    if a.shape != e.shape:
        raise AssertionError(f"{prefix}shape mismatch: actual {a.shape} vs expected {e.shape}")
    if a.dtype == bool or e.dtype == bool:
        a, e = a.astype(np.int8), e.astype(np.int8)
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    nan_a, nan_e = np.isnan(a64), np.isnan(e64)
    if (nan_a != nan_e).any():
        idx = _index(int(np.argmax(nan_a != nan_e)), a.shape)
        raise AssertionError(
            f"{prefix}NaN mismatch at index {idx}: actual {float(a64[idx])!r}, "
            f"expected {float(e64[idx])!r}"
        )
    # Equal infinities are close; otherwise the difference is taken where both are finite.
    with np.errstate(invalid="ignore", over="ignore"):
        same = (a64 == e64) | (nan_a & nan_e)
        err = np.where(same, 0.0, np.abs(a64 - e64))
        bad = err > atol + rtol * np.abs(e64)
        bad |= ~same & ~(np.isfinite(a64) & np.isfinite(e64))
    if not bad.any():
        return
    err = np.where(np.isnan(err), np.inf, err)
    worst = _index(int(np.argmax(np.where(bad, err, -1.0))), a.shape)
    raise AssertionError(
        f"{prefix}{int(bad.sum())} of {a.size} elements differ beyond rtol={rtol:g}, "
        f"atol={atol:g}; max abs error {err.max():.3e}, max rel error "
        f"{_max_rel(err, e64, bad):.3e}; worst at index {worst}: "
        f"actual {float(a64[worst])!r}, expected {float(e64[worst])!r}"
    )


# --------------------------------------------------------------------------- gradcheck


def _flat_outputs(out) -> list:
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    for o in outs:
        if not isinstance(o, Tensor):
            raise TinyLMError(
                f"gradcheck: fn must return a Tensor or a tuple of Tensors, got {type(o).__name__}"
            )
    return outs


def _is_float(a) -> bool:
    return getattr(a, "dtype", None) is not None and np.dtype(a.dtype).kind == "f"


def gradcheck(fn, *inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-4, seed: int = 0):
    """Check ``fn``'s backward against central finite differences; True or AssertionError.

    ``inputs`` are arrays or Tensors (NumPy or CuPy). Floating-point ones must be
    float64 and are differentiated; integer and boolean ones (class targets, masks) and
    anything else (None, numbers) are passed to ``fn`` as constants. ``fn`` takes one
    Tensor per input and returns a Tensor or a tuple of Tensors.

    A random output cotangent ``c`` (seeded) turns the outputs into the scalar
    ``L = sum(out * c)``; backward gives dL/dx for every input, compared elementwise with
    ``(L(x + eps e_i) - L(x - eps e_i)) / (2 eps)``. Tolerance: ``atol + rtol * |numeric|``.
    ``fn`` must be deterministic (seed any dropout inside it). Meant for small inputs:
    it evaluates ``fn`` twice per element.

        >>> import numpy as np
        >>> gradcheck(lambda x: x * x, np.array([1.0, -2.0]))
        True
    """
    arrays, wrt = _differentiable_inputs(inputs)
    analytic, cots = _analytic_gradients(fn, arrays, wrt, seed)

    def loss(args) -> float:
        with no_grad():
            o = _flat_outputs(fn(*_as_tensors(args, wrt, False)))
        return float(sum(float((oi.data.astype(np.float64) * c).sum()) for oi, c in zip(o, cots)))

    for i in wrt:
        numeric = _numeric_gradient(loss, arrays, i, eps)
        _compare_gradients(i, analytic[i], numeric, eps=eps, atol=atol, rtol=rtol)
    return True


def _differentiable_inputs(inputs) -> tuple:
    """``(arrays, wrt)``: the inputs as arrays (the float ones copied, so perturbing
    them leaves the caller's alone) and the indices of the float ones."""
    arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
    wrt = [i for i, a in enumerate(arrays) if _is_float(a)]
    if not wrt:
        raise TinyLMError("gradcheck: no floating-point input to differentiate")
    for i in wrt:
        if arrays[i].dtype != np.float64:
            raise TinyLMError(
                f"gradcheck: input {i} is {arrays[i].dtype}; finite differences need float64 "
                "inputs (x.astype(np.float64))"
            )
    xp = backend.get_array_module(*[arrays[i] for i in wrt])
    return [xp.array(a, copy=True) if i in wrt else a for i, a in enumerate(arrays)], wrt


def _as_tensors(args, wrt, requires_grad: bool) -> list:
    """What ``fn`` is called with: Tensors for arrays (differentiated ones with
    ``requires_grad``), anything else as it is."""
    out = []
    for i, a in enumerate(args):
        if i in wrt:
            out.append(Tensor(a, requires_grad=requires_grad))
        elif hasattr(a, "dtype") and hasattr(a, "shape"):
            out.append(Tensor(a))
        else:
            out.append(a)
    return out


def _analytic_gradients(fn, arrays, wrt, seed: int) -> tuple:
    """``({input index: dL/dx as float64 NumPy}, cotangents)`` from one backward of
    ``L = sum(out * c)`` with a seeded random cotangent ``c`` per output."""
    xp = backend.get_array_module(*[arrays[i] for i in wrt])
    tensors = _as_tensors(arrays, wrt, True)
    outs = _flat_outputs(fn(*tensors))
    rng = np.random.default_rng(seed)
    cots = [xp.asarray(rng.standard_normal(o.shape)).astype(o.dtype) for o in outs]
    live = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
    if len(live) == 1:
        live[0][0].backward(live[0][1])
    elif live:
        from tinylm import ops

        total = None
        for o, c in live:
            term = ops.sum(ops.mul(o, Tensor(c)))
            total = term if total is None else ops.add(total, term)
        total.backward()
    analytic = {}
    for i in wrt:
        g = tensors[i].grad
        if g is None:
            g = xp.zeros_like(arrays[i])
        elif g.shape != arrays[i].shape:
            raise AssertionError(
                f"gradcheck: input {i}: gradient shape {g.shape} != input shape {arrays[i].shape}"
            )
        elif g.dtype != arrays[i].dtype:
            raise AssertionError(
                f"gradcheck: input {i}: gradient dtype {g.dtype} != input dtype {arrays[i].dtype}"
            )
        analytic[i] = backend.to_numpy(g).astype(np.float64)
    return analytic, cots


def _numeric_gradient(loss, arrays, i: int, eps: float) -> np.ndarray:
    """dL/d(arrays[i]) by central differences, one element at a time (test inputs are
    small); ``arrays[i]`` is perturbed in place and restored."""
    x = arrays[i]
    numeric = np.zeros(x.shape, dtype=np.float64)
    flat = x.reshape(-1)  # a view: perturb in place, restore after
    for j in range(flat.size):
        old = flat[j].item()
        flat[j] = old + eps
        plus = loss(arrays)
        flat[j] = old - eps
        minus = loss(arrays)
        flat[j] = old
        numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
    return numeric


def _compare_gradients(i: int, got, numeric, *, eps: float, atol: float, rtol: float) -> None:
    """Raise the AssertionError that names input ``i``'s worst element, if any is off."""
    err = np.abs(got - numeric)
    bad = ~(err <= atol + rtol * np.abs(numeric))  # NaN counts as bad
    if not bad.any():
        return
    err = np.where(np.isnan(err), np.inf, err)
    idx = _index(int(np.argmax(np.where(bad, err, -1.0))), numeric.shape)
    raise AssertionError(
        f"gradcheck failed for input {i} (shape {numeric.shape}): {int(bad.sum())} of "
        f"{numeric.size} gradient elements wrong; max abs error {err.max():.3e}, max rel "
        f"error {_max_rel(err, numeric, bad):.3e}; worst at index {idx}: "
        f"analytic {float(got[idx])!r}, numeric {float(numeric[idx])!r} "
        f"(eps={eps:g}, atol={atol:g}, rtol={rtol:g})"
    )


# --------------------------------------------------------------------------- strategies


def _hypothesis():
    try:
        import hypothesis.extra.numpy as hnp
        import hypothesis.strategies as st
    except ImportError:
        raise TinyLMError(
            "tinylm.testing strategies need Hypothesis: pip install 'tinylm[test]' "
            "(or pip install hypothesis)"
        ) from None
    return st, hnp


def shapes(min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 4):
    """Array shapes (tuples), small by default so tests stay fast."""
    st, hnp = _hypothesis()
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def broadcastable_shapes(n: int = 2, min_dims: int = 0, max_dims: int = 3, min_side: int = 1,
                         max_side: int = 4):
    """Tuples of ``n`` shapes that broadcast together (NumPy rules), e.g. ((3, 1), (2, 1, 4))."""
    st, hnp = _hypothesis()
    return hnp.mutually_broadcastable_shapes(
        num_shapes=n, min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    ).map(lambda bs: tuple(bs.input_shapes))


_GRID = 64  # unique elements are multiples of 1/64: exact in every float dtype


def _elements(dtype, min_value, max_value, min_abs, unique=False):
    st, _ = _hypothesis()
    dtype = np.dtype(dtype)
    if unique:
        lo, hi = int(np.ceil(min_value * _GRID)), int(np.floor(max_value * _GRID))
        ints = st.integers(lo, hi)
        if min_abs > 0:
            ints = ints.filter(lambda k: abs(k) >= min_abs * _GRID)
        return ints.map(lambda k: k / _GRID)
    width = 8 * dtype.itemsize

    def floats(lo, hi):
        # Bounds the dtype cannot represent exactly move inward to the nearest that it can.
        lo_, hi_ = dtype.type(lo), dtype.type(hi)
        lo = float(lo_ if lo_ >= lo else np.nextafter(lo_, dtype.type(np.inf)))
        hi = float(hi_ if hi_ <= hi else np.nextafter(hi_, dtype.type(-np.inf)))
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                         width=width)

    if min_abs <= 0:
        return floats(min_value, max_value)
    parts = []
    if min_value <= -min_abs:
        parts.append(floats(min_value, -min_abs))
    if max_value >= min_abs:
        parts.append(floats(min_abs, max_value))
    if not parts:
        raise TinyLMError(f"no value in [{min_value}, {max_value}] has magnitude >= {min_abs}")
    return st.one_of(*parts)


def arrays(shape, dtype=np.float64, min_value: float = -3.0, max_value: float = 3.0,
           min_abs: float = 0.0, unique: bool = False):
    """Float arrays with bounded elements (no NaN/inf).

    ``shape``: a tuple or a strategy of tuples. ``min_abs`` keeps elements away from 0
    (relu, abs). ``unique`` makes elements distinct multiples of 1/64, so no two are
    within a finite-difference step of each other (max/min without ties).
    """
    st, hnp = _hypothesis()
    elements = _elements(dtype, min_value, max_value, min_abs, unique)
    return hnp.arrays(np.dtype(dtype), shape, elements=elements, unique=unique)


def positive_arrays(shape, dtype=np.float64, min_value: float = 0.1, max_value: float = 3.0):
    """Arrays with elements in [min_value, max_value] (log, sqrt, division)."""
    if min_value <= 0:
        raise TinyLMError(f"positive_arrays needs min_value > 0, got {min_value}")
    return arrays(shape, dtype, min_value=min_value, max_value=max_value)


def axes(ndim: int, allow_none: bool = True, allow_tuple: bool = True, allow_negative: bool = True):
    """An ``axis`` argument valid for ``ndim`` dims: None, an int or a tuple of distinct
    axes (negative spellings included). For ndim 0 only None (or () without None)."""
    st, _ = _hypothesis()
    options = [st.none()] if allow_none else []
    if ndim == 0:
        return st.one_of(options) if options else st.just(())
    lo = -ndim if allow_negative else 0
    options.append(st.integers(lo, ndim - 1))
    if allow_tuple:
        def spell(picked):
            axes_, flips = picked
            return tuple(a - ndim if f and allow_negative else a for a, f in zip(axes_, flips))

        options.append(
            st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True)
            .flatmap(lambda ax: st.tuples(st.just(ax), st.lists(st.booleans(), min_size=len(ax),
                                                                max_size=len(ax))))
            .map(spell)
        )
    return st.one_of(options)


def reduction_case(dtype=np.float64, min_dims: int = 0, max_dims: int = 3, max_side: int = 4,
                   unique: bool = False):
    """(x, axis, keepdims): an array, a valid axis argument for it and a keepdims flag."""
    st, _ = _hypothesis()

    @st.composite
    def case(draw):
        shape = draw(shapes(min_dims=min_dims, max_dims=max_dims, max_side=max_side))
        x = draw(arrays(shape, dtype, unique=unique))
        return x, draw(axes(len(shape))), draw(st.booleans())

    return case()
