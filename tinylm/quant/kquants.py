"""Q4_K and Q6_K: GGML's "K-quants", super-blocks of 256 weights (dequantize only).

Q4_K, 144 bytes (4.5 bits per weight): 8 sub-blocks of 32 weights, each with a 6-bit
scale and a 6-bit min, both multiplied by the block's half-precision d / dmin::

    byte 0    2      4               16                                     144
         +----+------+---------------+---------------------------------------+
         | d  | dmin | 12 scale bytes| 128 bytes: 4 chunks of 32 bytes       |
         +----+------+---------------+---------------------------------------+
    chunk c: low nibbles = sub-block 2c, high nibbles = sub-block 2c+1
    weight = d*sc[s] * q - dmin*mn[s]

    the 12 scale bytes s[0..11], for sub-block j (GGML's get_scale_min_k4):
      j < 4:   sc = s[j] & 63                       mn = s[j+4] & 63
      j >= 4:  sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4
               mn = (s[j+4] >> 4) | (s[j] >> 6) << 4

Q6_K, 210 bytes (6.5625 bits per weight): 16 sub-blocks of 16 weights, int8 scales::

    byte 0                 128           192             208  210
         +-----------------+-------------+---------------+----+
         | ql: low 4 bits  | qh: high 2  | 16 int8 scales| d  |
         +-----------------+-------------+---------------+----+
    two halves of 128 weights; half h uses ql[64h:64h+64], qh[32h:32h+32]; for l < 32:
      weight 128h + l      = low nibble  of ql[l]      | bits 0-1 of qh[l] << 4
      weight 128h + 32 + l = low nibble  of ql[l+32]   | bits 2-3 of qh[l] << 4
      weight 128h + 64 + l = high nibble of ql[l]      | bits 4-5 of qh[l] << 4
      weight 128h + 96 + l = high nibble of ql[l+32]   | bits 6-7 of qh[l] << 4
    weight k = d * scale[k // 16] * (q - 32)

The float arithmetic is GGML's order, ``(d*sc)*q - dmin*mn``, in float32, so the
result is bit-exact with ``gguf.quants`` and llama.cpp's ``dequantize_row_q*_K``.
Quantizing K-quants (llama.cpp's iterative scale search) is not implemented.
"""

from __future__ import annotations

import numpy as np

from tinylm.quant.base import BlockFormat, f16_values


class Q4_K(BlockFormat):
    name = "q4_k"
    block_size = 256
    block_bytes = 144
    ggml_type = "Q4_K"
    can_quantize = False

    def dequantize_blocks(self, raw):
        n = raw.shape[0]
        d, dmin = f16_values(raw[:, 0:2]), f16_values(raw[:, 2:4])          # (n, 1)
        a, b, c = raw[:, 4:8], raw[:, 8:12], raw[:, 12:16]                   # (n, 4) each
        sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)     # (n, 8)
        mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
        qs = raw[:, 16:].reshape(n, 4, 1, 32)                                # (n, chunk, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32)     # (n, sub, 32)
        scale = (d * sc.astype(np.float32))[:, :, None]                      # (n, 8, 1)
        low = (dmin * mn.astype(np.float32))[:, :, None]
        return (scale * q.astype(np.float32) - low).reshape(n, 256)


class Q6_K(BlockFormat):
    name = "q6_k"
    block_size = 256
    block_bytes = 210
    ggml_type = "Q6_K"
    can_quantize = False

    def dequantize_blocks(self, raw):
        n = raw.shape[0]
        ql = raw[:, :128].reshape(n, 2, 1, 64)                               # (n, half, 1, 64)
        qh = raw[:, 128:192].reshape(n, 2, 1, 32)                            # (n, half, 1, 32)
        low = np.concatenate([ql[..., :32] & 15, ql[..., 32:] & 15,
                              ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=2)  # (n, 2, 4, 32)
        high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3         # (n, 2, 4, 32)
        q = (low | (high << 4)).astype(np.int8) - np.int8(32)
        scales = raw[:, 192:208].view(np.int8).astype(np.float32)            # (n, 16)
        d = f16_values(raw[:, 208:210])                                      # (n, 1)
        scale = (d * scales)[:, :, None]                                     # (n, 16, 1)
        return (scale * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)
