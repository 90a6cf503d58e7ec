"""GGUF reading and writing against the `gguf` package (llama.cpp's own Python reader and
writer): what tinylm writes GGUFReader reads identically (and GGUFWriter writes the same
bytes); what GGUFWriter writes tinylm reads identically; bad files are one GGUFError."""

import os
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinylm import quant
from tinylm.errors import TinyLMError
from tinylm.formats.gguf import (
    GGUFError, GGUFTensor, GGUFValue, ValueType as V, as_value, read_gguf, write_gguf,
)

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

from gguf_helpers import assert_same_as_gguf_reader, flat, types_of  # noqa: E402


# ----------------------------------------------------------------------------- helpers

def _every_tensor_type(rng):
    """name -> (GGML type, NumPy shape, the array gguf.GGUFWriter/tinylm take)."""
    w = rng.standard_normal((4, 256)).astype(np.float32)
    out = {"f32": ("F32", w.shape, w), "f16": ("F16", w.shape, w.astype(np.float16)),
           "f64": ("F64", (3,), np.float64([1, 2.5, -3])),
           "i8": ("I8", (5,), np.int8([-128, 0, 1, 2, 127])),
           "i16": ("I16", (2, 2), np.int16([[1, -2], [3, -4]])),
           "i32": ("I32", (3,), np.int32([7, -8, 2**31 - 1])),
           "i64": ("I64", (1,), np.int64([-2**63])),
           "scalar": ("F32", (), np.array(1.5, np.float32))}
    for name in ["bf16", "q8_0", "q4_0", "q4_1"]:
        fmt = quant.get_format(name)
        out[name] = (fmt.ggml_type, w.shape, fmt.quantize(w))
    for name, block_bytes in [("q4_k", 144), ("q6_k", 210)]:
        out[name] = (name.upper(), (2, 512), rng.integers(0, 256, (2, 2 * block_bytes),
                                                          dtype=np.uint8))
    return out


METADATA = {
    "general.architecture": "llama",
    "u8": GGUFValue(V.UINT8, 255), "i8": GGUFValue(V.INT8, -128),
    "u16": GGUFValue(V.UINT16, 65535), "i16": GGUFValue(V.INT16, -32768),
    "u32": GGUFValue(V.UINT32, 2**32 - 1), "i32": GGUFValue(V.INT32, -2**31),
    "f32": GGUFValue(V.FLOAT32, 0.1), "bool": GGUFValue(V.BOOL, True),
    "str": GGUFValue(V.STRING, "héllo ✓"), "u64": GGUFValue(V.UINT64, 2**64 - 1),
    "i64": GGUFValue(V.INT64, -2**63), "f64": GGUFValue(V.FLOAT64, 1e300),
    "arr.u32": GGUFValue(V.ARRAY, np.uint32([1, 2, 3]), V.UINT32),
    "arr.f32": GGUFValue(V.ARRAY, np.float32([0.5, -np.inf]), V.FLOAT32),
    "arr.str": GGUFValue(V.ARRAY, ["a", "", "ß"], V.STRING),
    "arr.bool": GGUFValue(V.ARRAY, np.array([True, False]), V.BOOL),
    "arr.nested": GGUFValue(V.ARRAY, [GGUFValue(V.ARRAY, np.int32([1, 2]), V.INT32),
                                      GGUFValue(V.ARRAY, np.int32([3]), V.INT32)], V.ARRAY),
}


def _gguf_writer_file(path, metadata, tensors, alignment=None):
    """The same content written by gguf.GGUFWriter."""
    w = gguf.GGUFWriter(str(path), metadata["general.architecture"])
    if alignment:
        w.data_alignment = alignment
        w.add_uint32("general.alignment", alignment)
    for key, v in metadata.items():
        if key == "general.architecture":
            continue
        v = as_value(v)
        if v.type == V.ARRAY:
            items = [x.plain().tolist() for x in v.value] if v.element == V.ARRAY else \
                list(np.asarray(v.value).tolist()) if v.element != V.STRING else v.value
            w.add_key_value(key, items, gguf.GGUFValueType.ARRAY,
                            sub_type=gguf.GGUFValueType(int(v.element)))
        else:
            w.add_key_value(key, v.value, gguf.GGUFValueType(int(v.type)))
    for name, (type_name, shape, data) in tensors.items():
        if data.dtype == np.uint8:
            w.add_tensor(name, data, raw_dtype=T[type_name])
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- interop

