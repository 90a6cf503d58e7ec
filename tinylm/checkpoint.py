"""Safetensors checkpoints in pure NumPy: no pickle, nothing executed on load.

A ``.safetensors`` file is a length-prefixed JSON header followed by raw buffers::

    offset 0      u64, little-endian: N, the header length
    offset 8      N bytes of UTF-8 JSON, padded with spaces to a multiple of 8:
                    {"__metadata__": {"format": "np"},                       (optional)
                     "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                     "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}
    offset 8+N    the data: each tensor's little-endian C-order bytes at [begin, end)
                  counted from here, back to back: no gap, no overlap, nothing after

Worked example: ``save_bytes({"x": np.float32([1, 2])})`` is 72 bytes:
``38 00 00 00 00 00 00 00`` (N = 56), the 54 bytes
``{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`` and 2 spaces, then the
8 data bytes ``00 00 80 3f 00 00 00 40``.

Writing matches the ``safetensors`` package byte for byte: compact JSON, non-ASCII
names kept as UTF-8, tensors ordered by dtype in the package's order (U64 I64 F64 F32
U32 I32 BF16 F16 U16 I16 I8 U8 BOOL), then by name. The one case that cannot be
byte-identical is metadata with two or more keys: the package keeps it in a Rust
HashMap, so its key order changes from run to run; we write the keys sorted. Either
file loads the same everywhere. (And for no tensors with ``metadata={}`` the package
writes ``{},"__metadata__":{}}``, which is not JSON and which it cannot read back; we
write ``{"__metadata__":{}}``.)

NumPy has no bfloat16. BF16 tensors load as float32 (exact: a bf16 is the top half of
a float32) or, with ``bf16="raw"``, as their uint16 bit patterns. To store BF16, name
the tensor in ``save_file(..., dtypes={"w": "BF16"})``: floats are rounded to nearest,
ties to even, as torch does; a NaN stays a quiet NaN of the same sign; a uint16 array
is taken as raw bits, so what ``bf16="raw"`` loaded saves back unchanged.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys

import numpy as np

from tinylm import backend
from tinylm.atomic import atomic_open
from tinylm.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the safetensors package refuses larger headers too

# code -> little-endian NumPy dtype; BF16 is held as its uint16 bit pattern
_NUMPY = {
    code: np.dtype(spec)
    for code, spec in [
        ("F64", "<f8"), ("F32", "<f4"), ("F16", "<f2"), ("BF16", "<u2"), ("BOOL", "|b1"),
        ("I8", "|i1"), ("U8", "|u1"), ("I16", "<i2"), ("U16", "<u2"),
        ("I32", "<i4"), ("U32", "<u4"), ("I64", "<i8"), ("U64", "<u8"),
    ]
}
# an array's (kind, itemsize) -> code, whatever its byte order
_CODE = {(dt.kind, dt.itemsize): code for code, dt in _NUMPY.items() if code != "BF16"}
# the safetensors package's dtype order: a file lists the highest rank first
_ORDER = "BOOL U8 I8 I16 U16 F16 BF16 I32 U32 F32 F64 I64 U64".split()
_RANK = {code: i for i, code in enumerate(_ORDER)}


# --------------------------------------------------------------------------- bfloat16


def float32_to_bf16_bits(x) -> np.ndarray:
    """uint16 bfloat16 bit patterns of ``x`` (made float32 first), rounded to nearest even."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16  # only a NaN could overflow
    quiet_nan = (bits >> 16) | 0x0040  # keep the sign and top payload, set the quiet bit
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


