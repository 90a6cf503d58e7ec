"""The float storage types of GGUF: F32, F16 and BF16 (one weight per "block").

- F32: little-endian float32, unchanged.
- F16: IEEE half, NumPy's conversion (round to nearest even; beyond ±65504 -> ±inf;
  NaN stays NaN with its sign; subnormal halves kept).
- BF16: the top 16 bits of the float32, rounded to nearest, ties to even, as GGML's
  ``ggml_compute_fp32_to_bf16`` (and ``gguf.quants``) does. Worked example: 1.00390625
  is 0x3F808000, exactly half-way between bf16 0x3F80 and 0x3F81: ties to the even one,
  0x3F80 (1.0). A NaN becomes a quiet NaN: its top 16 bits with bit 6 (the quiet bit
  of the bf16 mantissa) set, so a NaN never rounds into inf. ±inf stays ±inf; a finite
  value past the largest bf16 rounds to inf.

``dequantize`` takes the raw bytes (uint8) or the typed array a GGUF reader gives
(float32 / float16, or uint16 bit patterns for BF16).
"""

from __future__ import annotations

import numpy as np

from tinylm.quant.base import BlockFormat


class _Float(BlockFormat):
    block_size = 1
    dtype = ""  # the NumPy dtype of the stored values (BF16: its uint16 bit patterns)

    def dequantize(self, raw, shape):
        raw = np.asarray(raw) if not isinstance(raw, (bytes, bytearray, memoryview)) else raw
        if isinstance(raw, np.ndarray) and raw.dtype == np.dtype(self.dtype):
            raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        return super().dequantize(raw, shape)

    def dequantize_blocks(self, raw):  # F32, F16: the stored values, as float32
        return np.ascontiguousarray(raw).view(self.dtype).astype(np.float32)


class F32(_Float):
    name = "f32"
    block_bytes = 4
    ggml_type = "F32"
    dtype = "<f4"

    def quantize_blocks(self, blocks):
        return blocks.astype("<f4").view(np.uint8)



class F16(_Float):
    name = "f16"
    block_bytes = 2
    ggml_type = "F16"
    dtype = "<f2"

    def quantize_blocks(self, blocks):
        with np.errstate(over="ignore"):
            return blocks.astype("<f2").view(np.uint8)



class BF16(_Float):
    name = "bf16"
    block_bytes = 2
    ggml_type = "BF16"
    dtype = "<u2"

    def quantize_blocks(self, blocks):
        bits = np.ascontiguousarray(blocks, dtype="<f4").view("<u4").astype(np.uint64)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16      # ties to even
        top = np.where(nan, (bits >> 16) | 0x0040, rounded)        # NaN: quiet, no rounding
        return top.astype("<u2").view(np.uint8)

    def dequantize_blocks(self, raw):
        bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
