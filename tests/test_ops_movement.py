"""tinylm/ops/movement.py: reshape, transpose, swapaxes, broadcast_to, (un)squeeze,
getitem (basic, integer gather with repeats, boolean), concat, stack, split."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from op_helpers import check_device, check_torch

import tinylm.ops as F
from tinylm import testing
from tinylm.errors import ShapeError
from tinylm.tensor import Tensor

arrays, shapes = testing.arrays, testing.shapes


def exact(actual, expected):
    testing.assert_close(actual, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- reshape


@st.composite
def reshape_case(draw):
    shape = draw(shapes(max_dims=4), label="shape")
    x = draw(arrays(shape), label="x")
    sides = [n for n in shape if n != 1]
    target = list(draw(st.permutations(sides), label="order"))
    for _ in range(draw(st.integers(0, 2), label="ones")):
        target.insert(draw(st.integers(0, len(target)), label="where"), 1)
    if target and draw(st.booleans(), label="infer"):
        target[draw(st.integers(0, len(target) - 1), label="which")] = -1
    return x, tuple(target)


@given(reshape_case())
def test_reshape(case):
    x, target = case
    y = F.reshape(Tensor(x), target)
    exact(y, x.reshape(target))
    testing.gradcheck(lambda t: F.reshape(t, target), x)


@given(reshape_case())
def test_reshape_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, target = case
    check_torch(torch, lambda t: t.reshape(target), lambda t: t.reshape(target), x, rtol=0, atol=0)


def test_reshape_methods():
    x = np.arange(24.0).reshape(2, 3, 4)
    exact(Tensor(x).reshape(4, 6), x.reshape(4, 6))
    exact(Tensor(x).view((6, -1)), x.reshape(6, -1))
    exact(Tensor(x).flatten(), x.ravel())
    exact(Tensor(x).flatten(1), x.reshape(2, 12))


# --------------------------------------------------------------------------- transpose


@st.composite
def permute_case(draw):
    shape = draw(shapes(max_dims=4), label="shape")
    perm = draw(st.permutations(range(len(shape))), label="perm")
    # spell some axes negatively
    perm = tuple(a - len(shape) if draw(st.booleans()) else a for a in perm)
    return draw(arrays(shape), label="x"), perm


@given(permute_case())
def test_transpose(case):
    x, perm = case
    exact(F.transpose(Tensor(x), perm), np.transpose(x, perm))
    exact(F.transpose(Tensor(x)), x.T)
    testing.gradcheck(lambda t: F.transpose(t, perm), x)


@given(permute_case())
def test_transpose_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, perm = case
    check_torch(torch, lambda t: t.permute(*perm), lambda t: t.permute(perm), x, rtol=0, atol=0)


@given(data=st.data())
def test_swapaxes(data):
    shape = data.draw(shapes(min_dims=1, max_dims=4))
    x = data.draw(arrays(shape))
    n = len(shape)
    a, b = data.draw(st.integers(-n, n - 1)), data.draw(st.integers(-n, n - 1))
    exact(F.swapaxes(Tensor(x), a, b), np.swapaxes(x, a, b))
    testing.gradcheck(lambda t: t.swapaxes(a, b), x)


@given(data=st.data())
def test_swapaxes_and_unsqueeze_match_torch(data):
    torch = pytest.importorskip("torch")
    shape = data.draw(shapes(min_dims=1, max_dims=4))
    x = data.draw(arrays(shape))
    n = len(shape)
    a, b = data.draw(st.integers(-n, n - 1)), data.draw(st.integers(-n, n - 1))
    u = data.draw(st.integers(-n - 1, n))
    check_torch(torch, lambda t: F.unsqueeze(t.swapaxes(a, b), u) * 2,
                lambda t: t.transpose(a, b).unsqueeze(u) * 2, x, rtol=0, atol=0)
    check_torch(torch, lambda t: F.squeeze(t), lambda t: t.squeeze(), x, rtol=0, atol=0)


def test_transpose_methods():
    x = np.arange(24.0).reshape(2, 3, 4)
    exact(Tensor(x).T, x.T)
    exact(Tensor(x).transpose(), x.T)
    exact(Tensor(x).transpose(1, 0, 2), x.transpose(1, 0, 2))
    exact(Tensor(x).permute((2, 0, 1)), x.transpose(2, 0, 1))


# --------------------------------------------------------------------------- broadcast


@st.composite
def broadcast_case(draw):
    target = draw(shapes(max_dims=4), label="target")
    keep = draw(st.integers(0, len(target)), label="keep")
    src = tuple(1 if draw(st.booleans()) else n for n in target[len(target) - keep:])
    return draw(arrays(src), label="x"), target


@given(broadcast_case())
def test_broadcast_to(case):
    x, target = case
    exact(F.broadcast_to(Tensor(x), target), np.broadcast_to(x, target))
    exact(Tensor(x).expand(*target), np.broadcast_to(x, target))
    testing.gradcheck(lambda t: F.broadcast_to(t, target), x)


@given(broadcast_case())
def test_broadcast_to_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, target = case
    check_torch(torch, lambda t: t.expand(target), lambda t: t.expand(target), x, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- (un)squeeze


@given(data=st.data())
def test_unsqueeze_and_squeeze(data):
    shape = data.draw(shapes(max_dims=3))
    x = data.draw(arrays(shape))
    n = len(shape)
    axis = data.draw(st.integers(-n - 1, n))
    y = F.unsqueeze(Tensor(x), axis)
    exact(y, np.expand_dims(x, axis))
    exact(F.squeeze(y, axis), x)
    exact(F.squeeze(Tensor(x)), np.squeeze(x))
    testing.gradcheck(lambda t: F.squeeze(F.unsqueeze(t, axis) * 2, axis), x)
    testing.gradcheck(lambda t: t.unsqueeze(axis), x)


def test_squeeze_refuses_a_non_unit_axis():
    with pytest.raises(ShapeError, match="size 3"):
        F.squeeze(Tensor(np.ones((2, 3))), 1)


# --------------------------------------------------------------------------- getitem


@st.composite
def basic_index_case(draw):
    shape = draw(shapes(max_dims=3), label="shape")
    index = draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True), label="index")
    return draw(arrays(shape), label="x"), index


@given(basic_index_case())
def test_getitem_basic(case):
    x, index = case
    exact(Tensor(x)[index], x[index])
    testing.gradcheck(lambda t: t[index], x)


@st.composite
def gather_case(draw):
    """x[ids] along one axis (with repeated and negative ids), optionally with a slice."""
    shape = draw(shapes(min_dims=1, max_dims=3, min_side=2), label="shape")
    axis = draw(st.integers(0, len(shape) - 1), label="axis")
    n = shape[axis]
    ids = draw(hnp.arrays(np.int64, draw(shapes(min_dims=1, max_dims=2), label="ids shape"),
                          elements=st.integers(-n, n - 1)), label="ids")
    index = (slice(None),) * axis + (ids,)
    if axis + 1 < len(shape) and draw(st.booleans(), label="slice after"):
        index += (slice(1, None),)
    return draw(arrays(shape), label="x"), index


@given(gather_case())
def test_getitem_integer_gather_with_repeats(case):
    x, index = case
    exact(Tensor(x)[index], x[index])
    testing.gradcheck(lambda t: t[index], x)


@given(gather_case())
def test_getitem_integer_gather_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, index = case
    t_index = tuple(torch.from_numpy(i) if isinstance(i, np.ndarray) else i for i in index)
    check_torch(torch, lambda t: t[index], lambda t: t[t_index], x, rtol=1e-12, atol=1e-15)


def test_getitem_repeated_ids_accumulate():
    x = Tensor(np.arange(4.0), requires_grad=True)
    x[np.array([1, 1, 3, 1])].sum().backward()
    exact(x.grad, np.array([0.0, 3.0, 0.0, 1.0]))


@given(data=st.data())
def test_getitem_multi_axis_integer_arrays(data):
    shape = data.draw(shapes(min_dims=2, max_dims=3))
    index = data.draw(hnp.integer_array_indices(shape, result_shape=shapes(min_dims=1, max_dims=2)))
    x = data.draw(arrays(shape))
    exact(Tensor(x)[index], x[index])
    testing.gradcheck(lambda t: t[index], x)


@given(data=st.data())
def test_getitem_boolean_mask(data):
    x = data.draw(arrays(shapes(min_dims=1, max_dims=3)))
    mask = data.draw(hnp.arrays(bool, x.shape))
    exact(Tensor(x)[mask], x[mask])
    exact(Tensor(x)[Tensor(mask)], x[mask])
    testing.gradcheck(lambda t: t[mask], x)


def test_getitem_tensor_index():
    x = np.arange(12.0).reshape(3, 4)
    ids = Tensor(np.array([2, 0, 2]))
    exact(Tensor(x)[ids], x[[2, 0, 2]])
    exact(Tensor(x)[:, ids], x[:, [2, 0, 2]])
    testing.gradcheck(lambda t: t[ids, 1:], x)


# --------------------------------------------------------------------------- concat, stack


@st.composite
def join_case(draw, same_shape):
    shape = draw(shapes(min_dims=1, max_dims=3), label="shape")
    k = draw(st.integers(1, 3), label="k")
    axis = draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    xs = []
    for _ in range(k):
        s = list(shape)
        if not same_shape:
            s[axis] = draw(st.integers(1, 3))
        xs.append(draw(arrays(tuple(s))))
    return xs, axis


@given(join_case(same_shape=False))
def test_concat(case):
    xs, axis = case
    exact(F.concat([Tensor(x) for x in xs], axis=axis), np.concatenate(xs, axis=axis))
    testing.gradcheck(lambda *ts: F.concat(list(ts), axis=axis), *xs)


@given(join_case(same_shape=False))
def test_concat_matches_torch(case):
    torch = pytest.importorskip("torch")
    xs, axis = case
    check_torch(torch, lambda *ts: F.concat(list(ts), axis=axis),
                lambda *ts: torch.cat(ts, dim=axis), *xs, rtol=0, atol=0)


@given(join_case(same_shape=True), st.data())
def test_stack(case, data):
    xs, _ = case
    ndim = xs[0].ndim
    axis = data.draw(st.integers(-ndim - 1, ndim))
    exact(F.stack([Tensor(x) for x in xs], axis=axis), np.stack(xs, axis=axis))
    testing.gradcheck(lambda *ts: F.stack(list(ts), axis=axis), *xs)


@given(join_case(same_shape=True), st.data())
def test_stack_matches_torch(case, data):
    torch = pytest.importorskip("torch")
    xs, _ = case
    ndim = xs[0].ndim
    axis = data.draw(st.integers(-ndim - 1, ndim))
    check_torch(torch, lambda *ts: F.stack(list(ts), axis=axis),
                lambda *ts: torch.stack(ts, dim=axis), *xs, rtol=0, atol=0)


def test_concat_shape_mismatch():
    with pytest.raises(ShapeError, match="concatenate"):
        F.concat([Tensor(np.ones((2, 3))), Tensor(np.ones((3, 3)))], axis=1)


# --------------------------------------------------------------------------- split


@st.composite
def split_case(draw):
    shape = draw(shapes(min_dims=1, max_dims=3, max_side=5), label="shape")
    axis = draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    n = shape[axis]
    if draw(st.booleans(), label="by size"):
        sections = draw(st.integers(1, n + 1), label="size")
    else:
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3), label="cuts"))
        bounds = [0, *cuts, n]
        sections = [b - a for a, b in zip(bounds, bounds[1:])]
    return draw(arrays(shape), label="x"), sections, axis


def ref_split(x, sections, axis):
    n = x.shape[axis]
    sizes = [sections] * (n // sections) + ([n % sections] if n % sections else []) \
        if isinstance(sections, int) else sections
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


def _weighted_join(pieces, axis):
    # every piece weighted differently, so a gradient routed to the wrong piece shows
    return F.concat([p * float(i + 1) for i, p in enumerate(pieces)], axis=axis)


@given(split_case())
def test_split(case):
    x, sections, axis = case
    pieces = F.split(Tensor(x), sections, axis=axis)
    pieces = pieces if isinstance(pieces, tuple) else (pieces,)
    expected = ref_split(x, sections, axis)
    assert len(pieces) == len(expected)
    for p, e in zip(pieces, expected):
        exact(p, e)

    def fn(t):
        out = F.split(t, sections, axis=axis)
        return _weighted_join(out if isinstance(out, tuple) else (out,), axis)

    testing.gradcheck(fn, x)
    testing.gradcheck(lambda t: F.split(t, sections, axis=axis), x)  # every output at once


@given(split_case())
def test_split_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, sections, axis = case

    def fn(t):
        out = F.split(t, sections, axis=axis)
        return _weighted_join(out if isinstance(out, tuple) else (out,), axis)

    def torch_fn(t):
        out = torch.split(t, sections, dim=axis)
        return torch.cat([p * float(i + 1) for i, p in enumerate(out)], dim=axis)

    check_torch(torch, fn, torch_fn, x, rtol=0, atol=0)


def test_split_errors():
    x = Tensor(np.ones((2, 5)))
    with pytest.raises(ShapeError, match="add up"):
        F.split(x, [2, 2], axis=1)
    with pytest.raises(ShapeError, match="positive"):
        F.split(x, 0, axis=1)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("case", ["shape", "index", "join"])
def test_movement_on_device(device, case):
    x = np.random.default_rng(2).standard_normal((2, 3, 4))
    ids = np.array([2, 0, 2, 1])
    if case == "shape":
        fn = lambda t: F.broadcast_to(  # noqa: E731
            F.unsqueeze(F.swapaxes(F.reshape(F.transpose(t, (2, 0, 1)), (4, 6)), 0, 1), 0), (2, 6, 4)
        )
    elif case == "index":
        fn = lambda t: t[:, ids, 1:] * 2 + t[1, ..., None][..., ids, :].sum() + t[t > 0.5].sum()  # noqa: E731
    else:
        fn = lambda t: F.concat([*F.split(F.stack([t, t * 2], axis=1), [1, 2], axis=2)], axis=2)  # noqa: E731
    check_device(device, fn, x)


@given(B=st.integers(1, 3), T=st.integers(1, 5), sizes=st.lists(st.integers(1, 3), min_size=1,
                                                                  max_size=4),
       hs=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_split_of_heads_hands_on_gradients_made_in_place_without_a_copy(B, T, sizes, hs, seed):
    """The heads of a fused projection (B, T, n, hs) seen as (B, n, T, hs), split along
    the heads: gradients made by ``empty_views_like`` in their pieces' places come back
    as one view of their buffer (no concatenation), with the concatenation's values;
    gradients anywhere else are concatenated as before."""
    from tinylm.ops.movement import Split, empty_views_like

    rng = np.random.default_rng(seed)
    n = sum(sizes)
    fused = rng.standard_normal((B, T, n, hs)).astype(np.float32)
    x = Tensor(fused.transpose(0, 2, 1, 3), requires_grad=True)
    pieces = Split.apply(x, sizes=sizes, axis=1)
    grads = empty_views_like(*(p.data for p in pieces))
    for g in grads:
        g[...] = rng.standard_normal(g.shape)
    want = np.concatenate(grads, axis=1)
    node = pieces[0].creator
    node.needs_input_grad = (True,)
    joined = node.backward(np, *grads)
    np.testing.assert_array_equal(joined, want)
    assert np.shares_memory(joined, grads[0]) and joined.strides == x.data.strides
    fresh = [g.copy() for g in grads]  # each in its own buffer: concatenated
    copied = node.backward(np, *fresh)
    np.testing.assert_array_equal(copied, want)
    if len(sizes) > 1:
        assert not any(np.shares_memory(copied, g) for g in fresh)


def test_split_backward_through_the_graph_with_views_matches_the_plain_gradient():
    """End to end: q, k, v of a fused projection through attention; the gradient of the
    projection's input equals the one computed with the heads copied apart first."""
    rng = np.random.default_rng(3)
    xa = rng.standard_normal((2, 5, 8)).astype(np.float32)
    w = rng.standard_normal((24, 8)).astype(np.float32) * 0.3

    def run(copy_heads):
        x, wt = Tensor(xa, requires_grad=True), Tensor(w, requires_grad=True)
        heads = F.linear(x, wt).reshape(2, 5, 6, 4).transpose(0, 2, 1, 3)
        q, k, v = heads.split([2, 2, 2], axis=1)
        if copy_heads:
            q, k, v = (t * 1.0 for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        (y * y).sum().backward()
        return x.grad, wt.grad

    for a, b in zip(run(False), run(True)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
