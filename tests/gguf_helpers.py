"""Comparing tinylm's GGUF reader with gguf.GGUFReader (tests import this; it needs gguf)."""

import gguf
import numpy as np

from tinylm.formats.gguf import GGUFValue, ValueType as V, read_gguf


def types_of(v: GGUFValue) -> list:
    """The type chain GGUFReader records: [ARRAY, element...] from the first element."""
    if v.type != V.ARRAY:
        return [v.type]
    if not len(v.value):
        return [V.ARRAY]
    return [V.ARRAY] + (types_of(v.value[0]) if v.element == V.ARRAY else [v.element])


def gguf_reads_it_whole(v: GGUFValue) -> bool:
    """GGUFReader decodes an array of arrays by its first element's type chain: its
    ``contents()`` is right only when every inner array is non-empty and of that chain."""
    if v.type != V.ARRAY or v.element != V.ARRAY:
        return True
    chains = {tuple(types_of(x)) for x in v.value}
    return len(chains) <= 1 and all(len(x.value) and gguf_reads_it_whole(x) for x in v.value)


def flat(v: GGUFValue):
    """The value as GGUFReader's ``contents()`` gives it (nested arrays flattened)."""
    if v.type != V.ARRAY:
        return v.value
    if v.element == V.ARRAY:
        return [x for inner in v.value for x in flat(inner)]
    return list(v.value) if v.element == V.STRING else np.asarray(v.value).tolist()


def assert_same_as_gguf_reader(path):
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields)
    for key, field in fields.items():
        assert types_of(ours.fields[key]) == [int(t) for t in field.types], key
        if gguf_reads_it_whole(ours.fields[key]):
            assert flat(ours.fields[key]) == field.contents(), key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    assert ours.alignment == theirs.alignment and ours.data_offset == theirs.data_offset
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type.name and mine.offset == t.data_offset
        assert mine.shape == tuple(reversed(t.shape.tolist())) and mine.nbytes == t.n_bytes
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape
        np.testing.assert_array_equal(mine.data, t.data)
        assert isinstance(mine.data, np.memmap)                   # a view, not a copy
    return ours