@pytest.mark.parametrize("alignment", [32, 64])
def test_tinylm_file_reads_in_gguf_and_matches_gguf_writer_bytes(tmp_path, alignment):
    tensors = _every_tensor_type(np.random.default_rng(0))
    ours = tmp_path / "ours.gguf"
    write_gguf(ours, METADATA, {n: GGUFTensor(n, t, s, d) for n, (t, s, d) in tensors.items()},
               alignment=alignment)
    f = assert_same_as_gguf_reader(ours)
    assert f.version == 3 and f.alignment == alignment
    theirs = tmp_path / "theirs.gguf"
    _gguf_writer_file(theirs, METADATA, tensors, alignment if alignment != 32 else None)
    if alignment != 32:  # GGUFWriter puts general.alignment where it was added: first
        return
    assert ours.read_bytes() == theirs.read_bytes()


def test_gguf_writer_file_reads_in_tinylm(tmp_path):
    tensors = _every_tensor_type(np.random.default_rng(1))
    path = tmp_path / "theirs.gguf"
    _gguf_writer_file(path, METADATA, tensors, alignment=128)
    f = assert_same_as_gguf_reader(path)
    assert f.alignment == 128
    for key, v in METADATA.items():
        got, v = f.fields[key], as_value(v)
        assert (got.type, got.element) == (v.type, v.element)
        if v.type == V.FLOAT32:
            assert got.value == float(np.float32(v.value))
        elif v.type != V.ARRAY:
            assert got.value == v.value
    for name, (type_name, shape, data) in tensors.items():
        t = f.tensors[name]
        assert (t.type, t.shape) == (type_name, shape)
        np.testing.assert_array_equal(t.data, data)
    w = tensors["q4_1"][2]
    np.testing.assert_array_equal(quant.format_for_ggml_type("Q4_1").dequantize(
        f.tensors["q4_1"].data, f.tensors["q4_1"].shape), quant.dequantize(w, "q4_1", (4, 256)))


def test_values_keep_their_types_through_tinylm(tmp_path):
    path = tmp_path / "m.gguf"
    inferred = {"general.architecture": "gpt2", "n": 3, "big": 2**40, "x": 0.25, "ok": False,
                "names": ["a", "b"], "ids": [1, 2**35], "grid": [[1, 2], [0.5]],
                "np": np.arange(3, dtype=np.uint16), "np.scalar": np.float64(2.5)}
    write_gguf(path, {**METADATA, **inferred}, {})
    f = assert_same_as_gguf_reader(path)
    for key, v in METADATA.items():
        v = as_value(v)
        assert (f.fields[key].type, f.fields[key].element) == (v.type, v.element)
    types = {k: (f.fields[k].type.name, f.fields[k].element and f.fields[k].element.name)
             for k in inferred}
    assert types == {"general.architecture": ("STRING", None), "n": ("INT32", None),
                     "big": ("INT64", None), "x": ("FLOAT32", None), "ok": ("BOOL", None),
                     "names": ("ARRAY", "STRING"), "ids": ("ARRAY", "INT64"),
                     "grid": ("ARRAY", "ARRAY"), "np": ("ARRAY", "UINT16"),
                     "np.scalar": ("FLOAT64", None)}
    assert f.metadata["grid"][1].tolist() == [0.5] and f.metadata["np.scalar"] == 2.5


_SCALARS = {
    V.UINT8: st.integers(0, 255), V.INT8: st.integers(-128, 127),
    V.UINT16: st.integers(0, 2**16 - 1), V.INT16: st.integers(-2**15, 2**15 - 1),
    V.UINT32: st.integers(0, 2**32 - 1), V.INT32: st.integers(-2**31, 2**31 - 1),
    V.UINT64: st.integers(0, 2**64 - 1), V.INT64: st.integers(-2**63, 2**63 - 1),
    V.FLOAT32: st.floats(width=32, allow_nan=False), V.FLOAT64: st.floats(allow_nan=False),
    V.BOOL: st.booleans(),
    V.STRING: st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
}


def _values(depth=0):
    scalar = st.sampled_from(sorted(_SCALARS)).flatmap(
        lambda t: _SCALARS[t].map(lambda x: GGUFValue(t, x)))
    def array(t):
        items = st.lists(_SCALARS[t], max_size=5)
        if t == V.STRING:
            return items.map(lambda xs: GGUFValue(V.ARRAY, xs, t))
        from tinylm.formats.gguf import _DTYPES
        dtype = bool if t == V.BOOL else _DTYPES[t]
        return items.map(lambda xs: GGUFValue(V.ARRAY, np.array(xs, dtype=dtype), t))
    arrays = st.sampled_from(sorted(_SCALARS)).flatmap(array)
    if depth < 2:
        nested = st.lists(_values(depth + 1).filter(lambda v: v.type == V.ARRAY), max_size=3)
        arrays = arrays | nested.map(lambda xs: GGUFValue(V.ARRAY, xs, V.ARRAY))
    return scalar | arrays


