"""Elementwise ops: arithmetic, unary math, activations, selection, comparisons.

Binary ops broadcast like NumPy; their backward returns gradients in the broadcast
shape and the engine sums them back (``autograd.unbroadcast``).
"""

from __future__ import annotations

import math

from tinylm import backend
from tinylm.errors import TinyLMError
from tinylm.function import Function
from tinylm.kernels import native
from tinylm.tensor import Tensor

# --------------------------------------------------------------------------- arithmetic


class Add(Function):
    def forward(self, xp, a, b):
        return a + b

    def backward(self, xp, grad):
        return grad, grad


class Sub(Function):
    def forward(self, xp, a, b):
        return a - b

    def backward(self, xp, grad):
        return grad, -grad


class Mul(Function):
    def forward(self, xp, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, xp, grad):
        ga = grad * self.b if self.needs_input_grad[0] else None
        gb = grad * self.a if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, xp, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, xp, grad):
        gb = None
        ga = grad / self.b
        if self.needs_input_grad[1]:
            gb = -ga * self.a / self.b
        return ga, gb


class Neg(Function):
    def forward(self, xp, a):
        return -a

    def backward(self, xp, grad):
        return -grad


class Pow(Function):
    """a ** b with both differentiable (d/db needs a > 0 where it is used)."""

    def forward(self, xp, a, b):
        self.a, self.b = a, b
        self.y = a**b
        return self.y

    def backward(self, xp, grad):
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = grad * self.b * self.a ** (self.b - 1)
        if self.needs_input_grad[1]:
            safe = xp.where(self.a > 0, self.a, 1)
            gb = grad * self.y * xp.log(safe)
        return ga, gb


class PowScalar(Function):
    """a ** p for a Python number p: the common case, one multiply in backward."""

    def forward(self, xp, a):
        self.a = a
        return a**self.p

    def backward(self, xp, grad):
        p = self.p
        if p == 2:
            return grad * (2 * self.a)
        return grad * (p * self.a ** (p - 1))


def add(a, b):
    return Add.apply(a, b)


def sub(a, b):
    return Sub.apply(a, b)


def mul(a, b):
    return Mul.apply(a, b)


def div(a, b):
    return Div.apply(a, b)


def neg(a):
    return Neg.apply(a)


def pow(a, b):
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return PowScalar.apply(a, p=b)
    return Pow.apply(a, b)


# --------------------------------------------------------------------------- unary math


class Exp(Function):
    def forward(self, xp, x):
        self.y = xp.exp(x)
        return self.y

    def backward(self, xp, grad):
        return grad * self.y


class Log(Function):
    def forward(self, xp, x):
        self.x = x
        return xp.log(x)

    def backward(self, xp, grad):
        return grad / self.x


class Sqrt(Function):
    def forward(self, xp, x):
        self.y = xp.sqrt(x)
        return self.y

    def backward(self, xp, grad):
        return grad / (2 * self.y)


class Abs(Function):
    def forward(self, xp, x):
        self.x = x
        return xp.abs(x)

    def backward(self, xp, grad):
        return grad * xp.sign(self.x)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def sqrt(x):
    return Sqrt.apply(x)


def abs(x):
    return Abs.apply(x)


# --------------------------------------------------------------------------- activations


class Tanh(Function):
    def forward(self, xp, x):
        self.y = xp.tanh(x)
        return self.y

    def backward(self, xp, grad):
        return grad * (1 - self.y * self.y)


class Sigmoid(Function):
    def forward(self, xp, x):
        self.y = _sigmoid(xp, x)
        return self.y

    def backward(self, xp, grad):
        return grad * self.y * (1 - self.y)


class Relu(Function):
    def forward(self, xp, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, xp, grad):
        return grad * self.mask


class Silu(Function):
    """x * sigmoid(x)."""

    def forward(self, xp, x):
        self.x = x
        self.s = _sigmoid(xp, x)
        return x * self.s

    def backward(self, xp, grad):
        s = self.s
        return grad * (s * (1 + self.x * (1 - s)))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def exact_gelu(x, slope: bool):
    """(x Phi(x), Phi(x) + x phi(x) or, without ``slope``, anything): the exact GELU and
    its derivative, as one compiled loop where the CPU kernels take x
    (``kernels.native``: the rational of ``backend.GELU_RATIONAL``, within 2.5e-7 of
    Phi), else ``backend.gelu_forward`` (NumPy passes by blocks; CuPy)."""
    if x.size and native.usable(x):
        return native.gelu_forward(x, backend.GELU_RATIONAL, slope)
    return backend.gelu_forward(x, slope=slope)


