"""Blockwise dequantize-and-multiply: ``y = x @ W.T`` and ``dx = dy @ W`` from packed weights.

A packed weight (``Packed``) is a format and its arrays, never a float32 copy:

    q8_0 q4_0 q4_1 q4_k q6_k f16 bf16 f32   raw   uint8 (out, row_bytes), the GGUF bytes
    int8                                    codes int8 (out, in), scale float32 (out,)
    nf4                                     codes uint8 (out, in/2), absmax float32 (out, in/64)
    nf4-dq                                  codes, qabsmax uint8 (out, in/64),
                                            absmax2 float32 (ceil(blocks/256),), offset (1,)

``matmul(x2, packed)`` walks the output rows a tile at a time: ``decode`` writes the
tile's float32 weights into one reusable buffer (``tile_rows`` rows, about
``TILE_BYTES``, so it stays in the L2 cache between being written and being read by
the GEMM), BLAS multiplies, the next tile overwrites the buffer. Nothing is allocated
per tile but a few (rows, blocks) scale arrays. Measured on a 576 x 1536 Q4_1 weight
(one thread, 1 MB L2): 1 MB tiles beat 64-512 KB ones for one token and for 64, the
per-tile NumPy calls costing more than the extra cache misses.

For up to ``SMALL_N`` rows of x (decoding), Q8_0 / Q4_0 / Q4_1 take ``_small_matmul``
instead, which never scales the weights (see there).

Which regime is bandwidth-bound: decoding one token multiplies a single row of x by
every weight, so each token re-reads (and re-decodes) the whole model; the GEMV does
one multiply-add per decoded weight and the time is the decoding (memory traffic
through the tile plus NumPy's per-element passes), not arithmetic. Prefill with T
tokens decodes each tile once and multiplies T rows with it: the decode cost is
amortised over T tokens and the GEMM is compute-bound (measured: at T = 64 decoding
is about half the time of a 576 x 1536 Q4_1 product, the float32 GEMM the other half).

Fast decoding, per format:

- Q4_0 / Q4_1: one gather through a 256-entry table that maps a byte to its two
  nibbles as a pair of float32 (read as one float64), so a tile of bytes becomes a tile
  of floats in one ``np.take``. The pair order (low, high) interleaves weight j with
  weight j + 16 in each block, so the matmul reads x in that same order
  (``columns``, a fixed permutation of x's features, applied once per call); scales
  (and Q4_1's minimum) are applied in place.
- Q8_0 / int8: an int8 -> float32 cast straight into the buffer, scales in place.
- NF4: the same byte-pair table (NF4 puts the first weight in the high nibble, so
  the pairs come out in natural order), then the absmax in place.
- F16 / BF16: a cast (BF16: a 16-bit shift) into the buffer.
- Q4_K / Q6_K: the reference block dequantizer, per tile (read-only formats).

The result equals ``x @ fmt.dequantize(raw).T`` to float32 rounding: every decoded
weight is bit-identical to the reference (same float32 products and sums); only the
GEMM's summation order can differ.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from tinylm import backend
from tinylm.quant.base import QuantError
from tinylm.quant.blockwise8 import DOUBLE_QUANT_BLOCK, DYNAMIC_CODE
from tinylm.quant.nf4 import NF4_BLOCK, NF4_CODE
from tinylm.quant.registry import get_format

TILE_BYTES = 1 << 20  # float32 bytes of one decoded tile: 1 MB, about a core's L2
MIN_TILE_ROWS = 8
RAW_FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
LAYOUTS = {  # the arrays each format keeps, in order
    **{name: ("raw",) for name in RAW_FORMATS},
    "int8": ("codes", "scale"),
    "nf4": ("codes", "absmax"),
    "nf4-dq": ("codes", "qabsmax", "absmax2", "offset"),
}


def _pair_table(first, second) -> np.ndarray:
    """(256,) float64 whose bytes are the float32 pair (first[b], second[b]) of byte b."""
    pairs = np.stack([np.float32(first), np.float32(second)], axis=1)   # (256, 2)
    return np.ascontiguousarray(pairs).view(np.float64).reshape(256)


_BYTES = np.arange(256)
_Q4_0_PAIRS = _pair_table((_BYTES & 15) - 8, (_BYTES >> 4) - 8)      # GGML: low nibble first
_Q4_1_PAIRS = _pair_table(_BYTES & 15, _BYTES >> 4)
_NF4_PAIRS = _pair_table(NF4_CODE[_BYTES >> 4], NF4_CODE[_BYTES & 15])  # bnb: high first


@dataclass
class Packed:
    """A weight ``shape`` = (out, in) in format ``fmt`` (a name of ``LAYOUTS``) held as
    ``arrays`` (name -> array, see the module docstring)."""

    fmt: str
    shape: tuple
    arrays: dict
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # see block_scales

    @property
    def interleaved(self) -> bool:
        """Whether ``decode`` returns each 32-weight block as pairs (j, j + 16)."""
        return self.fmt in ("q4_0", "q4_1")

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())

    def float_absmax(self) -> np.ndarray:
        """nf4-dq: the float32 absmax (out, in/64) of every row, dequantized on the host
        (whatever device the arrays are on): what the CUDA kernels
        (``tinylm.kernels.quant_matmul``, a layer below) are handed, as they cannot
        decode the 8-bit absmax themselves."""
        host = Packed(self.fmt, self.shape,
                      {k: backend.to_numpy(v) for k, v in self.arrays.items()})
        return np.asarray(_dq_absmax(host, slice(None)), dtype=np.float32)


# --------------------------------------------------------------------------- packing


def pack(fmt_name: str, raw, shape) -> Packed:
    """The ``Packed`` of ``raw``, the bytes ``get_format(fmt_name).quantize(w)`` gives (or a
    GGUF file holds) for a weight of ``shape`` (out, in); views of ``raw``, no copy for
    the raw formats (a memory-mapped GGUF tensor stays on disk)."""
    fmt = get_format(fmt_name)
    shape = fmt.check_shape(shape)
    if len(shape) != 2:
        raise QuantError(f"a quantized layer's weight is (out, in), not {shape}")
    out, n_in = shape
    if fmt.name in RAW_FORMATS:
        if fmt.name in ("f32", "f16", "bf16") and not (
                isinstance(raw, np.ndarray) and raw.dtype == np.uint8):
            raw = np.ascontiguousarray(np.asarray(raw, fmt.dtype)).reshape(-1).view(np.uint8)
        raw = _as_uint8(raw, fmt.nbytes(shape), fmt.name)
        return Packed(fmt.name, shape, {"raw": raw.reshape(out, -1)})
    if fmt.name == "int8":
        codes, scale = fmt.split(raw, shape)
        return Packed("int8", shape, {"codes": codes, "scale": scale.astype(np.float32)})
    parts = fmt.split(raw, shape)
    arrays = {"codes": parts.codes.reshape(out, n_in // 2)}
    if fmt.name == "nf4":
        arrays["absmax"] = parts.absmax.reshape(out, n_in // NF4_BLOCK)
    else:
        arrays.update(qabsmax=parts.qabsmax.reshape(out, n_in // NF4_BLOCK),
                      absmax2=parts.absmax2, offset=np.float32([parts.offset]))
    return Packed(fmt.name, shape, arrays)


def expected_arrays(fmt_name: str, shape) -> dict:
    """{array name: (shape, dtype)} that a ``Packed`` of this format and shape holds."""
    fmt = get_format(fmt_name)
    out, n_in = fmt.check_shape(shape)
    if fmt.name in RAW_FORMATS:
        return {"raw": ((out, fmt.nbytes(shape) // max(out, 1)), np.uint8)}
    if fmt.name == "int8":
        return {"codes": ((out, n_in), np.int8), "scale": ((out,), np.float32)}
    blocks = (out, n_in // NF4_BLOCK)
    arrays = {"codes": ((out, n_in // 2), np.uint8)}
    if fmt.name == "nf4":
        return {**arrays, "absmax": (blocks, np.float32)}
    return {**arrays, "qabsmax": (blocks, np.uint8),
            "absmax2": ((-(-out * blocks[1] // DOUBLE_QUANT_BLOCK),), np.float32),
            "offset": ((1,), np.float32)}


def check_packed(packed: Packed) -> Packed:
    """``packed`` if each array has the shape and dtype its format and shape need, else a
    QuantError naming the first that does not."""
    if len(packed.shape) != 2:
        raise QuantError(f"a quantized layer's weight is (out, in), not {packed.shape}")
    for name, (shape, dtype) in expected_arrays(packed.fmt, packed.shape).items():
        a = packed.arrays.get(name)
        if a is None or tuple(a.shape) != shape or a.dtype != dtype:
            got = "nothing" if a is None else f"{a.dtype} {tuple(a.shape)}"
            raise QuantError(f"{packed.fmt} weight {packed.shape}: array {name!r} should be "
                             f"{np.dtype(dtype)} {shape}, got {got}")
    return packed


def _as_uint8(raw, nbytes: int, name: str) -> np.ndarray:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, np.uint8)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.size != nbytes:
        raise QuantError(f"{name}: packed data must be {nbytes} uint8 bytes for this shape, "
                         f"got {raw.size} {raw.dtype}; the data and the shape do not belong "
                         f"together")
    return raw if raw.flags.c_contiguous else np.ascontiguousarray(raw)


def to_raw(packed: Packed) -> np.ndarray:
    """The packed bytes in the format's own layout (what ``fmt.quantize`` returns)."""
    a = packed.arrays
    if packed.fmt in RAW_FORMATS:
        return a["raw"]
    if packed.fmt == "int8":
        return np.concatenate([a["codes"].reshape(-1).view(np.uint8),
                               a["scale"].astype("<f4").view(np.uint8)])
    tail = ([a["absmax"].astype("<f4").reshape(-1).view(np.uint8)] if packed.fmt == "nf4" else
            [a["qabsmax"].reshape(-1), a["absmax2"].astype("<f4").view(np.uint8),
             a["offset"].astype("<f4").view(np.uint8)])
    return np.concatenate([a["codes"].reshape(-1), *tail])


