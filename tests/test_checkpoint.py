"""tinylm.checkpoint: round trips, byte-compatibility with the safetensors package,
bfloat16 rounding against torch, atomic writes, and a CheckpointError for every way a
file can be broken."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinylm import checkpoint as ck
from tinylm.errors import CheckpointError

# every code NumPy can hold natively (BF16 has its own tests)
NATIVE = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BOOL": np.bool_,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64,
}  # fmt: skip
SHAPES = [(), (0,), (5,), (2, 0, 3), (2, 3, 4)]


def sample(dtype, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def assert_same(got: dict, want: dict):
    assert list(got) == list(want) or set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def craft(header: dict, data: bytes = b"") -> bytes:
    """A file from a hand-written header, for the corruption tests."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def model_dict() -> dict:
    return {
        "wte": sample(np.float32, (7, 4), 1),
        "ln.bias": sample(np.float16, (4,), 2),
        "step": np.array(12, dtype=np.int64),
        "mask": sample(np.bool_, (3, 3), 3),
        "empty": np.zeros((0, 2), np.float32),
    }


@pytest.fixture(scope="module")
def stnp():
    return pytest.importorskip("safetensors.numpy")


@pytest.fixture(scope="module")
def torch():
    pytest.importorskip("safetensors")
    return pytest.importorskip("torch")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("code", NATIVE)
def test_round_trip_every_dtype_and_shape(tmp_path, code):
    tensors = {f"t{i}": sample(NATIVE[code], shape, i) for i, shape in enumerate(SHAPES)}
    path = tmp_path / "m.safetensors"
    ck.save_file(tensors, path)
    assert_same(ck.load_file(path), tensors)
    assert_same(ck.load_bytes(ck.save_bytes(tensors)), tensors)
    assert {n: h["dtype"] for n, h in ck.read_header(path).items()} == dict.fromkeys(tensors, code)


def test_loaded_arrays_are_writable_and_native(tmp_path):
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    ck.save_file({"x": big_endian}, tmp_path / "m.safetensors")
    x = ck.load_file(tmp_path / "m.safetensors")["x"]
    assert x.dtype == np.int32 and x.dtype.isnative and x.flags.writeable
    np.testing.assert_array_equal(x, big_endian)
    x[0, 0] = 99  # no error: the array owns its memory


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    metadata = {"format": "np", "step": "12", "note": "héllo \"quoted\"\n", "": ""}
    ck.save_file(model_dict(), path, metadata=metadata)
    assert ck.read_metadata(path) == metadata
    ck.save_file(model_dict(), path)
    assert ck.read_metadata(path) == {}


def test_load_only_some_names(tmp_path):
    tensors = model_dict()
    path = tmp_path / "m.safetensors"
    ck.save_file(tensors, path)
    got = ck.load_file(path, names=["step", "wte"])
    assert list(got) == ["step", "wte"]
    assert_same(got, {"step": tensors["step"], "wte": tensors["wte"]})
    assert list(ck.load_bytes(path.read_bytes(), names=["mask"])) == ["mask"]
    with pytest.raises(CheckpointError, match="m.safetensors.*nope"):
        ck.load_file(path, names=["nope"])


def test_load_some_names_reads_only_those(tmp_path):
    import tracemalloc

    big = 1 << 28  # a 256 MB tensor that exists only in the header (a sparse file)
    header = {"big": {"dtype": "U8", "shape": [big], "data_offsets": [0, big]},
              "small": {"dtype": "F32", "shape": [2], "data_offsets": [big, big + 8]}}  # fmt: skip
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(craft(header))
        f.seek(big, os.SEEK_CUR)
        f.write(np.float32([1, 2]).tobytes())
    tracemalloc.start()
    try:
        got = ck.load_file(path, names=["small"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got["small"], [1, 2])
    assert peak < 1 << 20
    assert ck.read_header(path)["big"] == {"dtype": "U8", "shape": [big]}


def test_saves_tensor_objects(tmp_path):
    from tinylm.tensor import Tensor

    ck.save_file({"w": Tensor(np.arange(4, dtype=np.float32))}, tmp_path / "m.safetensors")
    np.testing.assert_array_equal(ck.load_file(tmp_path / "m.safetensors")["w"], np.arange(4))


@pytest.mark.gpu
def test_saves_cupy_arrays(tmp_path):
    import cupy as cp  # conftest skips gpu tests where CuPy sees no GPU

    ck.save_file({"w": cp.arange(6, dtype=cp.float32).reshape(2, 3)}, tmp_path / "m.safetensors")
    np.testing.assert_array_equal(
        ck.load_file(tmp_path / "m.safetensors")["w"], np.arange(6).reshape(2, 3)
    )


def test_dtypes_converts_on_save():
    x = np.array([1.5, -2.25, 3.0], np.float32)
    got = ck.load_bytes(ck.save_bytes({"x": x}, dtypes={"x": "F16"}))["x"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, x)


arrays = st.sampled_from(list(NATIVE.values())).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
names = st.text(max_size=6).filter(lambda s: s != "__metadata__")
dicts = st.dictionaries(names, arrays, max_size=5)
metadatas = st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=1)


