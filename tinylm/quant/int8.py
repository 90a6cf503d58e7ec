"""int8 per-output-channel absmax: one float32 scale per row, int8 codes (tinylm's own;
kept in safetensors, GGUF has no such type).

For a weight ``(out, in)`` (any shape: a "row" is the last axis)::

    scale[r] = max_j |w[r, j]| / 127                      float32, (out,)
    codes[r, j] = roundf(w[r, j] * (1 / scale[r]))        int8 in [-127, 127], (out, in)
    w[r, j] ~ codes[r, j] * scale[r]

the arithmetic of Q8_0 (ties away from zero; a zero row has scale 0 and codes 0) with a
float32 scale over the whole row instead of a half per 32 weights. A linear layer can
compute ``(x @ codes.T) * scale``: the scale is per output, so it leaves the matmul.

Packed bytes (``quantize``/``dequantize``) put the arrays back to back::

    byte 0                         out*in                     out*in + 4*out
         | codes, int8, row-major  | scale, float32 little-endian |

8 bits per weight plus 32 per row. Non-finite weights are refused (a ``QuantError``):
a NaN or inf in a weight is a broken model, not something to store.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.quant.base import QuantError, QuantFormat, as_blocks, round_half_away


def quantize_int8(w) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (..., in) -> ``(codes int8 (..., in), scale float32 (...))``.

    >>> codes, scale = quantize_int8(np.float32([[0.5, -1.27, 0.0]]))
    >>> codes.tolist(), scale.tolist() == [np.float32(1.27) / np.float32(127)]
    ([[50, -127, 0]], True)
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 0:
        raise QuantError("int8 quantizes arrays with at least one axis, not a scalar")
    if not np.isfinite(w).all():
        raise QuantError("int8: the weight holds NaN or inf; quantization needs finite "
                         "values (check the model that produced it)")
    scale = np.abs(w).max(axis=-1, keepdims=True, initial=0) / np.float32(127)  # (..., 1)
    with np.errstate(divide="ignore"):
        inv = np.where(scale == 0, np.float32(0), np.float32(1) / scale)
    q = np.where(np.isfinite(inv), round_half_away(w * inv), 0)  # 1/scale can overflow
    return np.clip(q, -127, 127).astype(np.int8), scale[..., 0]


def dequantize_int8(codes, scale) -> np.ndarray:
    """``codes (..., in)`` int8 and ``scale (...)`` float32 -> float32 ``(..., in)``."""
    return np.asarray(codes).astype(np.float32) * np.asarray(scale, np.float32)[..., None]


class Int8(QuantFormat):
    name = "int8"
    block_size = None  # a block is a whole row
    block_bytes = None

    @property
    def bits_per_weight(self) -> float:
        return 8.0  # plus 32 bits per row for the scale: see nbytes

    def nbytes(self, shape) -> int:
        shape = self.check_shape(shape)
        return math.prod(shape) + 4 * math.prod(shape[:-1])

    def quantize(self, x) -> np.ndarray:
        codes, scale = quantize_int8(x)
        return np.concatenate([codes.reshape(-1).view(np.uint8),
                               scale.astype("<f4").reshape(-1).view(np.uint8)])

    def split(self, raw, shape) -> tuple[np.ndarray, np.ndarray]:
        """Packed bytes -> ``(codes (..., in) int8, scale (...) float32)``, views of ``raw``
        where it is contiguous."""
        shape = self.check_shape(shape)
        flat = as_blocks(raw, self.nbytes(shape), 1, self.name).reshape(-1)
        n = math.prod(shape)
        codes = flat[:n].view(np.int8).reshape(shape)
        return codes, flat[n:].view("<f4").reshape(shape[:-1])

    def dequantize(self, raw, shape) -> np.ndarray:
        return dequantize_int8(*self.split(raw, shape))
