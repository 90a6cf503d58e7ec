"""The autograd engine: accumulation, graph shapes, freeing, grad modes, dtypes, errors."""

import gc
import weakref

import numpy as np
import pytest
from hypothesis import given

import tinylm.ops as F
from tinylm import testing
from tinylm.autograd import enable_grad, is_grad_enabled, no_grad, unbroadcast
from tinylm.errors import GraphError, ShapeError, TinyLMError
from tinylm.function import Function
from tinylm.tensor import Tensor

X = np.array([[0.5, -1.5, 2.0], [1.0, 0.25, -0.75]])


def leaf(a=X, dtype=np.float64):
    return Tensor(np.array(a, dtype=dtype), requires_grad=True)


# --------------------------------------------------------------------------- accumulation


def test_tensor_used_twice_accumulates():
    x = leaf()
    (x * x + x).sum().backward()
    testing.assert_close(x.grad, 2 * X + 1)


def test_diamond_graph():
    x = leaf()
    a = x.exp()
    b, c = a * 2, a.tanh()
    (b + c).sum().backward()
    e = np.exp(X)
    testing.assert_close(x.grad, e * (2 + (1 - np.tanh(e) ** 2)))


def test_grad_accumulates_over_backward_calls():
    x = leaf()
    (x * 3).sum().backward()
    (x * 4).sum().backward()
    testing.assert_close(x.grad, np.full_like(X, 7.0))


def test_same_tensor_as_both_inputs_of_one_op():
    x = leaf()
    F.mul(x, x).sum().backward()
    testing.assert_close(x.grad, 2 * X)


# --------------------------------------------------------------------------- graph lifetime


def test_backward_twice_raises_graph_error():
    x = leaf()
    y = (x * x).sum()
    y.backward()
    with pytest.raises(GraphError, match="retain_graph"):
        y.backward()


def test_backward_through_a_freed_subgraph_raises_graph_error():
    x = leaf()
    h = x.exp()
    h.sum().backward()
    with pytest.raises(GraphError, match="retain_graph"):
        (h * 2).sum().backward()


def test_retain_graph_allows_a_second_backward():
    x = leaf()
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    testing.assert_close(x.grad, 4 * X)


def test_graph_is_released_after_backward():
    x = leaf()
    h = x.silu()
    creator = h.creator
    saved = weakref.ref(creator.s)  # Silu keeps sigmoid(x), an array no tensor holds
    y = h.tanh().sum()
    y.backward()
    gc.collect()
    assert saved() is None, "the saved activation outlived backward"
    assert creator.inputs is None


def test_retained_graph_keeps_saved_arrays():
    x = leaf()
    h = x.silu()
    saved = weakref.ref(h.creator.s)
    h.sum().backward(retain_graph=True)
    gc.collect()
    assert saved() is not None


def test_deep_chain_does_not_hit_the_recursion_limit():
    x = leaf(np.array([0.5]))
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.sum().backward()
    testing.assert_close(x.grad, np.array([1.0001**5000]), rtol=1e-9)


def test_deep_unused_chain_is_collected():
    """A 5000-op graph nobody runs backward on is freed, every node of it, as soon as
    its last tensor goes (deleting it does not hit the recursion limit either)."""
    x = leaf(np.array([0.5]))
    y = x
    probes = []  # weak references to the data of every 500th tensor in the chain
    for k in range(5000):
        y = y + 1.0
        if k % 500 == 0:
            probes.append(weakref.ref(y.data))
    testing.assert_close(y.data, np.array([5000.5]))
    probes.append(weakref.ref(y.data))
    assert all(p() is not None for p in probes)  # the graph holds them while y lives
    del y
    gc.collect()
    alive = [k for k, p in enumerate(probes) if p() is not None]
    assert not alive, f"{len(alive)} of {len(probes)} chain tensors outlived the chain"
    assert x.grad is None and x.data[0] == 0.5  # the leaf is untouched


