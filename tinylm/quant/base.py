"""What every quantized weight format is: a name, a block, a byte layout, and the two maps.

A format turns a float array into packed bytes and back::

    raw = fmt.quantize(w)              # uint8; w's last axis a multiple of fmt.block_size
    w2 = fmt.dequantize(raw, w.shape)  # float32, w.shape

Block formats (the GGUF ones) cut each row into blocks of ``block_size`` consecutive
weights and store each block in ``block_bytes`` bytes; ``quantize`` returns
``(*shape[:-1], row_bytes)`` uint8, the array a GGUF file holds for the tensor (and
what ``gguf.quants.quantize`` returns). A subclass writes only the two block maps,
``(n_blocks, block_size) float32 <-> (n_blocks, block_bytes) uint8``; this class
checks shapes, and works through the blocks in chunks of ``CHUNK_WEIGHTS`` weights
so that the float temporaries stay a few MB whatever the tensor's size (vectorised
within a chunk; no loop over blocks or rows).
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.errors import TinyLMError

CHUNK_WEIGHTS = 1 << 21  # weights per vectorised step (8 MB of float32)


class QuantError(TinyLMError, ValueError):
    """A tensor a format cannot hold (shape, values) or packed bytes that do not fit."""


class QuantFormat:
    """A quantized weight format. Subclasses set the class attributes and the maps.

    ``ggml_type`` is the GGML type name a GGUF file stores it as (None: tinylm's own,
    kept in safetensors). ``bits_per_weight`` counts everything stored, scales included.
    """

    name: str = ""
    block_size: int | None = None   # weights per block along the last axis (None: a row)
    block_bytes: int | None = None  # bytes per block (None: no fixed per-block size)
    ggml_type: str | None = None
    can_quantize: bool = True

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size

    def nbytes(self, shape) -> int:
        """Bytes that hold a tensor of ``shape``."""
        shape = self.check_shape(shape)
        return math.prod(shape) // self.block_size * self.block_bytes

    def check_shape(self, shape) -> tuple:
        shape = tuple(int(n) for n in shape)
        if not shape or any(n < 0 for n in shape):
            raise QuantError(f"{self.name}: shape {shape} is not a tensor shape; give at "
                             f"least one axis, none negative")
        if self.block_size and shape[-1] % self.block_size:
            raise QuantError(f"{self.name} packs rows in blocks of {self.block_size} weights: "
                             f"the last axis of shape {shape} is not a multiple of it; "
                             f"skip this tensor or pick a format with a smaller block")
        return shape

    def quantize(self, x) -> np.ndarray:
        raise NotImplementedError

    def dequantize(self, raw, shape) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<quant format {self.name}: {self.bits_per_weight:g} bits per weight>"


class BlockFormat(QuantFormat):
    """A format of fixed-size blocks along the last axis; subclasses write the block maps."""

    def quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """``(n, block_size)`` float32 -> ``(n, block_bytes)`` uint8."""
        raise NotImplementedError

    def dequantize_blocks(self, raw: np.ndarray) -> np.ndarray:
        """``(n, block_bytes)`` uint8 -> ``(n, block_size)`` float32."""
        raise NotImplementedError

    def quantize(self, x) -> np.ndarray:
        if not self.can_quantize:
            raise QuantError(f"tinylm reads {self.name} but cannot write it; quantize to "
                             f"q8_0, q4_0 or q4_1 instead")
        x = np.asarray(x)
        shape = self.check_shape(x.shape)
        if x.dtype.kind not in "fiub":
            raise QuantError(f"{self.name} quantizes numbers, not {x.dtype} arrays")
        blocks = x.reshape(-1, self.block_size)
        out = np.empty((blocks.shape[0], self.block_bytes), np.uint8)
        step = max(1, CHUNK_WEIGHTS // self.block_size)
        for start in range(0, blocks.shape[0], step):  # chunks bound the temporaries
            chunk = blocks[start:start + step].astype(np.float32, copy=False)
            out[start:start + step] = self.quantize_blocks(chunk)
        return out.reshape(*shape[:-1], shape[-1] // self.block_size * self.block_bytes)

    def dequantize(self, raw, shape) -> np.ndarray:
        shape = self.check_shape(shape)
        blocks = as_blocks(raw, self.nbytes(shape), self.block_bytes, self.name)
        out = np.empty((blocks.shape[0], self.block_size), np.float32)
        step = max(1, CHUNK_WEIGHTS // self.block_size)
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0: NaN, by the rules
            for start in range(0, blocks.shape[0], step):
                out[start:start + step] = self.dequantize_blocks(blocks[start:start + step])
        return out.reshape(shape)


def as_blocks(raw, nbytes: int, block_bytes: int, name: str) -> np.ndarray:
    """``raw`` (any uint8 array or bytes of ``nbytes`` bytes) as ``(n, block_bytes)`` uint8,
    without a copy when it is contiguous (a memory-mapped tensor stays on disk)."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, np.uint8)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise QuantError(f"{name}: packed data must be uint8 bytes, got {raw.dtype}")
    if raw.size != nbytes:
        raise QuantError(f"{name}: {raw.size} bytes of packed data where the shape needs "
                         f"{nbytes}; the data and the shape do not belong together")
    return raw.reshape(-1, block_bytes)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's ``roundf`` (ties away from zero), exact in float32: 2.5 -> 3, -0.5 -> -1.

    ``floor(|v|)`` and ``|v| - floor(|v|)`` are exact in float arithmetic, so the
    tie test is exact too (``floor(v + 0.5)`` is not: 0.49999997 + 0.5 rounds to 1).
    """
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= 0.5), v)


def to_codes(q: np.ndarray, low: int, high: int, dtype) -> np.ndarray:
    """Rounded floats to integer codes in ``[low, high]``; a NaN or infinite value is code
    0 (the value NumPy's float-to-int cast gives on x86 and ARM, which ``gguf.quants``
    relies on; done explicitly here, so it holds on every machine)."""
    q = np.where(np.isfinite(q), q, 0)
    return np.clip(q, low, high).astype(dtype)


def reciprocal(d: np.ndarray) -> np.ndarray:
    """1 / d, with 0 where d is 0 (GGML's ``id = d ? 1/d : 0`` for a block's scale)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def f16_bytes(v: np.ndarray) -> np.ndarray:
    """``(n, 1)`` float32 -> ``(n, 2)`` uint8: little-endian IEEE half (round to nearest
    even; too large -> inf; NaN stays NaN)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype("<f2").view(np.uint8)


def f16_values(b: np.ndarray) -> np.ndarray:
    """``(n, 2)`` uint8 (little-endian halves) -> ``(n, 1)`` float32."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def split_nibbles(packed: np.ndarray) -> np.ndarray:
    """``(n, k)`` uint8 -> ``(n, 2k)``: the k low nibbles, then the k high nibbles.

    The GGML 4-bit layout: weight ``j`` of a 32-weight block is the low nibble of
    byte ``j`` and weight ``j + 16`` the high nibble of the same byte.
    """
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def join_nibbles(codes: np.ndarray) -> np.ndarray:
    """The inverse of ``split_nibbles``: ``(n, 2k)`` codes 0..15 -> ``(n, k)`` uint8."""
    half = codes.shape[-1] // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).astype(np.uint8)
