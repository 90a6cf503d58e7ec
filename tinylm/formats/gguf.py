"""GGUF, llama.cpp's model file, in pure NumPy: a memory-mapped reader and an atomic writer.

A GGUF file (version 2 or 3, little-endian; every integer below is little-endian)::

    offset 0   "GGUF"        magic, 4 bytes
           4   u32 version   2 or 3 (the layouts are the same; 3 allows big-endian files)
           8   u64 n_tensors
          16   u64 n_kv
          24   n_kv key/values:    string key, u32 value type, value
               n_tensors infos:    string name, u32 n_dims, u64 ne[n_dims] (innermost
                                   first), u32 GGML type, u64 offset (from the data start)
               zero padding to a multiple of the alignment (``general.alignment``, a u32
                                   power of two; 32 when absent)
               tensor data:        each tensor at its offset, a multiple of the alignment

    string  = u64 byte length + UTF-8 bytes (no terminator)
    value   = u8 | i8 | u16 | i16 | u32 | i32 | f32 | bool (1 byte) | string | array |
              u64 | i64 | f64                       (types 0..12, see ``ValueType``)
    array   = u32 element type + u64 count + the elements back to back (an element may
              itself be an array: element type, count, elements)

Worked example: the key/value ``general.alignment = 64`` (u32) is 33 bytes:
``11 00 00 00 00 00 00 00`` (17), ``general.alignment``, ``04 00 00 00`` (type u32),
``40 00 00 00``.

Tensors: a GGML shape lists the innermost axis first; ``GGUFTensor.shape`` is the
NumPy order (reversed), so a ``(out, in)`` weight has ``ne = [in, out]``. ``data`` is a
read-only ``np.memmap`` view, no copy: the plain types as their NumPy dtype
(F32/F16/F64/I8/I16/I32/I64), every other type (BF16 and the quantized ones) as uint8
``(*shape[:-1], row_bytes)``, the arrays ``gguf.GGUFReader`` gives. Dequantizing is
``tinylm.quant``'s (``format_for_ggml_type(t.type).dequantize(t.data, t.shape)``).

Reading never executes anything from the file, and checks every count and length
against the file's size before using it: a truncated or garbled file, an unknown
version, value type or tensor type, a duplicate name, a tensor outside the file or
overlapping another is one ``GGUFError`` naming the file and the problem. Big-endian
files (version 3 allows them) and version 1 are refused.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable, Mapping

import numpy as np

from tinylm.atomic import atomic_open
from tinylm.errors import TinyLMError
from tinylm.formats.ggml_types import GGML_TYPES, NUMPY_DTYPES

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4         # GGML_MAX_DIMS: llama.cpp refuses more
MAX_NESTING = 16     # arrays of arrays of ...: deeper is refused (no unbounded recursion)


class GGUFError(TinyLMError, ValueError):
    """A GGUF file that cannot be read or written: the message names the file and why."""


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# the fixed-size value types: their little-endian NumPy dtypes (BOOL: one byte, 0 or 1)
_DTYPES = {ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2",
           ValueType.INT16: "<i2", ValueType.UINT32: "<u4", ValueType.INT32: "<i4",
           ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1", ValueType.UINT64: "<u8",
           ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8"}
_STRUCT = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H",
           ValueType.INT16: "<h", ValueType.UINT32: "<I", ValueType.INT32: "<i",
           ValueType.FLOAT32: "<f", ValueType.BOOL: "<B", ValueType.UINT64: "<Q",
           ValueType.INT64: "<q", ValueType.FLOAT64: "<d"}
_MIN_SIZE = {**{t: np.dtype(d).itemsize for t, d in _DTYPES.items()},
             ValueType.STRING: 8, ValueType.ARRAY: 12}


@dataclass(frozen=True)
class GGUFValue:
    """A metadata value with its GGUF type. ``value`` is an int / float / bool / str for
    a scalar; for an ARRAY (``element`` = the element type) a 1-D NumPy array of numbers
    or bools, a list of str, or a list of ``GGUFValue`` arrays (nested)."""

    type: ValueType
    value: Any
    element: ValueType | None = None

    def plain(self):
        """The value without types: numbers and strings, NumPy arrays, nested lists."""
        if self.type == ValueType.ARRAY and self.element == ValueType.ARRAY:
            return [v.plain() for v in self.value]
        return self.value


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor: its name, GGML type name (``"Q4_1"``), NumPy-order shape and data.
    Reading fills ``offset`` (where the data starts in the file); to write one, give
    ``data`` as the array the reader would give (or any uint8 bytes of the right size)."""

    name: str
    type: str
    shape: tuple
    data: Any = field(default=None, repr=False)
    offset: int | None = None

    @property
    def nbytes(self) -> int:
        ggml = GGML_TYPES[self.type]
        return math.prod(self.shape) // ggml.block_size * ggml.type_size