# --------------------------------------------------------------------------- grad modes


def test_no_grad_builds_no_graph():
    x = leaf()
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2).exp()
    assert is_grad_enabled()
    assert y.creator is None and not y.requires_grad
    with pytest.raises(GraphError):
        y.sum().backward()


def test_enable_grad_inside_no_grad():
    x = leaf()
    with no_grad():
        with enable_grad():
            y = x * 2
        z = x * 2
    assert y.creator is not None and z.creator is None


def test_no_grad_restores_state_after_an_exception():
    with pytest.raises(RuntimeError):
        with no_grad():
            raise RuntimeError
    assert is_grad_enabled()


def test_detach_cuts_the_graph():
    x = leaf()
    d = (x * 2).detach()
    assert d.creator is None and not d.requires_grad
    np.testing.assert_array_equal(d.data, 2 * X)
    ((x * d).sum()).backward()
    testing.assert_close(x.grad, 2 * X)  # d is a constant: no d(d)/dx term


def test_requires_grad_propagation():
    a, b = leaf(), Tensor(X)
    assert (a + b).requires_grad and (b + a).requires_grad
    assert not (b * b).requires_grad and (b * b).creator is None
    c = b * 3
    c.requires_grad_()
    (c * a).sum().backward()
    assert c.grad is not None  # a leaf that asked for grad collects it
    assert b.grad is None


def test_gradient_only_to_inputs_that_require_it():
    a, b = leaf(), Tensor(X + 1)
    (a * b).sum().backward()
    assert b.grad is None
    testing.assert_close(a.grad, X + 1)


def test_non_scalar_backward_needs_a_gradient():
    x = leaf()
    with pytest.raises(GraphError, match="scalar"):
        (x * 2).backward()
    (x * 2).backward(np.ones_like(X))
    testing.assert_close(x.grad, np.full_like(X, 2.0))


def test_backward_without_requires_grad_raises():
    with pytest.raises(GraphError):
        Tensor(X).sum().backward()


def test_retain_grad_on_a_non_leaf():
    x = leaf()
    h = x * 3
    h.retain_grad()
    g = x * 5  # no retain_grad: no .grad
    (h * h + g).sum().backward()
    testing.assert_close(h.grad, 2 * 3 * X)
    assert g.grad is None
    testing.assert_close(x.grad, 18 * X + 5)


def test_comparisons_are_outside_the_graph():
    x = leaf()
    m = x > 0
    assert m.dtype == bool and m.creator is None and not m.requires_grad


# --------------------------------------------------------------------------- multi-output


def test_split_with_only_one_output_used():
    x = leaf()
    a, b = F.split(x, [1, 2], axis=1)
    (b * b).sum().backward()
    expected = 2 * X
    expected[:, 0] = 0
    testing.assert_close(x.grad, expected)


def test_split_with_both_outputs_used_in_different_places():
    x = leaf()
    a, b, c = F.split(x, 1, axis=1)
    (a * 2 + (c * c)).sum().backward()
    expected = np.stack([np.full(2, 2.0), np.zeros(2), 2 * X[:, 2]], axis=1)
    testing.assert_close(x.grad, expected)


def test_backward_from_the_second_output():
    x = leaf()
    a, b = F.split(x, [2, 1], axis=1)
    b.sum().backward()
    testing.assert_close(x.grad, np.array([[0, 0, 1.0], [0, 0, 1.0]]))


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "op",
    [
        lambda x: x * 2, lambda x: 2 * x, lambda x: x + 1.5, lambda x: 1.5 - x,
        lambda x: x / 3, lambda x: 3.0 / x, lambda x: x**2, lambda x: x**0.5,
        lambda x: x.mean(), lambda x: x.var(axis=0), lambda x: x.gelu(), lambda x: x.gelu("tanh"),
        lambda x: F.softmax(x), lambda x: F.layer_norm(x), lambda x: x.masked_fill(x > 1, 0.0),
        lambda x: F.cross_entropy(x, np.array([0, 2])), lambda x: x.max(axis=1),
        lambda x: F.logsumexp(x, axis=1), lambda x: F.dropout(x, 0.5),
    ],
)
def test_float32_stays_float32_with_python_scalars(op):
    x = leaf(np.abs(X) + 0.5, dtype=np.float32)
    y = op(x)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_python_float_data_is_float32():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(np.array([1.0])).dtype == np.float64


