"""The GGML tensor types a GGUF file can name: id -> (name, weights per block, bytes per block).

The ids and sizes are GGML's (``enum ggml_type`` and ``ggml_type_traits`` in ggml.c;
the ``gguf`` package's ``GGML_QUANT_SIZES`` has the same table). A plain type (F32,
I8, ...) is a "block" of one element. Knowing a type here means a GGUF file naming it
can be read and its tensors measured; which of them tinylm can quantize or dequantize
is ``tinylm.quant``'s registry.

    >>> GGML_TYPES["Q8_0"].block_size, GGML_TYPES["Q8_0"].type_size, GGML_TYPES["Q8_0"].id
    (32, 34, 8)
    >>> GGML_TYPES[8].name
    'Q8_0'
"""

from __future__ import annotations

from dataclasses import dataclass

QK_K = 256  # weights per super-block of the K-quants


@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: ``type_size`` bytes hold ``block_size`` consecutive weights."""

    id: int
    name: str
    block_size: int
    type_size: int

    def row_bytes(self, n: int) -> int:
        """Bytes of a row of ``n`` weights (``n`` a multiple of ``block_size``)."""
        return n // self.block_size * self.type_size


_TABLE = [
    # id, name, weights per block, bytes per block
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22), (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 40),
    (10, "Q2_K", QK_K, 84), (11, "Q3_K", QK_K, 110), (12, "Q4_K", QK_K, 144),
    (13, "Q5_K", QK_K, 176), (14, "Q6_K", QK_K, 210), (15, "Q8_K", QK_K, 292),
    (16, "IQ2_XXS", QK_K, 66), (17, "IQ2_XS", QK_K, 74), (18, "IQ3_XXS", QK_K, 98),
    (19, "IQ1_S", QK_K, 50), (20, "IQ4_NL", 32, 18), (21, "IQ3_S", QK_K, 110),
    (22, "IQ2_S", QK_K, 82), (23, "IQ4_XS", QK_K, 136), (24, "I8", 1, 1), (25, "I16", 1, 2),
    (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8), (29, "IQ1_M", QK_K, 56),
    (30, "BF16", 1, 2), (34, "TQ1_0", QK_K, 54), (35, "TQ2_0", QK_K, 66),
    (39, "MXFP4", 32, 17), (40, "NVFP4", 64, 36), (41, "Q1_0", 128, 18),
]

# by id (int) and by name (str): GGML_TYPES[8] is GGML_TYPES["Q8_0"]
GGML_TYPES: dict = {}
for _id, _name, _bs, _ts in _TABLE:
    GGML_TYPES[_id] = GGML_TYPES[_name] = GGMLType(_id, _name, _bs, _ts)
del _id, _name, _bs, _ts

# the plain types: stored as little-endian NumPy arrays of these dtypes (BF16 has none)
NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "|i1", "I16": "<i2",
                "I32": "<i4", "I64": "<i8"}