@given(meta=st.dictionaries(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
                            .map(lambda k: "k." + k), _values(), max_size=6))
def test_any_metadata_round_trips_and_reads_in_gguf(tmp_path_factory, meta):
    path = tmp_path_factory.mktemp("m") / "m.gguf"
    write_gguf(path, meta, {})
    f = assert_same_as_gguf_reader(path)
    for key, v in meta.items():
        assert _same(f.fields[key], v), key


def _same(got: GGUFValue, want: GGUFValue) -> bool:
    """Type and value equal (a FLOAT32 as its float32 rounding), recursively."""
    if (got.type, got.element) != (want.type, want.element):
        return False
    if want.type == V.FLOAT32:
        return got.value == np.float32(want.value).item()
    if want.type != V.ARRAY or want.element == V.STRING:
        return got.value == want.value
    if want.element == V.ARRAY:
        return len(got.value) == len(want.value) and all(map(_same, got.value, want.value))
    return np.asarray(got.value).dtype == np.asarray(want.value).dtype.newbyteorder("=") and \
        np.array_equal(got.value, want.value)


# ----------------------------------------------------------------------------- writer errors

@pytest.mark.parametrize("metadata, tensors, match", [
    ({"k": []}, {}, "empty list"),
    ({"k": [1, "a"]}, {}, "one type"),
    ({"k": object()}, {}, "no GGUF type"),
    ({"k": GGUFValue(V.UINT8, 256)}, {}, "not a UINT8"),
    ({"k": GGUFValue(V.ARRAY, [300], V.UINT8)}, {}, "UINT8"),
    ({"k": GGUFValue(V.FLOAT32, 1e300)}, {}, "not a FLOAT32"),
    ({"general.alignment": GGUFValue(V.UINT32, 64)}, {}, "disagrees"),
    ({}, {"w": np.zeros(3, np.uint32)}, "no plain GGUF type"),
    ({}, {"w": GGUFTensor("w", "Q8_0", (2, 32), np.zeros(10, np.uint8))}, "needs 68"),
    ({}, {"w": GGUFTensor("w", "Q8_0", (2, 33), np.zeros(68, np.uint8))}, "whole blocks"),
    ({}, {"w": GGUFTensor("w", "Q9", (32,), np.zeros(34, np.uint8))}, "unknown GGML type"),
    ({}, {"w": np.zeros((1, 1, 1, 1, 1), np.float32)}, "at most 4 axes"),
])
def test_writer_refuses_what_gguf_cannot_hold(tmp_path, metadata, tensors, match):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"previous")
    with pytest.raises(GGUFError, match=match):
        write_gguf(path, metadata, tensors)
    assert path.read_bytes() == b"previous"                       # untouched


def test_writer_refuses_duplicate_tensor_names_and_bad_alignment(tmp_path):
    t = GGUFTensor("w", "F32", (1,), np.float32([1]))
    with pytest.raises(GGUFError, match="twice"):
        write_gguf(tmp_path / "x.gguf", {}, [t, t])
    with pytest.raises(GGUFError, match="power of two"):
        write_gguf(tmp_path / "x.gguf", {}, [], alignment=48)
    with pytest.raises(GGUFError, match="cannot write"):
        write_gguf(tmp_path / "missing" / "x.gguf", {}, [])


# ----------------------------------------------------------------------------- bad files

def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _file(kvs=b"", n_kv=0, infos=b"", n_tensors=0, data=b"", version=3, pad_to=32):
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + infos
    return head + bytes(-len(head) % pad_to) + data


def _info(name="w", ne=(32,), type_id=0, offset=0):
    return _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, type_id, offset)


def _kv(key, type_id, payload):
    return _s(key) + struct.pack("<I", type_id) + payload


GOOD = _file(_kv("a", 4, struct.pack("<I", 7)), 1, _info(), 1, bytes(128))

