"""The formats by name: ``get_format("q4_1")``, and the GGML type each GGUF one is.

    >>> fmt = get_format("q8_0")
    >>> fmt.block_size, fmt.block_bytes, fmt.bits_per_weight, fmt.ggml_type
    (32, 34, 8.5, 'Q8_0')
    >>> get_format("Q4_1") is get_format("q4_1")     # names are case-insensitive
    True
    >>> format_for_ggml_type("Q6_K").name
    'q6_k'
"""

from __future__ import annotations

from tinylm.quant.base import QuantError, QuantFormat
from tinylm.quant.floats import BF16, F16, F32
from tinylm.quant.int8 import Int8
from tinylm.quant.kquants import Q4_K, Q6_K
from tinylm.quant.nf4 import NF4
from tinylm.quant.q4 import Q4_0, Q4_1
from tinylm.quant.q8_0 import Q8_0

FORMATS: dict[str, QuantFormat] = {
    f.name: f for f in [F32(), F16(), BF16(), Q8_0(), Q4_0(), Q4_1(), Q4_K(), Q6_K(),
                        Int8(), NF4(), NF4(double_quant=True)]
}
_BY_GGML = {f.ggml_type: f for f in FORMATS.values() if f.ggml_type}


def get_format(name: str) -> QuantFormat:
    """The format called ``name`` (case-insensitive); a ``QuantError`` listing them if none."""
    fmt = FORMATS.get(str(name).lower())
    if fmt is None:
        raise QuantError(f"unknown quantization format {name!r}; choose one of "
                         f"{', '.join(FORMATS)}")
    return fmt


def format_for_ggml_type(type_name: str) -> QuantFormat:
    """The format of a GGML tensor type (``"Q4_1"``); a ``QuantError`` if tinylm has none."""
    fmt = _BY_GGML.get(type_name)
    if fmt is None:
        raise QuantError(f"tinylm cannot dequantize GGML type {type_name}; it reads "
                         f"{', '.join(_BY_GGML)}")
    return fmt


def quantize(x, name: str):
    """``get_format(name).quantize(x)``: packed uint8 bytes."""
    return get_format(name).quantize(x)


def dequantize(raw, name: str, shape):
    """``get_format(name).dequantize(raw, shape)``: float32 of ``shape``."""
    return get_format(name).dequantize(raw, shape)