def select_rows(packed: Packed, ids) -> Packed:
    """The rows ``ids`` (1-D ints) of ``packed`` as a ``Packed`` of their own (a copy of
    those rows' bytes; nf4-dq's absmax dequantized for them)."""
    a, n = packed.arrays, len(ids)
    shape = (n, packed.shape[1])
    if packed.fmt == "nf4-dq":
        return Packed("nf4", shape, {"codes": a["codes"][ids],
                                     "absmax": _dq_absmax(packed, ids)})
    if packed.fmt == "int8":
        return Packed("int8", shape, {"codes": a["codes"][ids], "scale": a["scale"][ids]})
    name = "raw" if packed.fmt in RAW_FORMATS else "codes"
    rows = {name: a[name][ids]}
    if packed.fmt == "nf4":
        rows["absmax"] = a["absmax"][ids]
    return Packed(packed.fmt, shape, rows)


# --------------------------------------------------------------------------- decoding


def _halves(b) -> np.ndarray:
    """(..., 2) uint8 little-endian halves -> (..., 1) float32."""
    return np.take(_HALF, np.ascontiguousarray(b).view("<u2"))


def _dq_absmax(packed: Packed, rows) -> np.ndarray:
    """nf4-dq: the float32 absmax (n, in/64) of ``rows`` (a slice or ints)."""
    a = packed.arrays
    per_row = packed.shape[1] // NF4_BLOCK
    row_ids = np.arange(packed.shape[0])[rows]                            # (n,)
    block = row_ids[:, None] * per_row + np.arange(per_row)               # (n, in/64)
    scale = a["absmax2"][block // DOUBLE_QUANT_BLOCK]
    return DYNAMIC_CODE[a["qabsmax"][rows]] * scale + a["offset"][0]


def decode(packed: Packed, rows: slice, out: np.ndarray) -> np.ndarray:
    """Write the float32 weights of ``rows`` into ``out`` (n, in), C-contiguous; q4_0/q4_1
    in the interleaved column order (``columns``). Returns ``out``."""
    fmt, a = packed.fmt, packed.arrays
    n, n_in = out.shape
    if fmt in ("q4_0", "q4_1", "q8_0"):
        blk = a["raw"][rows].reshape(n, n_in // 32, -1)                   # (n, nb, bytes)
        out3 = out.reshape(n, n_in // 32, 32)
        if fmt == "q8_0":
            np.copyto(out3, blk[:, :, 2:].view(np.int8), casting="unsafe")
        else:
            head = 2 if fmt == "q4_0" else 4
            table = _Q4_0_PAIRS if fmt == "q4_0" else _Q4_1_PAIRS
            np.take(table, blk[:, :, head:], out=out3.view(np.float64), mode="clip")
        out3 *= _halves(blk[:, :, 0:2])
        if fmt == "q4_1":
            out3 += _halves(blk[:, :, 2:4])
    elif fmt in ("nf4", "nf4-dq"):
        np.take(_NF4_PAIRS, a["codes"][rows], out=out.view(np.float64), mode="clip")
        absmax = a["absmax"][rows] if fmt == "nf4" else _dq_absmax(packed, rows)
        out.reshape(n, -1, NF4_BLOCK)[...] *= absmax[:, :, None]
    elif fmt == "int8":
        np.copyto(out, a["codes"][rows], casting="unsafe")
        out *= a["scale"][rows][:, None]
    else:
        _decode_float_or_k(fmt, a["raw"][rows], out)
    return out


def _decode_float_or_k(fmt: str, raw: np.ndarray, out: np.ndarray) -> None:
    if fmt == "f32":
        out[...] = raw.view("<f4")
    elif fmt == "f16":
        np.copyto(out, raw.view("<f2"), casting="unsafe")
    elif fmt == "bf16":
        np.left_shift(raw.view("<u2"), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:  # q4_k, q6_k: the reference block maps (read-only formats, rarely in a hot path)
        fmt_obj = get_format(fmt)
        out[...] = fmt_obj.dequantize_blocks(raw.reshape(-1, fmt_obj.block_bytes)).reshape(
            out.shape)


@functools.lru_cache(maxsize=64)
def columns(n_in: int) -> np.ndarray:
    """The interleaved column order of q4_0/q4_1 tiles: x[..., columns(n)] matches them.

    Block b's decoded pairs are (w[32b + j], w[32b + 16 + j]) for j = 0..15."""
    j = np.arange(16)
    block = np.stack([j, j + 16], axis=1).reshape(32)                      # (32,)
    return (np.arange(0, n_in, 32)[:, None] + block).reshape(n_in)


def dequantize(packed: Packed) -> np.ndarray:
    """The whole float32 weight (out, in), natural column order (on the GPU when the
    packed arrays are CuPy ones: the row decoder of tinylm/kernels/quant_matmul.cu)."""
    if on_device(None, packed):
        from tinylm.kernels import quant_matmul
        xp = backend.get_array_module(*packed.arrays.values())
        return quant_matmul.dequantize_rows(packed, xp.arange(packed.shape[0]))
    out = np.empty(packed.shape, np.float32)
    tile_loop(packed, lambda r0, r1, t: out.__setitem__(slice(r0, r1), _natural(packed, t)))
    return out


def _natural(packed: Packed, tile: np.ndarray) -> np.ndarray:
    if not packed.interleaved:
        return tile
    natural = np.empty_like(tile)
    natural[:, columns(tile.shape[1])] = tile
    return natural


# --------------------------------------------------------------------------- the products

_local = threading.local()  # .buffers: name -> the largest scratch array made so far


def scratch(name: str, shape, dtype) -> np.ndarray:
    """A C-contiguous array of ``shape`` reused from call to call (per thread, per name):
    the tile buffers. Fresh large allocations cost a page fault per 4 KB on first
    touch, which for 1 MB tiles was a third of a decode step."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    size = math.prod(shape)
    have = buffers.get(name)
    if have is None or have.dtype != np.dtype(dtype) or have.size < size:
        have = buffers[name] = np.empty(size, dtype)
    return have[:size].reshape(shape)



def tile_rows(n_in: int, n_out: int) -> int:
    """Rows per tile: about TILE_BYTES of float32, a multiple of 8, at least 8."""
    rows = max(MIN_TILE_ROWS, TILE_BYTES // (4 * max(n_in, 1)) // 8 * 8)
    return min(rows, max(n_out, 1))


def tile_loop(packed: Packed, visit, buffer=None) -> None:
    """``visit(r0, r1, tile)`` for each tile of output rows, the tile decoded into one
    reusable float32 buffer (overwritten by the next tile: use it before returning)."""
    n_out, n_in = packed.shape
    rows = tile_rows(n_in, n_out)
    buf = scratch("tile", (rows, n_in), np.float32) if buffer is None else buffer
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 -> NaN, by the rules
        for r0 in range(0, n_out, rows):
            r1 = min(r0 + rows, n_out)
            visit(r0, r1, decode(packed, slice(r0, r1), buf[:r1 - r0]))


def matmul(x2: np.ndarray, packed: Packed) -> np.ndarray:
    """``x2 (N, in) @ W.T`` -> (N, out), in x2's dtype (float32; float64 for gradchecks).

    With more than one CPU thread allowed (``tinylm.threads.cpu_threads``: the BLAS
    limit), a large weight's output rows are split into that many contiguous parts,
    each computed on its own thread with single-threaded BLAS (NumPy releases the GIL
    in its loops); ``OPENBLAS_NUM_THREADS=1`` keeps everything on one core."""
    from tinylm import threads

    if on_device(x2, packed):  # CuPy: the CUDA kernels (tinylm/kernels/quant_matmul.cu)
        from tinylm.kernels import quant_matmul
        return quant_matmul.matmul(x2, packed)
    n_out, n_in = packed.shape
    if x2.shape[-1] != n_in:
        raise QuantError(f"quantized linear: input has {x2.shape[-1]} features but the "
                         f"weight expects {n_in}")
    y = np.empty((x2.shape[0], n_out), x2.dtype)
    if not x2.shape[0]:
        return y
    n = threads.cpu_threads() if n_out * n_in >= PARALLEL_WEIGHTS else 1
    if n <= 1 or packed.fmt == "nf4-dq":
        _matmul_rows(x2, packed, y)
        return y
    bounds = np.linspace(0, n_out, n + 1).astype(int) // 8 * 8
    bounds[-1] = n_out
    parts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if x2.shape[0] <= SMALL_N and packed.fmt in _PLANES:
        block_scales(packed)  # into the cache before slicing: the parts share it
    threads.run_parts(lambda ab: _matmul_rows(x2, row_slice(packed, *ab), y[:, ab[0]:ab[1]]),
                      parts)
    return y


PARALLEL_WEIGHTS = 1 << 18  # weights from which matmul splits rows over threads


def on_device(x, packed: Packed) -> bool:
    """Whether ``x`` or the packed arrays are CuPy arrays: matmul and matmul_t then run
    the GPU kernels (the packed bytes go to the device once, kept in packed.cache)."""
    return backend.get_array_module(x, *packed.arrays.values()) is not np


def row_slice(packed: Packed, r0: int, r1: int) -> Packed:
    """Rows r0:r1 of ``packed`` as a ``Packed`` of views (not for nf4-dq, whose second-
    level scales run across rows)."""
    arrays = {name: a[r0:r1] for name, a in packed.arrays.items()}
    cache = {k: tuple(None if v is None else v[:, r0:r1] for v in scales)
             for k, scales in packed.cache.items() if k != "device"}  # not the GPU copy
    return Packed(packed.fmt, (r1 - r0, packed.shape[1]), arrays, cache)


def _matmul_rows(x2: np.ndarray, packed: Packed, y: np.ndarray) -> None:
    """y[...] = x2 @ W.T on the calling thread."""
    if x2.shape[0] <= SMALL_N and packed.fmt in _PLANES and x2.dtype == np.float32:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite scales: by the rules
            _small_matmul(x2, packed, y)
        return
    xk = x2[:, columns(packed.shape[1])] if packed.interleaved else x2

    def visit(r0, r1, tile):
        t = tile if x2.dtype == np.float32 else tile.astype(x2.dtype)
        np.matmul(xk, t.T, out=y[:, r0:r1])

    tile_loop(packed, visit)


# --------------------------------------------------------------------------- decode: 1 token

SMALL_N = 16  # up to this many rows of x take the decode path below (a server step of 16)
# (SmolLM2 Q4_1, one thread, summed over its weights: faster than the tiles up to 16 rows,
# 188 vs 230 ms at 16, slower from 24: 264 vs 248; bench/RESULTS.md, Serving)
_PLANES = {"q8_0": 1, "q4_0": 2, "q4_1": 2}  # float planes a raw byte decodes to
_HALF = np.arange(65536, dtype=np.uint32).astype(np.uint16).view("<f2").astype(np.float32)


@functools.lru_cache(maxsize=64)
def _pad_index(fmt: str, n_in: int) -> np.ndarray:
    """(planes, row_bytes): which feature of x multiplies each decoded byte of a raw row
    (``n_in`` for the block headers, whose x is 0). Q8_0: byte 2 + j of block b is
    weight 32b + j; Q4_x: byte h + j holds weight 32b + j (low nibble, plane 0) and
    32b + 16 + j (high nibble, plane 1)."""
    head = {"q8_0": 2, "q4_0": 2, "q4_1": 4}[fmt]
    codes = 32 if fmt == "q8_0" else 16
    nb = n_in // 32
    idx = np.full((_PLANES[fmt], nb, head + codes), n_in)
    base = np.arange(nb)[:, None] * 32 + np.arange(codes)                  # (nb, codes)
    idx[0, :, head:] = base
    if fmt != "q8_0":
        idx[1, :, head:] = base + 16
    return idx.reshape(_PLANES[fmt], -1)


def _small_matmul(x2: np.ndarray, packed: Packed, y: np.ndarray) -> None:
    """y = x2 @ W.T for a few rows of x (decoding) and Q8_0/Q4_0/Q4_1, without scaling
    the weights: y[o] = sum_b d[o,b] * (codes[o,b] . x[b]) (+ m[o,b] * sum x[b] for Q4_1;
    Q4_0's codes are q - 8: - 8 d sum x[b]).

    Each raw tile is decoded whole, headers included, in contiguous passes (no
    gather): Q8_0 by an int8 -> float32 cast, Q4_x into a low-nibble and a high-nibble
    plane. One batched matmul over the blocks, with x laid out like the bytes (zeros
    under the headers: ``_pad_index``), gives every block's dot products; the half
    scales come from a 65536-entry table."""
    fmt, raw = packed.fmt, packed.arrays["raw"]
    n_out, n_in = packed.shape
    planes, nb, rb, n = _PLANES[fmt], n_in // 32, raw.shape[1], x2.shape[0]
    bb = rb // nb
    x_ext = np.concatenate([x2, np.zeros((n, 1), np.float32)], axis=1)
    xpad = x_ext[:, _pad_index(fmt, n_in)]                               # (N, planes, rb)
    xb = np.ascontiguousarray(xpad.reshape(n, planes, nb, bb).transpose(1, 2, 3, 0))
    xs = x2.reshape(n, nb, 32).sum(axis=2)                               # (N, nb)
    rows = tile_rows(planes * rb, n_out)
    f = scratch("planes", (rows, planes, rb), np.float32)
    u = scratch("nibbles", (rows, planes, rb), np.uint8) if planes == 2 else None
    dots = np.empty((nb, n_out, n), np.float32)                          # every block's x . q
    for r0 in range(0, n_out, rows):
        r1 = min(r0 + rows, n_out)
        t, r = raw[r0:r1], r1 - r0                                       # (R, rb) bytes
        if planes == 1:
            np.copyto(f[:r, 0], t.view(np.int8), casting="unsafe")
        else:
            np.bitwise_and(t, 15, out=u[:r, 0])
            np.right_shift(t, 4, out=u[:r, 1])
            np.copyto(f[:r], u[:r], casting="unsafe")
        blocks = f[:r].reshape(r, planes, nb, bb).transpose(1, 2, 0, 3)  # (planes, nb, R, bb)
        part = np.matmul(blocks, xb)                                     # (planes, nb, R, N)
        if planes == 2:
            np.add(part[0], part[1], out=dots[:, r0:r1])
        else:
            dots[:, r0:r1] = part[0]
    d, m = block_scales(packed)                                          # (nb, out) each
    if fmt == "q4_0":
        dots -= np.float32(8) * xs.T[:, None, :]
    dots *= d[:, :, None]
    y[...] = dots.sum(axis=0).T                                          # (N, out)
    if fmt == "q4_1":
        y += xs @ m                                                      # + sum_b m x_b


def block_scales(packed: Packed) -> tuple:
    """(d, m): the float32 block scales (nb, out) of a Q8_0/Q4_0/Q4_1 weight, and Q4_1's
    block minimums (None for the others), read from the raw bytes' half-precision
    headers the first time and kept in ``packed.cache`` (a layer passes the same cache
    on every call). Decoding needs them every token; converting 3.3 M halves per token
    was a tenth of SmolLM2's decode step. They cost 4 bytes per 32 weights (Q4_1: 8),
    beside the 34 (Q8_0), 18 (Q4_0) or 20 (Q4_1) bytes of packed block."""
    if "scales" not in packed.cache:
        raw, (n_out, n_in) = packed.arrays["raw"], packed.shape
        nb = n_in // 32
        words = raw.view("<u2").reshape(n_out, nb, raw.shape[1] // nb // 2)  # (out, nb, ·)
        d = half_values(words[:, :, 0].T)                                     # (nb, out)
        m = half_values(words[:, :, 1].T) if packed.fmt == "q4_1" else None
        packed.cache["scales"] = (d, m)
    return packed.cache["scales"]


def half_values(h: np.ndarray) -> np.ndarray:
    """IEEE halves (any uint16 array, strided is fine) -> float32, C-contiguous: the bits
    moved into a float32 and rescaled by 2**112 (exact for normal and subnormal halves),
    the sign put back; a table lookup if any is inf or NaN (which the shift would make
    a finite 2**16 or more). Four times faster than a gather or ``astype`` here."""
    v = h.astype(np.uint32)
    a = v & np.uint32(0x7FFF)
    a <<= np.uint32(13)
    f = a.view(np.float32)
    f *= np.float32(2.0 ** 112)
    if f.size and f.max() >= np.float32(65536):
        return _HALF[h]
    v &= np.uint32(0x8000)
    v <<= np.uint32(16)
    a |= v
    return f


def matmul_t(g2: np.ndarray, packed: Packed) -> np.ndarray:
    """``g2 (N, out) @ W`` -> (N, in): the input gradient of ``matmul``, tile by tile."""
    if on_device(g2, packed):
        from tinylm.kernels import quant_matmul
        return quant_matmul.matmul_t(g2, packed)
    n_out, n_in = packed.shape
    gx = np.zeros((g2.shape[0], n_in), g2.dtype)

    def visit(r0, r1, tile):
        t = tile if g2.dtype == np.float32 else tile.astype(g2.dtype)
        gx.__iadd__(g2[:, r0:r1] @ t)

    if g2.shape[0]:
        tile_loop(packed, visit)
    if packed.interleaved:
        natural = np.empty_like(gx)
        natural[:, columns(n_in)] = gx
        return natural
    return gx


def packed_nbytes(fmt_name: str, shape) -> int:
    """Bytes a ``Packed`` of this format and shape holds (int8: codes + scales)."""
    return get_format(fmt_name).nbytes(shape) if math.prod(shape) else 0
