"""Mixed precision: half-precision matrix products, float32 everything else.

    scaler = amp.LossScaler()                       # dynamic loss scaling (float16)
    with amp.autocast("float16"):
        loss = ops.cross_entropy(model(x), y)       # linear layers run in float16
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt, model.parameters())            # unscale, skip on inf/nan, adapt

The policy is torch.autocast's in small: parameters stay float32 (the master
weights); inside ``autocast`` a Linear casts its input and weights to the compute
dtype, so the GEMMs run in half precision (on a GPU cuBLAS accumulates them in
float32); norms, softmax and cross-entropy upcast half inputs and compute in float32.
The ``Cast`` op's backward turns gradients back into float32, so the optimizer only
ever sees float32 gradients of float32 weights.

float16 gradients underflow without loss scaling: ``LossScaler`` multiplies the
loss by a large scale before backward, divides the gradients by it before the step,
and skips the step (halving the scale) when a gradient overflowed; after
``growth_interval`` good steps in a row it doubles the scale again.

NumPy and CuPy have no bfloat16 array type, so "bfloat16" is not a compute dtype
here: bf16 exists as checkpoint storage (``checkpoint``) and inside the attention
kernel (``kernels.flash_attention``).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from tinylm.errors import TinyLMError

_state = threading.local()
HALF_DTYPES = ("float16",)


def compute_dtype():
    """The dtype matrix products use right now (None outside ``autocast``)."""
    return getattr(_state, "dtype", None)


@contextlib.contextmanager
def autocast(dtype="float16", enabled: bool = True):
    if dtype not in HALF_DTYPES:
        raise TinyLMError(f"autocast dtype must be one of {HALF_DTYPES}, got {dtype!r}")
    previous = compute_dtype()
    _state.dtype = np.dtype(dtype) if enabled else None
    try:
        yield
    finally:
        _state.dtype = previous


def cast_for_matmul(*tensors):
    """Inside ``autocast``: the floating tensors cast to the compute dtype."""
    dtype = compute_dtype()
    if dtype is None:
        return tensors
    return tuple(
        t if t is None or t.dtype.kind != "f" or t.dtype == dtype else t.astype(dtype)
        for t in tensors
    )


def float32_if_half(t):
    """Inside ``autocast``: half tensors upcast (norms, softmax, losses run in float32)."""
    if compute_dtype() is None or t.dtype != np.float16:
        return t
    return t.astype(np.float32)


class LossScaler:
    """Dynamic loss scaling with torch.cuda.amp.GradScaler's rules and defaults."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True):
        if not (growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval > 0):
            raise TinyLMError("LossScaler needs growth_factor > 1, 0 < backoff_factor < 1 "
                              "and growth_interval > 0")
        self.scale_value = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.enabled = growth_interval, enabled
        self.good_steps = 0

    def scale(self, loss):
        return loss * self.scale_value if self.enabled else loss

    def unscale(self, params) -> bool:
        """Divide every gradient by the scale; True when all are finite."""
        params = [p for p in params if p.grad is not None]
        if not self.enabled:
            return True
        inv = 1.0 / self.scale_value
        finite = True
        for p in params:
            p.grad = p.grad * p.grad.dtype.type(inv)  # never in place: grads may be shared
            finite = finite and bool(p.xp.isfinite(p.grad).all())
        return finite

    def step(self, optimizer, params) -> bool:
        """Unscale, then step unless a gradient overflowed; adapts the scale.
        Returns whether the optimizer stepped."""
        finite = self.unscale(params)
        if finite:
            optimizer.step()
        self.update(finite)
        return finite

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale_value *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale_value *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])
        self.good_steps = int(state["good_steps"])