BAD = {
    "empty": (b"", "empty file"),
    "bad magic": (b"GGML" + GOOD[4:], "magic"),
    "version 1": (_file(version=1), "version 1"),
    "version 4": (_file(version=4), "version 4"),
    "big-endian": (_file(version=3 << 24), "big-endian"),
    "absurd kv count": (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60), "more than its"),
    "absurd tensor count": (b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0), "more than its"),
    "absurd key length": (_file(struct.pack("<Q", 2**62) + bytes(40), 1), "truncated"),
    "bad value type": (_file(_kv("a", 13, b"\0" * 8), 1), "not a GGUF value type"),
    "bad element type": (_file(_kv("a", 9, struct.pack("<IQ", 99, 1)), 1), "value type"),
    "absurd array length": (_file(_kv("a", 9, struct.pack("<IQ", 6, 2**61)), 1), "could hold"),
    "absurd string array": (_file(_kv("a", 9, struct.pack("<IQ", 8, 2**59)), 1), "could hold"),
    "string past end": (_file(_kv("a", 8, struct.pack("<Q", 1000) + b"xy"), 1), "truncated"),
    "not utf-8": (_file(_kv("a", 8, struct.pack("<Q", 2) + b"\xff\xfe"), 1), "not UTF-8"),
    "duplicate key": (_file(_kv("a", 7, b"\1") * 2, 2), "appears twice"),
    "too deep": (_file(_kv("a", 9, struct.pack("<IQ", 9, 1) * 20 + struct.pack("<IQ", 0, 0)), 1),
                 "deep"),
    "alignment type": (_file(_kv("general.alignment", 5, struct.pack("<i", 32)), 1),
                       "general.alignment"),
    "alignment 0": (_file(_kv("general.alignment", 4, struct.pack("<I", 0)), 1),
                    "general.alignment"),
    "alignment 48": (_file(_kv("general.alignment", 4, struct.pack("<I", 48)), 1),
                     "general.alignment"),
    "five dims": (_file(infos=_info(ne=(1, 1, 1, 1, 1)), n_tensors=1), "at most 4"),
    "unknown tensor type": (_file(infos=_info(type_id=99), n_tensors=1, data=bytes(128)),
                            "GGML type 99"),
    "partial block": (_file(infos=_info(ne=(33,), type_id=8), n_tensors=1, data=bytes(64)),
                      "whole Q8_0 blocks"),
    "data past end": (_file(infos=_info(ne=(64,)), n_tensors=1, data=bytes(128)), "past the end"),
    "absurd shape": (_file(infos=_info(ne=(2**40, 2**40)), n_tensors=1, data=bytes(32)),
                     "past the end"),
    "misaligned": (_file(infos=_info(offset=4), n_tensors=1, data=bytes(256)), "alignment"),
    "duplicate tensor": (_file(infos=_info() + _info(offset=128), n_tensors=2, data=bytes(256)),
                         "appears twice"),
    "overlap": (_file(infos=_info() + _info("v", offset=64), n_tensors=2, data=bytes(256)),
                "overlap"),
}


def test_the_good_file_is_good(tmp_path):
    path = tmp_path / "good.gguf"
    path.write_bytes(GOOD)
    f = assert_same_as_gguf_reader(path)
    assert f.metadata == {"a": 7} and f.tensors["w"].shape == (32,)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_one_gguf_error_naming_the_file(tmp_path, case):
    content, match = BAD[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=match) as e:
        read_gguf(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, TinyLMError)


def test_every_truncation_is_a_gguf_error(tmp_path):
    content = (tmp_path / "full.gguf")
    tensors = _every_tensor_type(np.random.default_rng(2))
    write_gguf(content, METADATA, {n: GGUFTensor(n, t, s, d) for n, (t, s, d) in tensors.items()})
    data = content.read_bytes()
    f = read_gguf(content)
    end = max(t.offset + t.nbytes for t in f.tensors.values())   # the padding after is optional
    path = tmp_path / "cut.gguf"
    for n in list(range(0, f.data_offset + 8)) + list(range(f.data_offset + 8, end, 97)):
        path.write_bytes(data[:n])
        with pytest.raises(GGUFError, match="cut.gguf"):
            read_gguf(path)


@given(flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_garbled_bytes_never_raise_anything_but_gguf_error(tmp_path_factory, flips):
    data = bytearray(GOOD)
    for at, value in flips:
        data[at] = value
    path = tmp_path_factory.mktemp("g") / "g.gguf"
    path.write_bytes(bytes(data))
    try:
        read_gguf(path)
    except GGUFError:
        pass


def test_missing_and_folder_paths(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="not a file"):
        read_gguf(tmp_path)


def test_unknown_tensor_name_is_a_gguf_error(tmp_path):
    path = tmp_path / "good.gguf"
    path.write_bytes(GOOD)
    with pytest.raises(GGUFError, match="no tensor named 'x'"):
        read_gguf(path).tensor("x")
    assert os.fspath(path) in repr(read_gguf(path))
