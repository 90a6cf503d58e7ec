"""bitsandbytes' 8-bit blockwise quantization with its "dynamic" code: the double
quantization of NF4's absmax.

The code (bitsandbytes' ``create_dynamic_map(signed=True)``, after Dettmers, "8-Bit
Approximations for Parallelism in Deep Learning", 2016) is 256 sorted float32 values in
[-1, 1]: for e = 0..6, the 2**e midpoints of ``linspace(0.1, 1, 2**e + 1)`` scaled by
``10**(e - 6)``, both signs, plus 0 and 1. Each of ``DOUBLE_QUANT_BLOCK`` (256)
consecutive values ``v`` is stored as one byte: ``absmax = max|v|``, ``idx`` = the code
nearest ``v / absmax`` (a tie goes to the lower one: the rule of NF4's 4-bit codes),
``v ~ code[idx] * absmax``. An all-zero block stores absmax 0 and the index of 0.0.

The code table is bitsandbytes' bit for bit. The indices are not always: bitsandbytes'
compiled CPU quantizer (0.50) picks the neighbour of the nearest code for values
within about 2e-5 of a midpoint between two codes (its search is approximate), so an
index can differ by one there; the dequantized values then differ by one code step.
"""

from __future__ import annotations

import numpy as np

DOUBLE_QUANT_BLOCK = 256


def _linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace as torch computes it: ``start + step*i`` for the first half,
    ``end - step*(steps-1-i)`` for the rest, each with one rounding (a fused multiply-add)."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(a) + step * i
    high = np.float64(b) - step * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def dynamic_code() -> np.ndarray:
    """The 256 sorted float32 values of bitsandbytes' signed dynamic 8-bit code."""
    values = [np.float32([0.0, 1.0])]
    for e in range(7):
        bounds = _linspace(0.1, 1.0, 2 ** e + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (e - 6)) * means  # float32 product, as torch
        values += [scaled, -scaled]
    return np.sort(np.concatenate(values)).astype(np.float32)


DYNAMIC_CODE = dynamic_code()
_MIDPOINTS = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / np.float32(2)


def quantize_blockwise8(v: np.ndarray, block: int = DOUBLE_QUANT_BLOCK):
    """1-D float32 ``v`` -> ``(idx uint8 (n,), absmax float32 (ceil(n/block),))``; the last
    block may be short."""
    v = np.asarray(v, np.float32).reshape(-1)
    n_blocks = -(-v.size // block)
    padded = np.zeros(n_blocks * block, np.float32)
    padded[:v.size] = v
    blocks = padded.reshape(n_blocks, block)                             # (nb, block)
    absmax = np.abs(blocks).max(axis=1)                                  # pad zeros don't count
    with np.errstate(divide="ignore", invalid="ignore"):
        normed = blocks / absmax[:, None]
    normed = np.where(absmax[:, None] == 0, np.float32(0), normed)
    idx = np.searchsorted(_MIDPOINTS, normed, side="left")               # ties -> lower code
    return idx.reshape(-1)[:v.size].astype(np.uint8), absmax


def dequantize_blockwise8(idx, absmax, block: int = DOUBLE_QUANT_BLOCK) -> np.ndarray:
    """The inverse: ``code[idx] * absmax[i // block]``, float32 (n,)."""
    idx = np.asarray(idx).reshape(-1)
    scale = np.repeat(np.asarray(absmax, np.float32), block)[:idx.size]
    return DYNAMIC_CODE[idx] * scale
