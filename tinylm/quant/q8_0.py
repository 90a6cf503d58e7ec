"""Q8_0: GGML's 8-bit blocks, 32 weights in 34 bytes (8.5 bits per weight).

One block::

    byte  0    2                                              34
          +----+-----------------------------------------------+
          | d  | q[0] q[1] ... q[31]                           |
          +----+-----------------------------------------------+
           f16  int8 each; weight j = d * q[j]

Quantizing (llama.cpp's ``quantize_row_q8_0_ref``, in float32):
``d = max|x| / 127``, ``q = roundf(x / d)`` computed as ``x * (1/d)`` (0 when d is 0),
ties away from zero, then ``d`` is stored as a half. Worked example: a block whose
largest magnitude is 2.54 has d = 0.02, so 1.0 -> q = 50 and -0.01 -> q = -1 (0.5 rounds
away from zero).

Non-finite input (the rules of ``gguf.quants``, bit for bit): a block holding a NaN
gets d = NaN and codes 0; a block holding ±inf gets d = inf and codes 0 where x*(1/d)
is NaN (the inf itself), so the whole block dequantizes to NaN either way. A finite
block whose d overflows a half (max|x| > 65504*127) stores d = inf; a block so small
that 1/d overflows float32 stores codes 0.
"""

from __future__ import annotations

import numpy as np

from tinylm.quant.base import (
    BlockFormat, f16_bytes, f16_values, reciprocal, round_half_away, to_codes,
)


class Q8_0(BlockFormat):
    name = "q8_0"
    block_size = 32
    block_bytes = 34
    ggml_type = "Q8_0"

    def quantize_blocks(self, blocks):
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # (n, 1)
        inv = reciprocal(d)
        with np.errstate(invalid="ignore"):
            q = round_half_away(blocks * inv)                                # (n, 32)
        codes = to_codes(q, -128, 127, np.int8).view(np.uint8)
        return np.concatenate([f16_bytes(d), codes], axis=1)

    def dequantize_blocks(self, raw):
        d = f16_values(raw[:, :2])                                           # (n, 1)
        return raw[:, 2:].view(np.int8).astype(np.float32) * d