@dataclass(frozen=True)
class GGUFFile:
    """What ``read_gguf`` returns: the header, every key/value, and the tensors."""

    path: str
    version: int
    alignment: int
    fields: dict = field(repr=False)    # key -> GGUFValue, in file order
    tensors: dict = field(repr=False)   # name -> GGUFTensor, in file order
    data_offset: int = 0

    @property
    def metadata(self) -> dict:
        """key -> plain value (``GGUFValue.plain``)."""
        return {k: v.plain() for k, v in self.fields.items()}

    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r} (it has "
                            f"{len(self.tensors)})") from None


# ----------------------------------------------------------------------------- reading

class _Reader:
    """A cursor over the mapped bytes; every read is checked against the file size."""

    def __init__(self, mapped: np.ndarray, path: str):
        self.mapped, self.path, self.size, self.pos = mapped, path, mapped.size, 0
        self.view = memoryview(mapped)

    def fail(self, problem: str):
        raise GGUFError(f"{self.path}: {problem}; the file is not a GGUF file tinylm can "
                        f"read (re-download or re-export it)")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes, the file has "
                      f"{self.size - self.pos} left")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.view, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        start = self.take(n, what)
        try:
            return self.view[start:start + n].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not UTF-8")

    def count(self, what: str, each: int) -> int:
        n = self.unpack("<Q", what)
        if n * each > self.size - self.pos:
            self.fail(f"{what} is {n}, more than the {self.size - self.pos} bytes left "
                      f"could hold")
        return n

    def value_type(self, what: str) -> ValueType:
        raw = self.unpack("<I", what)
        try:
            return ValueType(raw)
        except ValueError:
            self.fail(f"{what} is {raw}, not a GGUF value type (0..12)")

    def value(self, vtype: ValueType, what: str, depth: int = 0) -> GGUFValue:
        if vtype == ValueType.STRING:
            return GGUFValue(vtype, self.string(what))
        if vtype == ValueType.ARRAY:
            return self.array(what, depth)
        v = self.unpack(_STRUCT[vtype], what)
        return GGUFValue(vtype, v != 0 if vtype == ValueType.BOOL else v)

    def array(self, what: str, depth: int) -> GGUFValue:
        if depth >= MAX_NESTING:
            self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
        element = self.value_type(f"the element type of {what}")
        n = self.count(f"the length of {what}", _MIN_SIZE[element])
        if element in _DTYPES:
            start = self.take(n * _MIN_SIZE[element], what)
            items = np.frombuffer(self.view, _DTYPES[element], n, start).copy()
            if element == ValueType.BOOL:
                items = items != 0
            return GGUFValue(ValueType.ARRAY, items.astype(items.dtype.newbyteorder("=")),
                             element)
        if element == ValueType.STRING:
            return GGUFValue(ValueType.ARRAY, [self.string(f"{what}[{i}]") for i in range(n)],
                             element)
        return GGUFValue(ValueType.ARRAY, [self.array(f"{what}[{i}]", depth + 1)
                                           for i in range(n)], element)


def _open_mapped(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file" if not os.path.exists(path)
                        else f"{path}: not a file; give the path of a .gguf file")
    if os.path.getsize(path) == 0:
        raise GGUFError(f"{path}: empty file, not a GGUF file")
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise GGUFError(f"{path}: cannot read it: {e.strerror or e}") from None


