"""Rotary position embedding (RoPE) as one fused op.

    y = x * cos + rotate(x) * sin          on the first ``rot_dim`` features of the last
                                           axis; the rest passes through unchanged

``rotate`` turns each feature pair by 90 degrees. Two pairings are in use:

- "half" (GPT-NeoX, Llama, ``rotate_half`` in Hugging Face): feature i pairs with
  i + rot_dim/2, rotate([x1, x2]) = [-x2, x1];
- "interleaved" (GPT-J, the RoFormer paper): feature 2i pairs with 2i + 1,
  rotate(x)[2i] = -x[2i+1], rotate(x)[2i+1] = x[2i].

``cos`` and ``sin`` are constant tables of shape (..., rot_dim) broadcastable to the
rotated part, with each pair's angle written in both of its slots. Partial rotary (GPT-
NeoX's ``rotary_pct``) is a table narrower than the head.

Backward: rotate is a linear map R with R^T = -R, so
dx = g * cos + R^T (g * sin) = g * cos - rotate(g * sin) on the rotated part, g elsewhere.
One node instead of the eight (slice, split, neg, concat, two muls, add, concat) that
composing it would take, each a full-size temporary.
"""

from __future__ import annotations

from tinylm.errors import ShapeError
from tinylm.function import Function


def _rotate(xp, x, interleaved: bool):
    """The 90-degree turn of each feature pair of ``x`` (..., r), a fresh array."""
    out = xp.empty_like(x)
    if interleaved:
        xp.negative(x[..., 1::2], out=out[..., 0::2])
        out[..., 1::2] = x[..., 0::2]
    else:
        h = x.shape[-1] // 2
        xp.negative(x[..., h:], out=out[..., :h])
        out[..., h:] = x[..., :h]
    return out


class Rotary(Function):
    def forward(self, xp, x):
        r = self.cos.shape[-1]
        if r % 2 or r > x.shape[-1]:
            raise ShapeError(
                f"rotary: the table has {r} features; it must be even and at most the "
                f"last axis of the input ({x.shape[-1]})"
            )
        self.cos_, self.sin_ = (xp.asarray(t, dtype=x.dtype) for t in (self.cos, self.sin))
        y = x.copy()
        part = x[..., :r]
        rotated = _rotate(xp, part, self.interleaved)
        rotated *= self.sin_
        y[..., :r] *= self.cos_
        y[..., :r] += rotated
        return y

    def backward(self, xp, grad):
        r = self.cos_.shape[-1]
        g = grad.copy()
        gs = grad[..., :r] * self.sin_
        g[..., :r] *= self.cos_
        g[..., :r] -= _rotate(xp, gs, self.interleaved)
        return g


def rotary(x, cos, sin, interleaved: bool = False):
    """Rotate the first ``cos.shape[-1]`` features of ``x`` by the angles in the tables.

        >>> import numpy as np, tinylm
        >>> x = tinylm.tensor(np.array([[1.0, 0.0, 0.0, 0.0]], np.float32))  # (1, 4)
        >>> a = np.array([np.pi / 2, 0.0, np.pi / 2, 0.0], np.float32)       # pair (0, 2)
        >>> (rotary(x, np.cos(a), np.sin(a)).numpy().round(6) + 0.0).tolist()  # 90 degrees
        [[0.0, 0.0, 1.0, 0.0]]
    """
    xp = x.xp
    cos, sin = xp.asarray(cos), xp.asarray(sin)
    if cos.shape != sin.shape:
        raise ShapeError(f"rotary: cos {cos.shape} and sin {sin.shape} tables differ in shape")
    return Rotary.apply(x, cos=cos, sin=sin, interleaved=bool(interleaved))
