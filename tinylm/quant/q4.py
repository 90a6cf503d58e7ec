"""Q4_0 and Q4_1: GGML's 4-bit blocks of 32 weights, symmetric and with a minimum.

Both pack the 32 codes two per byte, weight j in the low nibble of byte j and weight
j + 16 in the high nibble::

    Q4_0, 18 bytes (4.5 bits per weight)        Q4_1, 20 bytes (5 bits per weight)
    byte 0    2                      18         byte 0    2    4                      20
         +----+----------------------+               +----+----+----------------------+
         | d  | 16 bytes of nibbles  |               | d  | m  | 16 bytes of nibbles  |
         +----+----------------------+               +----+----+----------------------+
          f16  weight j = d*(q[j]-8)                  f16  f16  weight j = d*q[j] + m

    byte 2+i (Q4_0) / 4+i (Q4_1):  bits 7..4 = q[i+16], bits 3..0 = q[i]

Quantizing (llama.cpp's ``quantize_row_q4_0_ref`` / ``_q4_1_ref``, in float32):

- Q4_0: ``max`` is the weight of largest magnitude *with its sign* (the first one if
  several), ``d = max / -8``, ``q = min(15, trunc(x*(1/d) + 8.5))``: the extreme weight
  maps to code 0 exactly and the other side reaches at most +7 (code 15).
  Worked example: max = 4.0 gives d = -0.5; x = -1.0 -> trunc(2 + 8.5) = 10, which
  dequantizes to -0.5 * (10 - 8) = -1.0.
- Q4_1: ``d = (max - min) / 15``, ``m = min``, ``q = min(15, trunc((x - min)*(1/d) + 0.5))``.

``1/d`` is 0 when d is 0 (an all-zero or, for Q4_1, constant block: codes 8 / 0, and
Q4_1's m carries the constant, rounded to a half).

Non-finite input (the rules of ``gguf.quants``, bit for bit): any code whose float is
NaN or infinite is 0. A NaN in a block makes d (and Q4_1's m) NaN. An inf makes d
infinite, so 1/d = 0: in Q4_0 the other weights get code 8 and the inf itself code 0
(it dequantizes back to ±inf, the rest to NaN, 0 * inf); in Q4_1 every weight
dequantizes to NaN.
"""

from __future__ import annotations

import numpy as np

from tinylm.quant.base import (
    BlockFormat, f16_bytes, f16_values, join_nibbles, reciprocal, split_nibbles, to_codes,
)


class Q4_0(BlockFormat):
    name = "q4_0"
    block_size = 32
    block_bytes = 18
    ggml_type = "Q4_0"

    def quantize_blocks(self, blocks):
        first = np.argmax(np.abs(blocks), axis=1)[:, None]                   # (n, 1)
        d = np.take_along_axis(blocks, first, axis=1) / np.float32(-8)       # (n, 1)
        with np.errstate(invalid="ignore"):
            q = np.trunc(blocks * reciprocal(d) + np.float32(8.5))          # (n, 32)
        return np.concatenate([f16_bytes(d), join_nibbles(to_codes(q, 0, 15, np.uint8))],
                              axis=1)

    def dequantize_blocks(self, raw):
        d = f16_values(raw[:, :2])                                           # (n, 1)
        q = split_nibbles(raw[:, 2:]).astype(np.int8) - np.int8(8)           # (n, 32)
        return d * q.astype(np.float32)


class Q4_1(BlockFormat):
    name = "q4_1"
    block_size = 32
    block_bytes = 20
    ggml_type = "Q4_1"

    def quantize_blocks(self, blocks):
        lo = blocks.min(axis=1, keepdims=True)                               # (n, 1)
        hi = blocks.max(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", over="ignore"):
            d = (hi - lo) / np.float32(15)
            q = np.trunc((blocks - lo) * reciprocal(d) + np.float32(0.5))   # (n, 32)
        codes = join_nibbles(to_codes(q, 0, 15, np.uint8))
        return np.concatenate([f16_bytes(d), f16_bytes(lo), codes], axis=1)

    def dequantize_blocks(self, raw):
        d = f16_values(raw[:, :2])                                           # (n, 1)
        m = f16_values(raw[:, 2:4])
        return d * split_nibbles(raw[:, 4:]).astype(np.float32) + m