class Gelu(Function):
    """GELU, exact (erf) or the tanh approximation of GPT-2 (``approximate="tanh"``).

    After the first product every step works in place on that fresh array: on (B, T, 4d)
    activations the temporaries, not the arithmetic, would dominate. (``xp.asarray``:
    on a 0-d input a product is a scalar, which ``out=`` refuses.)
    """

    approximate = "none"

    def forward(self, xp, x):
        if self.approximate == "tanh":
            self.x = x
            t = xp.asarray(x * x)
            t *= x
            t *= 0.044715
            t += x
            t *= _SQRT_2_OVER_PI
            self.t = xp.tanh(t, out=t)  # tanh(sqrt(2/pi) (x + 0.044715 x^3))
            y = xp.asarray(t + 1)
            y *= x
            y *= 0.5
            return y
        # x Phi(x), and its slope Phi(x) + x phi(x) for the backward (x is not kept)
        y, self.slope = exact_gelu(x, slope=self.needs_grad)
        return y

    def backward(self, xp, grad):
        if self.approximate == "tanh":
            x, t = self.x, self.t
            g = xp.asarray(t * t)
            xp.subtract(1, g, out=g)  # 1 - t^2
            g *= x
            d = xp.asarray(x * x)  # d inner / dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
            d *= 3 * 0.044715
            d += 1
            d *= _SQRT_2_OVER_PI
            g *= d
            g += 1
            g += t
            g *= 0.5  # 0.5 (1 + t) + 0.5 x (1 - t^2) d inner
            g *= grad
            return g
        slope = self.slope
        if self.final_backward and grad.shape == slope.shape and grad.dtype == slope.dtype:
            # the node's last use of its own slope array: the gradient goes into it
            # (no fresh (B, T, 4d) array; the same product)
            return xp.multiply(grad, slope, out=slope)
        return xp.multiply(grad, slope)  # grad (Phi(x) + x phi(x))


def tanh(x):
    return Tanh.apply(x)


def sigmoid(x):
    return Sigmoid.apply(x)


def relu(x):
    return Relu.apply(x)


def silu(x):
    return Silu.apply(x)


def gelu(x, approximate: str = "none"):
    if approximate not in ("none", "tanh"):
        raise TinyLMError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return Gelu.apply(x, approximate=approximate)


def log_sigmoid(x):
    """log s(x) = min(x, 0) - log(1 + exp(-|x|)) of a Tensor, composed from primitives
    so that it neither overflows for large |x| nor loses its gradient at 0: the
    derivative, s(-x), is 1/2 there (exp(-|x|) is taken as exp(x) for x < 0 and
    exp(-x) otherwise, never through abs, whose derivative at 0 is 0). DPO and reward
    losses meet exactly 0 at their first step (the policy equals the reference)."""
    negative = x.data < 0
    low = masked_fill(x, ~negative, 0.0)  # min(x, 0)
    return low - log(exp(where(negative, x, -x)) + 1.0)


def _sigmoid(xp, x):
    # Stable for large |x|: exp only ever sees non-positive arguments.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def erf(xp, x):
    """The error function of an array (NumPy has none; see ``backend.erf``)."""
    return backend.erf(x)


# --------------------------------------------------------------------------- selection


class Where(Function):
    """cond ? a : b, with cond a constant boolean array."""

    def forward(self, xp, cond, a, b):
        self.cond = cond
        return xp.where(cond, a, b)

    def backward(self, xp, grad):
        zero = xp.zeros((), dtype=grad.dtype)
        ga = xp.where(self.cond, grad, zero) if self.needs_input_grad[1] else None
        gb = xp.where(self.cond, zero, grad) if self.needs_input_grad[2] else None
        return None, ga, gb


def where(cond, a, b):
    return Where.apply(cond, a, b)


def masked_fill(x, mask, value):
    """x with ``value`` wherever the (broadcastable) boolean ``mask`` is True."""
    xp = x.xp if isinstance(x, Tensor) else None
    fill = value if xp is None else xp.asarray(value, dtype=x.dtype)
    return Where.apply(mask, fill, x)


# --------------------------------------------------------------------------- comparisons


class _Compare(Function):
    differentiable = False

    def forward(self, xp, a, b):
        return getattr(xp, self.name)(a, b)


def less(a, b):
    return _Compare.apply(a, b, name="less")


def less_equal(a, b):
    return _Compare.apply(a, b, name="less_equal")


def greater(a, b):
    return _Compare.apply(a, b, name="greater")


def greater_equal(a, b):
    return _Compare.apply(a, b, name="greater_equal")


def equal(a, b):
    return _Compare.apply(a, b, name="equal")


# --------------------------------------------------------------------------- dtype, device


class Cast(Function):
    def forward(self, xp, x):
        self.src = x.dtype
        return x.astype(self.dtype)

    def backward(self, xp, grad):
        return grad.astype(self.src)


def cast(x, dtype):
    return Cast.apply(x, dtype=dtype)


class ToDevice(Function):
    def forward(self, xp, x):
        self.src = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, xp, grad):
        return backend.to_device(grad, self.src)


def to_device(x, device: str):
    return ToDevice.apply(x, device=backend.normalize_device(device))
