"""Quantized weight formats: data layouts plus a vectorised NumPy reference for each.

    base.py        QuantFormat / BlockFormat (the interface), QuantError, shared helpers
    floats.py      F32, F16, BF16 (round to nearest even, GGML's NaN rule)
    q8_0.py        Q8_0: GGML 8-bit blocks of 32, half scale (bit-exact with llama.cpp)
    q4.py          Q4_0, Q4_1: GGML 4-bit blocks of 32 (bit-exact with llama.cpp)
    kquants.py     Q4_K, Q6_K: GGML super-blocks of 256 (dequantize only)
    int8.py        int8 per-output-channel absmax (a float32 scale per row)
    blockwise8.py  bitsandbytes' 8-bit dynamic blockwise code (NF4's double quantization)
    nf4.py         NF4 (QLoRA): blocks of 64, float32 or double-quantized absmax
    registry.py    name -> format; GGML type -> format
    kernels.py     packed weights (``Packed``) and the blockwise dequantize-and-multiply
    layers.py      QuantLinear, QuantEmbedding, QuantTiedHead: layers that compute from them

    >>> import numpy as np
    >>> from tinylm import quant
    >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    >>> raw = quant.quantize(w, "q8_0")               # the bytes a GGUF file holds
    >>> raw.shape, raw.dtype.name
    ((2, 34), 'uint8')
    >>> float(np.abs(quant.dequantize(raw, "q8_0", w.shape) - w).max()) < 0.004
    True
"""

from tinylm.quant.base import BlockFormat, QuantError, QuantFormat
from tinylm.quant.registry import (
    FORMATS, dequantize, format_for_ggml_type, get_format, quantize,
)
from tinylm.quant.layers import QuantEmbedding, QuantLinear, QuantTiedHead

__all__ = ["QuantFormat", "BlockFormat", "QuantError", "FORMATS", "get_format",
           "format_for_ggml_type", "quantize", "dequantize",
           "QuantLinear", "QuantEmbedding", "QuantTiedHead"]