def bf16_bits_to_float32(bits) -> np.ndarray:
    """float32 values of uint16 bfloat16 bit patterns (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- writing


def _as_numpy(name, value, where) -> np.ndarray:
    # A Tensor can only exist once tinylm.tensor is imported, so look there, not import it.
    tensor_module = sys.modules.get("tinylm.tensor")
    if tensor_module is not None and isinstance(value, tensor_module.Tensor):
        value = value.data
    if isinstance(value, np.generic):  # a NumPy scalar saves as a 0-d array
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) and backend.get_array_module(value) is np:
        raise CheckpointError(
            f"cannot save {where}: tensor {name!r} is a {type(value).__name__}, not an "
            "array; pass a NumPy/CuPy array or a tinylm Tensor"
        )
    array = backend.to_numpy(value)
    if not array.flags.c_contiguous:
        raise CheckpointError(
            f"cannot save {where}: tensor {name!r} is not C-contiguous; "
            "pass np.ascontiguousarray(x)"
        )
    return array


def _encode(tensors, metadata, dtypes, where) -> tuple[bytes, list[np.ndarray]]:
    """The length prefix and padded header, and the little-endian arrays in file order."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"cannot save {where}: tensors must be a dict of name -> array")
    dtypes = dict(dtypes or {})
    if unknown := set(dtypes) - set(tensors):
        raise CheckpointError(f"cannot save {where}: dtypes names no such tensor: {unknown}")
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(
                f"cannot save {where}: tensor name {name!r} must be a str other than '__metadata__'"
            )
        array = _as_numpy(name, value, where)
        code = dtypes.get(name) or _CODE.get((array.dtype.kind, array.dtype.itemsize))
        if not isinstance(code, str) or code not in _NUMPY:
            raise CheckpointError(
                f"cannot save {where}: tensor {name!r} has dtype "
                f"{dtypes.get(name) or array.dtype}; supported: {', '.join(_NUMPY)}"
            )
        if code == "BF16" and array.dtype != np.uint16:  # uint16 is raw bits already
            array = float32_to_bf16_bits(array)
        items.append((name, code, array.astype(_NUMPY[code], copy=False)))
    items.sort(key=lambda item: (-_RANK[item[1]], item[0]))  # str order is UTF-8 order

    header, offset = {}, 0
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError(f"cannot save {where}: metadata must be a dict of str -> str")
        header["__metadata__"] = dict(sorted(metadata.items()))
    for name, code, array in items:
        span = [offset, offset + array.nbytes]
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": span}
        offset += array.nbytes
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise CheckpointError(f"cannot save {where}: a name is not valid Unicode ({e})") from e
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise CheckpointError(f"cannot save {where}: the header ({len(text)} bytes) tops 100 MB")
    return struct.pack("<Q", len(text)) + text, [array for _, _, array in items]


def _raw(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1).view(np.uint8)  # a view: contiguity was checked


def save_bytes(tensors: dict, metadata: dict | None = None, dtypes: dict | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (arguments as for ``save_file``)."""
    head, arrays = _encode(tensors, metadata, dtypes, "<bytes>")
    return b"".join([head, *map(_raw, arrays)])


def save_file(tensors: dict, path, metadata: dict | None = None, dtypes: dict | None = None):
    """Write ``tensors`` (name -> NumPy/CuPy array or Tensor) to ``path`` atomically.

    ``metadata`` is free-form str -> str. ``dtypes`` maps a name to the code to store it
    as (``"BF16"``, ``"F16"``, ...), converting on the way out. The bytes go to a temp
    file in the same directory, are fsynced, then renamed over ``path``: a save that
    fails or is interrupted at any point leaves the previous file as it was.
    """
    path = os.fspath(path)
    head, arrays = _encode(tensors, metadata, dtypes, path)
    with atomic_open(path, "wb", error=CheckpointError) as f:
        f.write(head)
        for array in arrays:
            f.write(_raw(array))


# --------------------------------------------------------------------------- reading


def _header_length(first8: bytes, size: int, where: str) -> int:
    if size < 8:
        raise CheckpointError(f"{where}: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: header length {n} exceeds the 100 MB limit")
    if 8 + n > size:
        raise CheckpointError(f"{where}: header length {n} is larger than the file ({size} bytes)")
    return n


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key among {keys}")
    return dict(pairs)


def _parse_header(raw: bytes, data_len: int, where: str) -> tuple[dict, dict]:
    """(metadata, {name: (code, shape, begin, end)}), every span checked against the data."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # bad UTF-8 and bad JSON are ValueErrors
        raise CheckpointError(f"{where}: the header is not valid UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where}: __metadata__ must map str -> str")
    entries = {}
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        code, shape, span = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and isinstance(span, list) and len(span) == 2) or not all(
            type(i) is int and i >= 0 for i in shape + span
        ):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed entry {info!r}")
        if not isinstance(code, str) or code not in _NUMPY:
            raise CheckpointError(
                f"{where}: tensor {name!r} has unknown dtype {code!r}; "
                f"supported: {', '.join(_NUMPY)}"
            )
        (begin, end), nbytes = span, math.prod(shape) * _NUMPY[code].itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"{where}: tensor {name!r} ({code} {shape}) needs {nbytes} bytes but its "
                f"data_offsets {span} span {end - begin}"
            )
        entries[name] = (code, tuple(shape), begin, end)
    expected = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else "leaves a gap"
            raise CheckpointError(
                f"{where}: tensor {name!r} at data offset {begin} {what} (expected {expected})"
            )
        expected = end
    if expected != data_len:
        what = "truncated" if expected > data_len else "has trailing bytes"
        raise CheckpointError(
            f"{where}: data section {what}: the header describes {expected} bytes, "
            f"there are {data_len}"
        )
    return metadata, entries


