"""NF4: QLoRA's 4-bit NormalFloat, blocks of 64 weights with a float32 absmax each,
optionally with the absmax double-quantized to 8 bits (tinylm's own in files; GGUF has
no such type).

The 16 code values are the published NF4 table: Dettmers et al., "QLoRA: Efficient
Finetuning of Quantized LLMs" (2023), Appendix E, as bitsandbytes ships them
(``bitsandbytes.functional.get_4bit_type("nf4")``): quantiles of N(0, 1) scaled to
[-1, 1], with an exact 0. Quantizing (bitsandbytes' ``quantize_4bit``, in float32)::

    absmax = max |x| over the block                         (a zero block: 0)
    s = clip(x * (1 / max(absmax, 1e-38)), -1, 1)
    code = the index of the table value nearest s; a tie (s exactly half-way) goes down
    x ~ NF4_CODE[code] * absmax

Worked example: a block whose absmax is 2.0 stores 0.5 as s = 0.25, nearest 0.2461 ->
code 10, which dequantizes to 0.4922.

Two codes a byte, the *first* weight in the high nibble (bitsandbytes' order, the
opposite of GGML's)::

    byte i = code[2i] << 4 | code[2i+1]

Double quantization (``nf4-dq``, bitsandbytes' ``compress_statistics=True``):
``offset = mean(absmax)`` (float32), and ``absmax - offset`` is stored 8-bit blockwise
(blocks of 256, ``tinylm.quant.blockwise8``); ``absmax ~ code8[q] * absmax2 + offset``.

Packed bytes, back to back (n weights, b = n/64 blocks)::

    nf4 (4.5 bits per weight):
        | codes: n/2 bytes | absmax: float32 x b |
    nf4-dq (about 4.127 bits per weight):
        | codes: n/2 bytes | q: uint8 x b | absmax2: float32 x ceil(b/256) | offset: float32 |

The last axis must be a multiple of 64 (blocks never straddle rows). Non-finite
weights are refused (a ``QuantError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinylm.quant.base import QuantError, QuantFormat, as_blocks
from tinylm.quant.blockwise8 import DOUBLE_QUANT_BLOCK, dequantize_blockwise8, quantize_blockwise8

NF4_BLOCK = 64
NF4_CODE = np.float32([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)


@dataclass(frozen=True)
class NF4Parts:
    """A quantized tensor's arrays: ``codes`` (n/2,) uint8 and either ``absmax`` (b,)
    float32 or its double quantization ``qabsmax`` (b,) uint8, ``absmax2``, ``offset``."""

    codes: np.ndarray
    absmax: np.ndarray | None = None
    qabsmax: np.ndarray | None = None
    absmax2: np.ndarray | None = None
    offset: np.float32 | None = None

    def block_absmax(self) -> np.ndarray:
        """The float32 absmax of every block (dequantized when double-quantized)."""
        if self.absmax is not None:
            return self.absmax
        return dequantize_blockwise8(self.qabsmax, self.absmax2) + self.offset


def quantize_nf4(x, double_quant: bool = False) -> NF4Parts:
    """``x`` (last axis a multiple of 64) -> its ``NF4Parts``; blocks run along the flat array."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % NF4_BLOCK:
        raise QuantError(f"nf4 packs rows in blocks of {NF4_BLOCK} weights: the last axis of "
                         f"shape {x.shape} is not a multiple of it; skip this tensor")
    if not np.isfinite(x).all():
        raise QuantError("nf4: the weight holds NaN or inf; quantization needs finite values "
                         "(check the model that produced it)")
    blocks = x.reshape(-1, NF4_BLOCK)                                    # (b, 64)
    absmax = np.abs(blocks).max(axis=1, initial=0)                       # (b,)
    inv = np.float32(1) / np.maximum(absmax, np.float32(1e-38))
    scaled = np.clip(blocks * inv[:, None], -1, 1)
    idx = np.searchsorted(_MIDPOINTS, scaled, side="left").astype(np.uint8).reshape(-1)
    codes = (idx[0::2] << 4) | idx[1::2]                                 # first weight high
    if not double_quant:
        return NF4Parts(codes, absmax=absmax)
    offset = np.float32(absmax.astype(np.float64).mean()) if absmax.size else np.float32(0)
    qabsmax, absmax2 = quantize_blockwise8(absmax - offset, DOUBLE_QUANT_BLOCK)
    return NF4Parts(codes, qabsmax=qabsmax, absmax2=absmax2, offset=offset)


def dequantize_nf4(codes, absmax, shape) -> np.ndarray:
    """Packed codes (n/2,) and float32 ``absmax`` (n/64,) -> float32 ``shape``."""
    codes = np.asarray(codes).reshape(-1)
    idx = np.stack([codes >> 4, codes & 0x0F], axis=1).reshape(-1, NF4_BLOCK)  # (b, 64)
    out = NF4_CODE[idx] * np.asarray(absmax, np.float32).reshape(-1, 1)
    return out.reshape(shape)


class NF4(QuantFormat):
    """``NF4()``: plain float32 absmax; ``NF4(double_quant=True)``: the 8-bit absmax."""

    block_size = NF4_BLOCK

    def __init__(self, double_quant: bool = False):
        self.double_quant = bool(double_quant)
        self.name = "nf4-dq" if double_quant else "nf4"
        self.block_bytes = None if double_quant else 36

    @property
    def bits_per_weight(self) -> float:
        if self.double_quant:
            return 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
        return 4 + 32 / NF4_BLOCK

    def nbytes(self, shape) -> int:
        n = math.prod(self.check_shape(shape))
        b = n // NF4_BLOCK
        if self.double_quant:
            return n // 2 + b + 4 * -(-b // DOUBLE_QUANT_BLOCK) + 4
        return n // 2 + 4 * b

    def quantize(self, x) -> np.ndarray:
        p = quantize_nf4(x, self.double_quant)
        tail = [p.absmax.astype("<f4").view(np.uint8)] if p.absmax is not None else [
            p.qabsmax, p.absmax2.astype("<f4").view(np.uint8),
            np.float32([p.offset]).astype("<f4").view(np.uint8)]
        return np.concatenate([p.codes, *tail])

    def split(self, raw, shape) -> NF4Parts:
        """Packed bytes -> ``NF4Parts`` (views of ``raw``; the float tails copied)."""
        shape = self.check_shape(shape)
        flat = as_blocks(raw, self.nbytes(shape), 1, self.name).reshape(-1)
        n = math.prod(shape)
        b = n // NF4_BLOCK
        codes, rest = flat[:n // 2], flat[n // 2:]
        if not self.double_quant:
            return NF4Parts(codes, absmax=rest.copy().view("<f4").astype(np.float32))
        b2 = -(-b // DOUBLE_QUANT_BLOCK)
        absmax2 = rest[b:b + 4 * b2].copy().view("<f4").astype(np.float32)
        offset = rest[b + 4 * b2:].copy().view("<f4").astype(np.float32)[0]
        return NF4Parts(codes, qabsmax=rest[:b], absmax2=absmax2, offset=offset)

    def dequantize(self, raw, shape) -> np.ndarray:
        parts = self.split(raw, shape)
        return dequantize_nf4(parts.codes, parts.block_absmax(), self.check_shape(shape))