def test_cast_gradient_returns_to_the_source_dtype():
    x = leaf()
    y = x.astype("float32")
    assert y.dtype == np.float32
    (y * y).sum().backward()
    assert x.grad.dtype == np.float64
    testing.assert_close(x.grad, 2 * X, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- broadcasting


@given(testing.broadcastable_shapes(2))
def test_broadcast_gradients_are_reduced_to_the_input_shape(shapes):
    sa, sb = shapes
    a, b = leaf(np.ones(sa) * 2), leaf(np.ones(sb) * 3)
    (a * b).sum().backward()
    out = np.broadcast_shapes(sa, sb)
    n = int(np.prod(out))
    assert a.grad.shape == sa and b.grad.shape == sb
    testing.assert_close(a.grad, np.full(sa, 3.0 * n / max(int(np.prod(sa)), 1)))
    testing.assert_close(b.grad, np.full(sb, 2.0 * n / max(int(np.prod(sb)), 1)))


def test_unbroadcast():
    g = np.arange(24.0).reshape(2, 3, 4)
    testing.assert_close(unbroadcast(g, (3, 1)), g.sum(axis=(0, 2)).reshape(3, 1))
    testing.assert_close(unbroadcast(g, ()), np.array(g.sum()))
    assert unbroadcast(g, (2, 3, 4)) is g


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_tinylm_errors():
    x = leaf()
    cases = [
        lambda: x @ leaf(np.ones((2, 2))),  # inner dims 3 vs 2
        lambda: x.reshape(4, 2),
        lambda: x.sum(axis=2),
        lambda: x.max(axis=-3),
        lambda: x.transpose(0, 0),
        lambda: x.swapaxes(0, 2),
        lambda: x.unsqueeze(4),
        lambda: x.squeeze(0),
        lambda: x.squeeze(5),
        lambda: x.expand(5, 5),
        lambda: x.split(4, axis=3),
        lambda: x.split([1, 1], axis=1),
        lambda: F.concat([x, leaf(np.ones((3, 3)))], axis=1),
        lambda: F.concat([x, x], axis=2),
        lambda: F.stack([x, leaf(np.ones((3, 3)))]),
        lambda: F.linear(x, leaf(np.ones((4, 2)))),
        lambda: F.cross_entropy(x, np.array([0, 3])),
        lambda: F.cross_entropy(x, np.array([0, 1, 2])),
        lambda: F.embedding(np.array([0, 2]), x),
        lambda: F.embedding(np.array([0.5]), x),
        lambda: F.gelu(x, approximate="fast"),
        lambda: F.dropout(x, 1.0),
        lambda: F.scaled_dot_product_attention(x, x, x),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(TinyLMError):
            case()
            pytest.fail(f"case {i} raised nothing")


def test_shape_errors_are_value_errors_too():
    with pytest.raises(ShapeError) as info:
        leaf() @ leaf(np.ones((2, 2)))
    assert isinstance(info.value, ValueError)
    assert "(2, 3)" in str(info.value) and "(2, 2)" in str(info.value)


def test_function_subclass_with_a_python_scalar_input():
    class Scale(Function):
        def forward(self, xp, x, s):
            self.s = s
            return x * s

        def backward(self, xp, grad):
            return grad * self.s, None

    x = leaf(dtype=np.float32)
    y = Scale.apply(x, 2.5)
    assert y.dtype == np.float32
    y.sum().backward()
    testing.assert_close(x.grad, np.full(X.shape, 2.5, np.float32))