def _read_header(f, where: str) -> tuple[dict, dict, int]:
    """(metadata, entries, data start) of an open file, reading only its header."""
    size = os.fstat(f.fileno()).st_size
    n = _header_length(f.read(8), size, where)
    return (*_parse_header(f.read(n), size - 8 - n, where), 8 + n)


def _open(path):
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file not found: {os.fspath(path)}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {os.fspath(path)}: {e}") from e


def _arrays(entries, names, bf16, where, read) -> dict[str, np.ndarray]:
    """The asked-for arrays; ``read(begin, end)`` returns a writable buffer of those bytes."""
    if bf16 not in ("float32", "raw"):
        raise CheckpointError(f"bf16 must be 'float32' or 'raw', got {bf16!r}")
    names = list(entries) if names is None else list(names)
    if missing := [n for n in names if n not in entries]:
        raise CheckpointError(f"{where}: no tensor named {missing}; it has {sorted(entries)}")
    out = {}
    for name in names:
        code, shape, begin, end = entries[name]
        array = np.frombuffer(read(begin, end), dtype=_NUMPY[code]).reshape(shape)
        array = array.astype(array.dtype.newbyteorder("="), copy=False)  # native order
        out[name] = bf16_bits_to_float32(array) if code == "BF16" and bf16 == "float32" else array
    return out


def load_file(path, bf16: str = "float32", names=None) -> dict[str, np.ndarray]:
    """The tensors of ``path`` (all, or only ``names``) as writable NumPy arrays.

    Each tensor is read by seeking straight to its bytes, so taking a few names from a
    huge file reads only those.
    """
    where = os.fspath(path)
    with _open(path) as f:
        _, entries, start = _read_header(f, where)

        def read(begin, end):
            f.seek(start + begin)
            buffer = bytearray(end - begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{where}: the file shrank while it was being read")
            return buffer

        return _arrays(entries, names, bf16, where, read)


def load_bytes(data, bf16: str = "float32", names=None) -> dict[str, np.ndarray]:
    """``load_file`` for safetensors bytes held in memory."""
    view, where = memoryview(data).cast("B"), "<bytes>"
    n = _header_length(bytes(view[:8]), len(view), where)
    _, entries = _parse_header(bytes(view[8 : 8 + n]), len(view) - 8 - n, where)
    start = 8 + n
    return _arrays(entries, names, bf16, where, lambda b, e: bytearray(view[start + b : start + e]))


def read_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` of ``path`` ({} when it has none), reading only the header."""
    with _open(path) as f:
        return _read_header(f, os.fspath(path))[0]


def read_header(path) -> dict[str, dict]:
    """``{name: {"dtype": code, "shape": [...]}}`` of ``path``, loading no tensor data."""
    with _open(path) as f:
        entries = _read_header(f, os.fspath(path))[1]
    return {name: {"dtype": c, "shape": list(s)} for name, (c, s, _, _) in entries.items()}