@given(dicts, metadatas)
def test_property_round_trip(tensors, metadata):
    data = ck.save_bytes(tensors, metadata)
    assert struct.unpack("<Q", data[:8])[0] % 8 == 0  # the header is padded
    got = ck.load_bytes(data)
    assert set(got) == set(tensors)
    for name, array in tensors.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        np.testing.assert_array_equal(got[name], array)  # NaN == NaN here


@given(dicts, metadatas)
def test_property_bytes_identical_to_safetensors(stnp, tensors, metadata):
    if not tensors and metadata == {}:
        return  # safetensors writes a header it cannot read: see the next test
    assert ck.save_bytes(tensors, metadata) == stnp.save(tensors, metadata=metadata)


# --------------------------------------------------------------------------- safetensors


def all_dtypes() -> dict:
    tensors = {f"{code.lower()}_{i}": sample(dt, s, i) for code, dt in NATIVE.items()
               for i, s in enumerate([(3,), (), (2, 0)])}  # fmt: skip
    tensors.update({"b": sample(np.float32, (2,)), "a": sample(np.float32, (2, 2)),
                    "é": sample(np.int8, (3,)), "Z\n\"\\": sample(np.int8, (1,))})  # fmt: skip
    return tensors


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_bytes_identical_to_safetensors(stnp, metadata):
    tensors = all_dtypes()
    assert ck.save_bytes(tensors, metadata) == stnp.save(tensors, metadata=metadata)
    assert ck.save_bytes({}, metadata) == stnp.save({}, metadata=metadata) or metadata == {}


def test_no_tensors_and_empty_metadata(stnp):
    # safetensors 0.8 writes b'{},"__metadata__":{}}' here, which is not JSON and which
    # it cannot load; ours is valid, and safetensors loads it
    ours = ck.save_bytes({}, {})
    assert split(ours)[0] == {"__metadata__": {}}
    assert stnp.load(ours) == {} and ck.load_bytes(ours) == {}


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def test_many_metadata_keys_match_safetensors_up_to_key_order(stnp):
    # safetensors keeps metadata in a Rust HashMap: its key order varies between runs
    tensors, metadata = all_dtypes(), {k: k * 2 for k in "zyxabc"}
    ours, theirs = ck.save_bytes(tensors, metadata), stnp.save(tensors, metadata=metadata)
    assert len(ours) == len(theirs)
    assert split(ours) == split(theirs)
    assert list(split(ours)[0]["__metadata__"]) == sorted(metadata)


def test_our_files_load_in_safetensors(stnp, tmp_path):
    tensors, path = all_dtypes(), tmp_path / "ours.safetensors"
    ck.save_file(tensors, path, metadata={"format": "np"})
    assert_same(stnp.load_file(str(path)), tensors)
    assert_same(stnp.load(path.read_bytes()), tensors)


def test_safetensors_files_load_in_ours(stnp, tmp_path):
    tensors, path = all_dtypes(), tmp_path / "theirs.safetensors"
    stnp.save_file(tensors, str(path), metadata={"a": "1", "b": "2"})
    assert_same(ck.load_file(path), tensors)
    assert ck.read_metadata(path) == {"a": "1", "b": "2"}


# --------------------------------------------------------------------------- bfloat16


