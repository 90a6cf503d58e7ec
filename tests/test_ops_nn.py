"""tinylm/ops/nn.py: the fused ops embedding, softmax, log_softmax, cross_entropy,
layer_norm, rms_norm and dropout: forward vs NumPy, backward vs finite differences,
value and gradient vs torch in float64 and float32."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from op_helpers import check_device, check_torch, tinylm_run, torch_run

import tinylm.ops as F
from tinylm import backend, testing
from tinylm.errors import ShapeError, TinyLMError
from tinylm.tensor import Tensor

F32 = dict(rtol=1e-5, atol=1e-5)  # float32 vs torch float32: different summation orders
F64 = dict(rtol=1e-10, atol=1e-12)


def ref_log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


# --------------------------------------------------------------------------- embedding


@st.composite
def embedding_case(draw, dtype=np.float64):
    V, D = draw(st.integers(1, 5), label="V"), draw(st.integers(1, 3), label="D")
    ids_shape = draw(testing.shapes(min_dims=1, max_dims=2, max_side=5), label="ids shape")
    ids = draw(hnp.arrays(np.int64, ids_shape, elements=st.integers(0, V - 1)), label="ids")
    return ids, draw(testing.arrays((V, D), dtype), label="weight")


@given(embedding_case())
def test_embedding(case):
    ids, w = case
    y = F.embedding(Tensor(ids), Tensor(w))
    testing.assert_close(y, np.take(w, ids, axis=0), rtol=0, atol=0)
    testing.gradcheck(F.embedding, ids, w)


def test_embedding_repeated_ids_accumulate():
    w = Tensor(np.zeros((4, 2)), requires_grad=True)
    ids = np.array([[1, 3], [1, 1]])
    F.embedding(ids, w).backward(np.ones((2, 2, 2)))
    testing.assert_close(w.grad, np.array([[0, 0], [3, 3], [0, 0], [1, 1.0]]))


@pytest.mark.parametrize("dtype, tol", [(np.float64, F64), (np.float32, F32)])
@given(data=st.data())
def test_embedding_matches_torch(dtype, tol, data):
    torch = pytest.importorskip("torch")
    ids, w = data.draw(embedding_case(dtype))
    check_torch(torch, F.embedding, torch.nn.functional.embedding, ids, w, **tol)


def test_embedding_rejects_bad_ids():
    w = Tensor(np.ones((3, 2)))
    with pytest.raises(TinyLMError, match="integers"):
        F.embedding(np.array([0.0]), w)
    with pytest.raises(TinyLMError, match=r"outside \[0, 3\)"):
        F.embedding(np.array([0, 3]), w)
    with pytest.raises(TinyLMError, match="outside"):
        F.embedding(np.array([-1]), w)


# --------------------------------------------------------------------------- softmax


@st.composite
def softmax_case(draw, dtype=np.float64):
    shape = draw(testing.shapes(min_dims=1, max_dims=3), label="shape")
    axis = draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    return draw(testing.arrays(shape, dtype), label="x"), axis


@given(softmax_case())
def test_softmax(case):
    x, axis = case
    e = np.exp(x)
    testing.assert_close(F.softmax(Tensor(x), axis=axis), e / e.sum(axis=axis, keepdims=True),
                         rtol=1e-12, atol=1e-15)
    testing.gradcheck(lambda t: F.softmax(t, axis=axis), x)


@given(softmax_case())
def test_log_softmax(case):
    x, axis = case
    expected = x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
    testing.assert_close(F.log_softmax(Tensor(x), axis=axis), expected, rtol=1e-12, atol=1e-12)
    testing.gradcheck(lambda t: F.log_softmax(t, axis=axis), x)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, F64), (np.float32, F32)])
@given(data=st.data())
def test_softmax_matches_torch(name, dtype, tol, data):
    torch = pytest.importorskip("torch")
    x, axis = data.draw(softmax_case(dtype))
    check_torch(torch, lambda t: getattr(F, name)(t, axis=axis),
                lambda t: getattr(torch.nn.functional, name)(t, dim=axis), x, **tol)


def test_softmax_is_stable_for_large_logits():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]])
    y = F.softmax(Tensor(x))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    testing.assert_close(y, e / e.sum(axis=1, keepdims=True))
    testing.assert_close(F.log_softmax(Tensor(x)), ref_log_softmax(x, -1))
    testing.assert_close(Tensor(x).softmax(), y)


# --------------------------------------------------------------------------- cross-entropy


@st.composite
def ce_case(draw, dtype=np.float64):
    lead = draw(testing.shapes(min_dims=0, max_dims=2, max_side=4), label="lead")
    V = draw(st.integers(2, 5), label="V")
    logits = draw(testing.arrays(lead + (V,), dtype), label="logits")
    ignore_index = draw(st.sampled_from([-100, 1, 7]), label="ignore_index")
    targets = draw(hnp.arrays(np.int64, lead, elements=st.integers(0, V - 1)), label="targets")
    drop = draw(hnp.arrays(bool, lead), label="ignored")
    targets = np.where(drop, ignore_index, targets)
    if (targets == ignore_index).all():  # "mean" over no target is 0/0
        targets.reshape(-1)[0] = 0 if ignore_index != 0 else 1
    smoothing = draw(st.sampled_from([0.0, 0.1, 0.4]), label="label_smoothing")
    reduction = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    return logits, targets, dict(ignore_index=ignore_index, label_smoothing=smoothing,
                                 reduction=reduction)


def ref_cross_entropy(logits, targets, ignore_index, label_smoothing, reduction):
    V = logits.shape[-1]
    logp = ref_log_softmax(logits, -1).reshape(-1, V)
    t = targets.reshape(-1)
    losses = np.zeros(len(t))
    for i, ti in enumerate(t):
        if ti == ignore_index:
            continue
        q = np.full(V, label_smoothing / V)  # the smoothed target distribution
        q[ti] += 1 - label_smoothing
        losses[i] = -(q * logp[i]).sum()
    if reduction == "none":
        return losses.reshape(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (t != ignore_index).sum()


@given(ce_case())
def test_cross_entropy(case):
    logits, targets, kw = case
    y = F.cross_entropy(Tensor(logits), Tensor(targets), **kw)
    testing.assert_close(y, ref_cross_entropy(logits, targets, **kw), rtol=1e-12, atol=1e-12)
    testing.gradcheck(lambda lg, t: F.cross_entropy(lg, t, **kw), logits, targets)


def _torch_cross_entropy(torch, kw):
    def fn(logits, targets):
        V = logits.shape[-1]
        y = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), **kw)
        return y.reshape(targets.shape) if kw["reduction"] == "none" else y

    return fn


@pytest.mark.parametrize("dtype, tol", [(np.float64, F64), (np.float32, F32)])
@given(data=st.data())
def test_cross_entropy_matches_torch(dtype, tol, data):
    torch = pytest.importorskip("torch")
    logits, targets, kw = data.draw(ce_case(dtype))
    check_torch(torch, lambda lg, t: F.cross_entropy(lg, t, **kw), _torch_cross_entropy(torch, kw),
                logits, targets, **tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_float32_stays_float32(reduction):
    logits = Tensor(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
                    requires_grad=True)
    y = F.cross_entropy(logits, np.array([0, -100, 3]), reduction=reduction)
    assert y.dtype == np.float32
    y.sum().backward()
    assert logits.grad.dtype == np.float32


def test_cross_entropy_errors():
    logits = Tensor(np.zeros((2, 3)))
    with pytest.raises(ShapeError, match="targets"):
        F.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(TinyLMError, match="outside"):
        F.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(TinyLMError, match="reduction"):
        F.cross_entropy(logits, np.array([0, 1]), reduction="avg")
    with pytest.raises(TinyLMError, match="label_smoothing"):
        F.cross_entropy(logits, np.array([0, 1]), label_smoothing=1.0)


# --------------------------------------------------------------------------- norms


@st.composite
def norm_case(draw, dtype=np.float64, rms=False):
    lead = draw(testing.shapes(min_dims=0, max_dims=2, max_side=3), label="lead")
    D = draw(st.integers(2, 5), label="D")
    x = draw(testing.arrays(lead + (D,), dtype), label="x")
    w = draw(testing.arrays((D,), dtype) if rms else st.one_of(st.none(), testing.arrays((D,), dtype)),
             label="weight")
    b = None if rms else draw(st.one_of(st.none(), testing.arrays((D,), dtype)), label="bias")
    return x, w, b


def ref_layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def _layer_norm_call(w, b, eps, torch=None):
    """A function of the present inputs only (x, then weight and bias when given)."""
    def fn(x, *params):
        params = list(params)
        weight = params.pop(0) if w is not None else None
        bias = params.pop(0) if b is not None else None
        if torch is None:
            return F.layer_norm(x, weight, bias, eps=eps)
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps=eps)

    return fn


@given(norm_case(), st.sampled_from([1e-5, 0.1]))
def test_layer_norm(case, eps):
    x, w, b = case
    inputs = [a for a in (x, w, b) if a is not None]
    fn = _layer_norm_call(w, b, eps)
    testing.assert_close(fn(*map(Tensor, inputs)), ref_layer_norm(x, w, b, eps), rtol=1e-10, atol=1e-10)
    testing.gradcheck(fn, *inputs)


@pytest.mark.parametrize("dtype, tol", [(np.float64, F64), (np.float32, dict(rtol=1e-4, atol=1e-4))])
@given(data=st.data())
def test_layer_norm_matches_torch(dtype, tol, data):
    torch = pytest.importorskip("torch")
    x, w, b = data.draw(norm_case(dtype))
    inputs = [a for a in (x, w, b) if a is not None]
    ours, theirs = _layer_norm_call(w, b, 1e-5), _layer_norm_call(w, b, 1e-5, torch)
    if dtype == np.float32:
        # A (near-)constant row: x - mean is pure rounding of the mean, amplified by
        # 1/sqrt(eps) ~ 316, on both sides; no float32 answer is closer than that.
        std = x.std(axis=-1)
        assume(float(std.min(initial=1.0)) > 1e-2)
        # Otherwise the float64 answer is the oracle: ours to float32 accuracy.
        out, grads, cot = tinylm_run(ours, *inputs)
        t_out, t_grads = torch_run(torch, theirs, *[a.astype(np.float64) for a in inputs],
                                   cot=cot.astype(np.float64))
        testing.assert_close(out, t_out, **tol, msg="value vs torch float64")
        # The input gradient's float32 floor: an ulp of the mean, (x - mean) off by it,
        # times rstd ~ 1/std, times xhat's share ~ 1/std again (row [2.367, 2.406]:
        # 1.9e-4 off the float64 answer on the NumPy path and the compiled one alike).
        x64 = x.astype(np.float64)
        floor = float((6e-8 * 8 * np.abs(x64.mean(-1)) / (x64.var(-1) + 1e-5)).max(initial=0.0)
                      * np.abs(cot).max(initial=0.0))
        for i, (g, tg) in enumerate(zip(grads, t_grads)):
            tol_i = dict(tol, atol=max(tol["atol"], floor)) if i == 0 else tol
            testing.assert_close(g, tg, **tol_i, msg=f"grad of input {i} vs torch float64")
        # Against torch's own float32 only where rows are well conditioned: the input
        # gradient's rounding grows like (|mean| / std)^2 (a row [2.625, 2.6015625]:
        # torch float32 is 5e-4 off the float64 answer, ours 6e-6).
        assume(float((std / np.maximum(np.abs(x.mean(axis=-1)), std)).min(initial=1.0)) > 5e-2)
    check_torch(torch, ours, theirs, *inputs, **tol)


@given(norm_case(rms=True), st.sampled_from([1e-6, 0.1]))
def test_rms_norm(case, eps):
    x, w, _ = case
    expected = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * w
    testing.assert_close(F.rms_norm(Tensor(x), Tensor(w), eps=eps), expected, rtol=1e-10, atol=1e-10)
    testing.gradcheck(lambda a, b: F.rms_norm(a, b, eps=eps), x, w)


@pytest.mark.parametrize("dtype, tol", [(np.float64, F64), (np.float32, dict(rtol=1e-4, atol=1e-4))])
@given(data=st.data())
def test_rms_norm_matches_torch(dtype, tol, data):
    torch = pytest.importorskip("torch")
    x, w, _ = data.draw(norm_case(dtype, rms=True))
    check_torch(torch, lambda a, b: F.rms_norm(a, b, eps=1e-6),
                lambda a, b: torch.nn.functional.rms_norm(a, (a.shape[-1],), b, eps=1e-6), x, w, **tol)


# --------------------------------------------------------------------------- dropout


def test_dropout_p0_and_eval_are_identity():
    x = Tensor(np.arange(6.0), requires_grad=True)
    assert F.dropout(x, 0.0) is x
    assert F.dropout(x, 0.5, training=False) is x


def test_dropout_preserves_the_mean_and_drops_about_p():
    backend.seed(0)
    p, n = 0.3, 200_000
    y = F.dropout(Tensor(np.ones(n, np.float32)), p).numpy()
    assert y.dtype == np.float32
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)
    sigma = np.sqrt(p * (1 - p) / n)  # of the dropped fraction
    assert abs((~kept).mean() - p) < 6 * sigma
    assert abs(y.mean() - 1) < 6 * sigma / (1 - p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_gradient_is_the_mask_scale(p):
    backend.seed(1)
    x = Tensor(np.random.default_rng(0).uniform(0.5, 2, (4, 50)), requires_grad=True)
    y = F.dropout(x, p)
    cot = np.random.default_rng(1).standard_normal(x.shape)
    y.backward(cot)
    scale = y.data / x.data  # 0 or 1/(1-p) elementwise
    assert set(np.unique(np.round(scale, 9))) <= {0.0, round(1 / (1 - p), 9)}
    testing.assert_close(x.grad, cot * scale, rtol=1e-12, atol=0)


def test_dropout_gradcheck_with_a_fixed_mask():
    def fn(t):
        backend.seed(7)  # the same mask on every call
        return F.dropout(t, 0.4)

    testing.gradcheck(fn, np.random.default_rng(0).standard_normal((3, 5)))


def test_dropout_is_deterministic_under_seed():
    x = Tensor(np.ones((8, 16), np.float32))
    backend.seed(123)
    a = F.dropout(x, 0.5).numpy()
    b = F.dropout(x, 0.5).numpy()
    backend.seed(123)
    np.testing.assert_array_equal(F.dropout(x, 0.5).numpy(), a)
    np.testing.assert_array_equal(F.dropout(x, 0.5).numpy(), b)
    assert not np.array_equal(a, b)  # the stream moves on
    backend.seed(124)
    assert not np.array_equal(F.dropout(x, 0.5).numpy(), a)


def test_dropout_rejects_bad_p():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(TinyLMError, match="dropout"):
            F.dropout(Tensor(np.ones(3)), p)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("case", ["embedding", "softmax", "cross_entropy", "norms", "dropout"])
def test_nn_ops_on_device(device, case):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    if case == "embedding":
        check_device(device, F.embedding, np.array([[1, 0], [1, 2]]), rng.standard_normal((3, 4)))
    elif case == "softmax":
        check_device(device, lambda t: F.softmax(t, axis=1) * F.log_softmax(t, axis=-1), x)
    elif case == "cross_entropy":
        t = np.array([[0, 3, -100], [2, 1, 1]])
        for kw in (dict(), dict(label_smoothing=0.2, reduction="sum"), dict(reduction="none")):
            check_device(device, lambda lg, tt: F.cross_entropy(lg, tt, **kw), x, t)
    elif case == "norms":
        check_device(device, lambda a, ww, bb: F.layer_norm(a, ww, bb) + F.rms_norm(a, ww), x, w, b)
    else:
        # the device's generator draws its own masks: check the rules, not equality with NumPy
        backend.seed(0)
        xs = Tensor(backend.to_device(np.ones((64, 64)), device), requires_grad=True)
        y = F.dropout(xs, 0.25)
        y.sum().backward()
        data, grad = backend.to_numpy(y.data), backend.to_numpy(xs.grad)
        assert set(np.unique(data)) <= {0.0, 1 / 0.75}
        np.testing.assert_array_equal(grad, data)
        assert 0.15 < (data == 0).mean() < 0.35