def _header(r: _Reader) -> tuple[int, int, int]:
    """Magic and version -> (version, n_tensors, n_kv), counts checked against the size."""
    if r.size < 4 or r.view[:4].tobytes() != MAGIC:
        r.fail(f"it does not start with the magic {MAGIC!r}")
    r.take(4, "the magic")
    version = r.unpack("<I", "the version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0 and version:
            r.fail("it is a big-endian GGUF file; tinylm reads little-endian ones only")
        r.fail(f"version {version}; tinylm reads GGUF versions 2 and 3")
    n_tensors = r.unpack("<Q", "the tensor count")
    n_kv = r.unpack("<Q", "the key/value count")
    # a key/value takes at least 13 bytes, a tensor info at least 24
    if n_kv * 13 + n_tensors * 24 > r.size - r.pos:
        r.fail(f"it claims {n_kv} key/values and {n_tensors} tensors, more than its "
               f"{r.size} bytes can hold")
    return version, n_tensors, n_kv


def _fields(r: _Reader, n_kv: int) -> dict:
    fields = {}
    for i in range(n_kv):
        key = r.string(f"key {i}")
        vtype = r.value_type(f"the type of {key!r}")
        if key in fields:
            r.fail(f"the key {key!r} appears twice")
        fields[key] = r.value(vtype, repr(key))
    return fields


def _alignment(r: _Reader, fields: dict) -> int:
    field = fields.get("general.alignment")
    if field is None:
        return DEFAULT_ALIGNMENT
    if field.type != ValueType.UINT32 or field.value <= 0 or field.value & (field.value - 1):
        r.fail(f"general.alignment must be a u32 power of two, got {field.type.name} "
               f"{field.value!r}")
    return field.value


def _tensor_info(r: _Reader, i: int) -> tuple[str, str, tuple, int]:
    name = r.string(f"the name of tensor {i}")
    n_dims = r.unpack("<I", f"the dimension count of {name!r}")
    if n_dims > MAX_DIMS:
        r.fail(f"tensor {name!r} has {n_dims} dimensions; GGML allows at most {MAX_DIMS}")
    ne = [r.unpack("<Q", f"the shape of {name!r}") for _ in range(n_dims)]
    raw_type = r.unpack("<I", f"the type of {name!r}")
    ggml = GGML_TYPES.get(raw_type)
    if ggml is None:
        r.fail(f"tensor {name!r} has GGML type {raw_type}, which tinylm does not know")
    offset = r.unpack("<Q", f"the offset of {name!r}")
    if (ne[0] if ne else 1) % ggml.block_size:
        r.fail(f"tensor {name!r}: its rows of {ne[0]} are not whole {ggml.name} blocks "
               f"of {ggml.block_size}")
    return name, ggml.name, tuple(reversed(ne)), offset


def _tensors(r: _Reader, infos: list, data_offset: int, alignment: int) -> dict:
    tensors, spans = {}, []
    for name, type_name, shape, offset in infos:
        if name in tensors:
            r.fail(f"the tensor name {name!r} appears twice")
        t = GGUFTensor(name, type_name, shape, offset=data_offset + offset)
        if offset % alignment:
            r.fail(f"tensor {name!r} starts at offset {offset}, not a multiple of the "
                   f"alignment {alignment}")
        if t.offset + t.nbytes > r.size:
            r.fail(f"tensor {name!r} ({type_name}, shape {shape}, {t.nbytes} bytes) ends at "
                   f"byte {t.offset + t.nbytes}, past the end of the file ({r.size} bytes); "
                   f"truncated")
        data = r.mapped[t.offset:t.offset + t.nbytes]
        if type_name in NUMPY_DTYPES:
            data = data.view(NUMPY_DTYPES[type_name]).reshape(shape)
        elif shape:
            data = data.reshape(*shape[:-1], GGML_TYPES[type_name].row_bytes(shape[-1]))
        tensors[name] = GGUFTensor(name, type_name, shape, data, t.offset)
        spans.append((t.offset, t.offset + t.nbytes, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            r.fail(f"tensors {a!r} and {b!r} overlap")
    return tensors


def read_gguf(path) -> GGUFFile:
    """Read a GGUF file's header and map its tensors (nothing is copied into memory).

    >>> f = read_gguf("model.gguf")                              # doctest: +SKIP
    >>> f.metadata["general.architecture"], f.tensors["token_embd.weight"].type
    ('llama', 'Q8_0')
    """
    path = os.fspath(path)
    r = _Reader(_open_mapped(path), path)
    version, n_tensors, n_kv = _header(r)
    fields = _fields(r, n_kv)
    alignment = _alignment(r, fields)
    infos = [_tensor_info(r, i) for i in range(n_tensors)]
    data_offset = -(-r.pos // alignment) * alignment
    if n_tensors and data_offset > r.size:
        r.fail("truncated before the tensor data")
    tensors = _tensors(r, infos, data_offset, alignment)
    return GGUFFile(path, version, alignment, fields, tensors, data_offset)


# ----------------------------------------------------------------------------- writing

def _infer_type(v, key: str) -> ValueType:
    """The GGUF type of a plain Python / NumPy value (as ``gguf.GGUFWriter`` infers:
    bool, int -> INT32 (INT64 / UINT64 when it does not fit), float -> FLOAT32, str)."""
    if isinstance(v, (bool, np.bool_)):
        return ValueType.BOOL
    if isinstance(v, np.generic):
        for t, dt in _DTYPES.items():
            if t != ValueType.BOOL and np.dtype(dt) == v.dtype.newbyteorder("<"):
                return t
    if isinstance(v, (int, np.integer)):
        return (ValueType.INT32 if -2**31 <= v < 2**31 else
                ValueType.INT64 if -2**63 <= v < 2**63 else ValueType.UINT64)
    if isinstance(v, (float, np.floating)):
        return ValueType.FLOAT32
    if isinstance(v, str):
        return ValueType.STRING
    if isinstance(v, (list, tuple, np.ndarray)):
        return ValueType.ARRAY
    raise GGUFError(f"metadata {key!r}: a {type(v).__name__} has no GGUF type; give a "
                    f"number, bool, str, list or GGUFValue")


def as_value(v, key: str = "value") -> GGUFValue:
    """``v`` as a ``GGUFValue`` (a ``GGUFValue`` is kept; others get ``_infer_type``'s)."""
    if isinstance(v, GGUFValue):
        return v
    vtype = _infer_type(v, key)
    if vtype != ValueType.ARRAY:
        return GGUFValue(vtype, v)
    if isinstance(v, np.ndarray):
        if v.ndim != 1:
            raise GGUFError(f"metadata {key!r}: GGUF arrays are 1-D, got shape {v.shape}")
        if v.dtype == np.bool_:
            return GGUFValue(vtype, v, ValueType.BOOL)
        return GGUFValue(vtype, v, _infer_type(v.dtype.type(0), key))
    if not v:
        raise GGUFError(f"metadata {key!r}: an empty list has no element type; give "
                        f"GGUFValue(ValueType.ARRAY, [], element=...)")
    types = {_infer_type(x, key) for x in v}
    if types <= {ValueType.INT32, ValueType.INT64, ValueType.UINT64}:
        types = {max(types, key=[ValueType.INT32, ValueType.INT64, ValueType.UINT64].index)}
    if len(types) != 1:
        raise GGUFError(f"metadata {key!r}: a GGUF array holds one type, got "
                        f"{sorted(t.name for t in types)}")
    element = types.pop()
    items = [as_value(x, key) for x in v] if element == ValueType.ARRAY else list(v)
    return GGUFValue(vtype, items, element)


def _encode_string(s, key: str) -> bytes:
    if not isinstance(s, str):
        raise GGUFError(f"metadata {key!r}: expected a str, got {type(s).__name__}")
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _encode_items(element: ValueType, items, key: str) -> bytes:
    """An array's payload: element type, count, elements."""
    head = struct.pack("<IQ", element, len(items))
    if element == ValueType.STRING:
        return head + b"".join(_encode_string(s, key) for s in items)
    if element == ValueType.ARRAY:
        inner = [as_value(x, key) for x in items]
        if any(x.type != ValueType.ARRAY for x in inner):
            raise GGUFError(f"metadata {key!r}: an array of arrays holds arrays only")
        return head + b"".join(_encode_items(x.element, x.value, key) for x in inner)
    arr = np.asarray(items)
    try:
        out = arr.astype(_DTYPES[element])
    except (OverflowError, ValueError, TypeError) as e:
        raise GGUFError(f"metadata {key!r}: cannot store as {element.name}: {e}") from None
    if arr.ndim != 1 or (element not in (ValueType.FLOAT32, ValueType.FLOAT64)
                         and not np.array_equal(out.astype(arr.dtype), arr)):
        raise GGUFError(f"metadata {key!r}: the values do not fit a 1-D {element.name} array")
    return head + out.tobytes()


def _encode_value(value: GGUFValue, key: str) -> bytes:
    """The type tag and bytes of one metadata value."""
    t = ValueType(value.type)
    if t == ValueType.STRING:
        body = _encode_string(value.value, key)
    elif t == ValueType.ARRAY:
        if value.element is None:
            raise GGUFError(f"metadata {key!r}: an ARRAY GGUFValue needs its element type")
        body = _encode_items(ValueType(value.element), value.value, key)
    else:
        try:
            body = struct.pack(_STRUCT[t], value.value)
        except (struct.error, OverflowError, TypeError) as e:
            raise GGUFError(f"metadata {key!r}: {value.value!r} is not a {t.name} "
                            f"({e})") from None
    return struct.pack("<I", t) + body


def _as_tensor(name, t) -> GGUFTensor:
    """A tensor to write: a ``GGUFTensor``, or a NumPy array of a plain type (its dtype
    names the type: float32 -> F32, float16 -> F16, int8 -> I8, ...)."""
    if not isinstance(t, GGUFTensor):
        arr = np.asarray(t)
        kinds = {np.dtype(dt).newbyteorder("="): ty for ty, dt in NUMPY_DTYPES.items()}
        if arr.dtype.newbyteorder("=") not in kinds:
            raise GGUFError(f"tensor {name!r}: a {arr.dtype} array has no plain GGUF type; "
                            f"quantize it (tinylm.quant) and give a GGUFTensor")
        t = GGUFTensor(name, kinds[arr.dtype.newbyteorder("=")], arr.shape, arr)
    if t.type not in GGML_TYPES or not isinstance(t.type, str):
        raise GGUFError(f"tensor {name!r}: unknown GGML type {t.type!r}")
    ggml, shape = GGML_TYPES[t.type], tuple(int(n) for n in t.shape)
    if len(shape) > MAX_DIMS or any(n < 0 for n in shape) or \
            (shape[-1] if shape else 1) % ggml.block_size:
        raise GGUFError(f"tensor {name!r}: shape {shape} cannot be a {t.type} tensor (at "
                        f"most {MAX_DIMS} axes, rows whole blocks of {ggml.block_size})")
    data = np.asarray(t.data)
    if t.type in NUMPY_DTYPES and data.dtype != np.uint8:
        data = data.astype(NUMPY_DTYPES[t.type], copy=False)
    data = np.ascontiguousarray(data)
    t = GGUFTensor(name, t.type, shape, data)
    if data.nbytes != t.nbytes:
        raise GGUFError(f"tensor {name!r}: {data.nbytes} bytes of data where a {t.type} "
                        f"tensor of shape {shape} needs {t.nbytes}")
    return t


def _header_bytes(fields: dict, tensors: list, alignment: int) -> bytes:
    out = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(fields))]
    for key, value in fields.items():
        out += [_encode_string(key, key), _encode_value(value, key)]
    offset = 0
    for t in tensors:
        ne = tuple(reversed(t.shape))
        out += [_encode_string(t.name, t.name), struct.pack("<I", len(ne)),
                struct.pack(f"<{len(ne)}Q", *ne),
                struct.pack("<IQ", GGML_TYPES[t.type].id, offset)]
        offset += -(-t.nbytes // alignment) * alignment
    return b"".join(out)


def write_gguf(path, metadata: Mapping[str, Any], tensors, *,
               alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Write a GGUF v3 file atomically (a temporary file renamed over ``path``).

    ``metadata``: key -> value (a ``GGUFValue`` for an exact type, else inferred by
    ``as_value``); ``tensors``: a mapping name -> array / ``GGUFTensor``, or an iterable
    of ``GGUFTensor``; written in that order, each padded to ``alignment`` (stored as
    ``general.alignment`` when not 32).

    >>> write_gguf("tiny.gguf", {"general.architecture": "llama"},     # doctest: +SKIP
    ...            {"w": np.zeros((2, 3), np.float32),
    ...             "q": GGUFTensor("q", "Q8_0", (1, 32), quant.quantize(x, "q8_0"))})
    """
    path = os.fspath(path)
    fields = {str(k): as_value(v, str(k)) for k, v in metadata.items()}
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: alignment must be a power of two, got {alignment}")
    given = fields.get("general.alignment")
    if given is not None and (given.type != ValueType.UINT32 or given.value != alignment):
        raise GGUFError(f"{path}: metadata general.alignment {given.value!r} disagrees with "
                        f"alignment={alignment}; pass it as the alignment argument only")
    if alignment != DEFAULT_ALIGNMENT:
        fields["general.alignment"] = GGUFValue(ValueType.UINT32, alignment)
    items = tensors.items() if isinstance(tensors, Mapping) else ((t.name, t) for t in tensors)
    ts, seen = [], set()
    for name, t in items:
        if name in seen:
            raise GGUFError(f"{path}: the tensor name {name!r} appears twice")
        seen.add(name)
        ts.append(_as_tensor(str(name), t))
    header = _header_bytes(fields, ts, alignment)
    with atomic_open(path, "wb", error=GGUFError) as f:
        f.write(header)
        f.write(bytes(-len(header) % alignment))
        for t in ts:
            f.write(memoryview(t.data.reshape(-1).view(np.uint8)))
            f.write(bytes(-t.nbytes % alignment))