def bf16_cases() -> np.ndarray:
    """float32 values whose bf16 rounding is interesting: ties, carries, inf, NaN."""
    special = np.array([
        0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # ties: to even, down and up
        0x3F808001, 0x3F807FFF, 0x3FFFFFFF, 0x7F7FFFFF,  # just over/under, carry, max -> inf
        0x7F800000, 0xFF800000, 0x00000001, 0x80008000,  # +-inf, subnormals
        0x00000000, 0x80000000, 0x7F7F8000, 0x7F7F7FFF,  # +-0, ties near the top
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF,  # NaNs (quiet, signalling)
    ], dtype=np.uint32)  # fmt: skip
    rand = np.random.default_rng(0).integers(0, 2**32, 20_000, dtype=np.uint32)
    return np.concatenate([special, rand]).view(np.float32)


def test_bf16_rounding_matches_torch(torch):
    x = bf16_cases()
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ours = ck.float32_to_bf16_bits(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(ck.bf16_bits_to_float32(ours[nan])).all()  # NaN stays NaN ...
    assert (np.signbit(ck.bf16_bits_to_float32(ours[nan])) == np.signbit(x[nan])).all()  # signed


def test_torch_bf16_file_loads_in_ours(torch, tmp_path):
    from safetensors.torch import save_file

    w = torch.from_numpy(bf16_cases().reshape(-1, 4)).to(torch.bfloat16)
    path = tmp_path / "torch.safetensors"
    save_file({"w": w, "b": torch.arange(3, dtype=torch.bfloat16)}, str(path))
    got = ck.load_file(path)
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], w.float().numpy())
    np.testing.assert_array_equal(got["b"], [0, 1, 2])
    raw = ck.load_file(path, bf16="raw")["w"]
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, w.view(torch.int16).numpy().view(np.uint16))
    ck.save_file(ck.load_file(path, bf16="raw"), tmp_path / "again.safetensors",
                 dtypes={"w": "BF16", "b": "BF16"})  # fmt: skip
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_our_bf16_file_loads_in_torch(torch, tmp_path):
    from safetensors.torch import load_file, save

    x = bf16_cases()
    path = tmp_path / "ours.safetensors"
    ck.save_file({"x": x, "y": np.float32([1, 2])}, path, dtypes={"x": "BF16"})
    got = load_file(str(path))
    assert got["x"].dtype == torch.bfloat16 and got["y"].dtype == torch.float32
    want = torch.from_numpy(x).to(torch.bfloat16)
    nan = torch.from_numpy(np.isnan(x))
    assert torch.equal(got["x"][~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert torch.isnan(got["x"][nan]).all()
    finite = x[np.isfinite(x)][:100]  # and the bytes equal torch's own writer's
    theirs = save({"x": torch.from_numpy(finite).to(torch.bfloat16)})
    assert ck.save_bytes({"x": finite}, dtypes={"x": "BF16"}) == theirs


# --------------------------------------------------------------------------- atomicity


def test_failed_replace_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    ck.save_file({"old": np.ones(3, np.float32)}, path)
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(ck.os, "replace", fail)
    with pytest.raises(CheckpointError, match="m.safetensors.*disk on fire"):
        ck.save_file({"new": np.zeros(5, np.float32)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, error):
    path = tmp_path / "m.safetensors"
    ck.save_file({"old": np.ones(3, np.float32)}, path)
    before = path.read_bytes()
    calls = []
    real_raw = ck._raw

    def raw_then_fail(array):  # the first tensor is written, the second blows up
        calls.append(1)
        if len(calls) == 2:
            raise error("interrupted")
        return real_raw(array)

    monkeypatch.setattr(ck, "_raw", raw_then_fail)
    with pytest.raises(error):
        ck.save_file({"a": np.zeros(4), "b": np.zeros(4, np.int8)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_saved_file_gets_the_usual_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        ck.save_file({"x": np.zeros(1)}, tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nodir"):
        ck.save_file({"x": np.zeros(1)}, tmp_path / "nodir" / "m.safetensors")


# --------------------------------------------------------------------------- bad input


def raises_naming(path, fn=ck.load_file, match=None):
    with pytest.raises(CheckpointError, match=match) as info:
        fn(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    for fn in (ck.load_file, ck.read_metadata, ck.read_header):
        raises_naming(tmp_path / "absent.safetensors", fn, "not found")


def test_every_truncation_is_an_error(tmp_path):
    data = ck.save_bytes(model_dict(), {"k": "v"})
    path = tmp_path / "cut.safetensors"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        raises_naming(path)
        with pytest.raises(CheckpointError, match="<bytes>"):
            ck.load_bytes(data[:cut])
        if cut < 8 + struct.unpack("<Q", data[:8])[0]:  # the header itself is cut
            raises_naming(path, ck.read_metadata)


def test_flipped_header_bytes_load_or_raise_checkpoint_error(tmp_path):
    data = ck.save_bytes(model_dict(), {"k": "v"})
    path = tmp_path / "flip.safetensors"
    (n,) = struct.unpack("<Q", data[:8])
    for i in range(8 + n):
        for bit in (0x01, 0x20, 0x80):
            flipped = bytearray(data)
            flipped[i] ^= bit
            path.write_bytes(flipped)
            try:
                ck.load_file(path)  # e.g. a renamed tensor is still a valid file
            except CheckpointError as e:
                assert str(path) in str(e)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "shorter than the 8-byte"),
        (b"\x01\x00\x00", "shorter than the 8-byte"),
        (struct.pack("<Q", 100_000_001) + b"{}", "100 MB"),
        (struct.pack("<Q", 2**64 - 1) + b"{}", "100 MB"),
        (struct.pack("<Q", 64) + b"{}      ", "larger than the file"),
        (struct.pack("<Q", 8) + b"{\xff}     ", "not valid UTF-8 JSON"),
        (struct.pack("<Q", 8) + b"{'a': 1}", "not valid UTF-8 JSON"),
        (craft([1, 2]), "not a JSON object"),
        (craft({"__metadata__": {"a": 1}}), "__metadata__"),
        (craft({"__metadata__": ["a"]}), "__metadata__"),
        (craft({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
         "unknown dtype 'F8_E4M3'"),
        (craft({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
         "needs 8 bytes"),
        (craft({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2),
         "truncated"),
        (craft({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6),
         "trailing bytes"),
        (craft({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
         "gap"),
        (craft({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
         "overlaps"),
        (craft({"x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8),
         "needs 4 bytes"),
        (craft({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "malformed"),
        (craft({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
         "malformed"),
        (craft({"x": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, b"\0" * 4),
         "malformed"),
        (craft({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4),
         "malformed"),
        (craft({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "malformed"),
        (craft({"x": [1, 2]}), "malformed"),
    ],
)  # fmt: skip
def test_corrupt_files(tmp_path, data, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    raises_naming(path, ck.load_file, match)
    with pytest.raises(CheckpointError, match=match):
        ck.load_bytes(data)


def test_duplicate_names_in_header(tmp_path):
    entry = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    text = f'{{"x":{entry},"x":{entry}}}'.encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0")
    raises_naming(path, ck.load_file, "duplicate")


@pytest.mark.parametrize(
    "tensors, kwargs, match",
    [
        ({"x": np.zeros((4, 4))[:, ::2]}, {}, "not C-contiguous"),
        ({"x": np.asfortranarray(np.zeros((2, 3)))}, {}, "not C-contiguous"),
        ({"x": [1.0, 2.0]}, {}, "is a list, not an array"),
        ({"x": 3.0}, {}, "is a float, not an array"),
        ({1: np.zeros(1)}, {}, "tensor name 1 must be a str"),
        ({"__metadata__": np.zeros(1)}, {}, "must be a str other than"),
        ({"x": np.zeros(1, np.complex64)}, {}, "has dtype complex64"),
        ({"x": np.array(["a"])}, {}, "has dtype <U1"),
        ({"x": np.zeros(1)}, {"metadata": {"a": 1}}, "metadata must be"),
        ({"x": np.zeros(1)}, {"metadata": ["a"]}, "metadata must be"),
        ({"x": np.zeros(1)}, {"dtypes": {"y": "BF16"}}, "no such tensor"),
        ({"x": np.zeros(1)}, {"dtypes": {"x": "F8"}}, "has dtype F8"),
        ({"x\ud800": np.zeros(1)}, {}, "not valid Unicode"),
        ([np.zeros(1)], {}, "must be a dict"),
    ],
)
def test_bad_save_input(tmp_path, tensors, kwargs, match):
    path = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=match) as info:
        ck.save_file(tensors, path, **kwargs)
    assert str(path) in str(info.value)
    assert not os.listdir(tmp_path)  # nothing was written
    with pytest.raises(CheckpointError, match=match):
        ck.save_bytes(tensors, **kwargs)


def test_bad_bf16_option(tmp_path):
    ck.save_file({"x": np.zeros(1)}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="bf16"):
        ck.load_file(tmp_path / "m.safetensors", bf16="float16")
