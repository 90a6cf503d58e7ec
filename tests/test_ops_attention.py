"""tinylm/ops/attention.py: scaled dot-product attention, causal and not, boolean and
additive masks, grouped-query heads, and T != S (a KV cache: query t sits at absolute
position S - T + t)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from op_helpers import check_device, check_torch

import tinylm.ops as F
from tinylm import backend, testing
from tinylm.errors import ShapeError
from tinylm.tensor import Tensor

sdpa = F.scaled_dot_product_attention


def allowed_causal(T, S):
    """(T, S) True where query t may see key s: s <= S - T + t."""
    return np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None]


def ref_attention(q, k, v, mask=None, is_causal=False, scale=None):
    """Per head, with explicit loops over batch and heads and NumPy's softmax."""
    B, H, T, hs = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(hs) if scale is None else scale
    mask = None if mask is None else np.broadcast_to(mask, (B, H, T, S))
    out = np.zeros((B, H, T, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)  # the kv head this query head shares
            s = q[b, h] @ k[b, kv].T * scale  # (T, S)
            if is_causal:
                s = np.where(allowed_causal(T, S), s, -np.inf)
            if mask is not None:
                s = np.where(mask[b, h], s, -np.inf) if mask.dtype == bool else s + mask[b, h]
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            out[b, h] = (p / p.sum(axis=-1, keepdims=True)) @ v[b, kv]
    return out


@st.composite
def attention_case(draw, dtype=np.float64, max_hs=2):
    B = draw(st.integers(1, 2), label="B")
    H = draw(st.sampled_from([1, 2, 4]), label="H")
    Hkv = draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]), label="Hkv")
    T = draw(st.integers(1, 3), label="T")
    is_causal = draw(st.booleans(), label="is_causal")
    S = draw(st.integers(T, T + 2) if is_causal else st.integers(1, 4), label="S")
    hs = draw(st.integers(1, max_hs), label="hs")
    arr = lambda shape, label: draw(testing.arrays(shape, dtype, min_value=-2, max_value=2), label=label)  # noqa: E731
    q, k, v = arr((B, H, T, hs), "q"), arr((B, Hkv, S, hs), "k"), arr((B, Hkv, S, hs), "v")
    kind = draw(st.sampled_from(["none", "bool", "additive"]), label="mask kind")
    mask_shape = draw(st.sampled_from([(T, S), (B, 1, T, S), (1, H, T, S), (1, 1, 1, S)]),
                      label="mask shape")
    mask = None
    if kind == "bool":
        mask = draw(testing.arrays(mask_shape, min_value=-1, max_value=1), label="mask") > 0
        # every query keeps at least one key: its own (last visible) position
        full = np.broadcast_to(mask, (B, H, T, S)).copy()
        full[..., np.arange(T), np.clip(S - T + np.arange(T), 0, S - 1)] = True
        mask = full
    elif kind == "additive":
        mask = arr(mask_shape, "mask")
    scale = draw(st.sampled_from([None, 0.7]), label="scale")
    return q, k, v, mask, dict(is_causal=is_causal, scale=scale)


def _call(mask, kw):
    """A tinylm function of (q, k, v[, additive mask]): a float mask is differentiated."""
    if mask is None or mask.dtype == bool:
        return lambda q, k, v: sdpa(q, k, v, mask=mask, **kw)
    return lambda q, k, v, m: sdpa(q, k, v, mask=m, **kw)


def _inputs(q, k, v, mask):
    return (q, k, v) if mask is None or mask.dtype == bool else (q, k, v, mask)


@given(attention_case())
def test_attention_forward(case):
    q, k, v, mask, kw = case
    y = sdpa(Tensor(q), Tensor(k), Tensor(v), mask=mask, **kw)
    assert y.shape == q.shape
    testing.assert_close(y, ref_attention(q, k, v, mask, **kw), rtol=1e-10, atol=1e-12)


@settings(max_examples=20)
@given(attention_case())
def test_attention_gradcheck(case):
    q, k, v, mask, kw = case
    testing.gradcheck(_call(mask, kw), *_inputs(q, k, v, mask))


def _torch_call(torch, mask, kw, T, S):
    """torch's sdpa with the causal rule spelled as an explicit mask (torch's own
    is_causal aligns top-left, the KV-cache rule bottom-right)."""
    causal = torch.tensor(allowed_causal(T, S)) if kw["is_causal"] else None

    def fn(q, k, v, *m):
        attn = torch.tensor(mask) if m == () and mask is not None else (m[0] if m else None)
        if causal is not None:
            if attn is None:
                attn = causal
            elif attn.dtype == torch.bool:
                attn = attn & causal
            else:
                attn = attn.masked_fill(~causal, float("-inf"))
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn, scale=kw["scale"], enable_gqa=True)

    return fn


@pytest.mark.parametrize("dtype, tol", [(np.float64, dict(rtol=1e-10, atol=1e-12)),
                                        (np.float32, dict(rtol=1e-4, atol=1e-5))])
@given(data=st.data())
def test_attention_matches_torch(dtype, tol, data):
    torch = pytest.importorskip("torch")
    q, k, v, mask, kw = data.draw(attention_case(dtype, max_hs=4))
    T, S = q.shape[2], k.shape[2]
    check_torch(torch, _call(mask, kw), _torch_call(torch, mask, kw, T, S),
                *_inputs(q, k, v, mask), **tol)


def test_attention_is_causal_matches_torch_native_when_square():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 5, 3)) for _ in range(3))
    check_torch(torch, lambda a, b, c: sdpa(a, b, c, is_causal=True),
                lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True),
                q, k, v, rtol=1e-10, atol=1e-12)


def test_kv_cache_causal_offset():
    """The last query of a T=2 step over S=5 keys sees all five; the first sees four."""
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 1, 2, 3)), rng.standard_normal((1, 1, 5, 3)), np.eye(5)[None, None]
    v = np.ascontiguousarray(v[..., :5])  # one-hot values: the output row is the attention row
    y = sdpa(Tensor(q), Tensor(k), Tensor(v), is_causal=True).numpy()[0, 0]
    assert y[0, 4] == 0 and np.all(y[0, :4] > 0)
    assert np.all(y[1] > 0)
    testing.assert_close(y.sum(axis=-1), np.ones(2))
    # the same as decoding the full sequence and keeping the last two rows
    qf = np.concatenate([rng.standard_normal((1, 1, 3, 3)), q], axis=2)
    full = sdpa(Tensor(qf), Tensor(k), Tensor(v), is_causal=True).numpy()[0, 0, 3:]
    testing.assert_close(y, full, rtol=1e-12, atol=1e-15)


def test_gqa_equals_repeated_heads():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((2, 6, 3, 4)), rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 3, 4))
    y = sdpa(Tensor(q), Tensor(k), Tensor(v))
    rep = sdpa(Tensor(q), Tensor(np.repeat(k, 3, axis=1)), Tensor(np.repeat(v, 3, axis=1)))
    testing.assert_close(y, rep, rtol=1e-12, atol=1e-15)


def test_attention_mask_tensor_and_eval_dropout():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 3, 2)) for _ in range(3))
    mask = np.tril(np.ones((3, 3), bool))
    a = sdpa(Tensor(q), Tensor(k), Tensor(v), mask=Tensor(mask))
    b = sdpa(Tensor(q), Tensor(k), Tensor(v), is_causal=True)
    c = sdpa(Tensor(q), Tensor(k), Tensor(v), is_causal=True, dropout_p=0.5, training=False)
    testing.assert_close(a, b, rtol=0, atol=0)
    testing.assert_close(c, b, rtol=0, atol=0)


def test_attention_dropout_is_seeded():
    rng = np.random.default_rng(4)
    q, k, v = (Tensor(rng.standard_normal((1, 2, 4, 2))) for _ in range(3))
    backend.seed(9)
    a = sdpa(q, k, v, dropout_p=0.5).numpy()
    backend.seed(9)
    b = sdpa(q, k, v, dropout_p=0.5).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, sdpa(q, k, v).numpy())


def test_attention_float32_stays_float32():
    rng = np.random.default_rng(5)
    q, k, v = (Tensor(rng.standard_normal((1, 2, 3, 4)).astype(np.float32), requires_grad=True)
               for _ in range(3))
    y = sdpa(q, k, v, is_causal=True)
    assert y.dtype == np.float32
    y.sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == np.float32


def test_attention_shape_errors():
    x4, x3 = Tensor(np.ones((1, 3, 2, 2))), Tensor(np.ones((1, 2, 2)))
    with pytest.raises(ShapeError, match="heads"):
        sdpa(x4, Tensor(np.ones((1, 2, 2, 2))), Tensor(np.ones((1, 2, 2, 2))))
    with pytest.raises(ShapeError, match=r"\(B, H, T, hs\)"):
        sdpa(x3, x3, x3)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("kind", ["causal_kv_cache", "bool_gqa", "additive"])
def test_attention_on_device(device, kind):
    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((1, 4, 2, 3)), rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((1, 2, 4, 3))
    if kind == "causal_kv_cache":
        check_device(device, lambda a, b, c: sdpa(a, b, c, is_causal=True), q, k, v)
    elif kind == "bool_gqa":
        mask = np.array([[True, False, True, True], [False, True, True, False]])
        check_device(device, lambda a, b, c, m: sdpa(a, b, c, mask=m), q, k, v, mask)
    else:
        m = rng.standard_normal((1, 1, 2, 4))
        check_device(device, lambda a, b, c, mm: sdpa(a, b, c, mask=mm, scale=0.5), q, k, v, m)


# --------------------------------------------------------------------------- GPU dispatch


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_auto_on_gpu_runs_the_cuda_kernel_and_matches_cpu(causal, kv_heads):
    """impl="auto" on CuPy arrays goes to the FlashAttention RawKernels; values and
    gradients agree with the CPU path."""
    cupy = pytest.importorskip("cupy")
    from tinylm import backend
    from tinylm.kernels import flash_attention as cuda_flash

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in [(2, 4, 37, 64), (2, kv_heads, 37, 64), (2, kv_heads, 37, 64)])
    g = rng.standard_normal((2, 4, 37, 64)).astype(np.float32)
    results = {}
    for device in ("cpu", "cuda"):
        ts = [Tensor(backend.to_device(a, device), requires_grad=True) for a in (q, k, v)]
        out = F.scaled_dot_product_attention(*ts, is_causal=causal, impl="auto")
        if device == "cuda":
            assert isinstance(out.creator, cuda_flash.FlashAttention)
        out.backward(backend.to_device(g, device))
        results[device] = [backend.to_numpy(a) for a in (out.data, *(t.grad for t in ts))]
    for a, b in zip(results["cuda"], results["cpu"]):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
    assert cupy is not None


# --------------------------------------------------------------------------- empty rows


def _empty_row_cases():
    """(name, q, k, v, mask, is_causal, empty): ``empty`` (B, H, T) marks the query rows
    that see no key; the mask hides them by False, by -inf, or causality does (T > S)."""
    rng = np.random.default_rng(7)
    B, H, Hkv, T, S, hs = 2, 4, 2, 4, 5, 3
    q, k, v = (rng.standard_normal(s) for s in [(B, H, T, hs), (B, Hkv, S, hs), (B, Hkv, S, hs)])
    keep = rng.random((B, 1, T, S)) > 0.3
    keep[..., 0] = True
    keep[0, 0, 1] = keep[1, 0, 3] = False  # two rows hidden from every key
    empty = np.broadcast_to(~keep.any(-1), (B, H, T))
    additive = np.where(keep, 0.0, -np.inf)
    qc = rng.standard_normal((B, H, 6, hs))  # 6 queries over 5 keys: the first sees none
    causal_empty = np.zeros((B, H, 6), bool)
    causal_empty[:, :, 0] = True
    return [("bool", q, k, v, keep, False, empty), ("additive", q, k, v, additive, False, empty),
            ("causal", qc, k, v, None, True, causal_empty)]


def _run_path(path, q, k, v, mask, is_causal, grad):
    """Output and gradients of one attention path (fused node, composed, composed with
    dropout, tiled) with upstream gradient ``grad``."""
    import tinylm.ops.attention as attention_mod
    from tinylm.ops.tiled import TiledAttention

    Q, K, V = (Tensor(a, requires_grad=True) for a in (q, k, v))
    kw = dict(is_causal=is_causal, impl="tiled" if path == "tiled" else "naive")
    m = mask
    if path == "composed":  # a mask that learns takes the composed path
        add = np.zeros((q.shape[2], k.shape[2])) if mask is None else (
            np.where(mask, 0.0, -np.inf) if mask.dtype == bool else mask)
        m = Tensor(add, requires_grad=True)
    if path == "dropout":
        kw.update(dropout_p=0.5, training=True)
        backend.seed(3)
    y = sdpa(Q, K, V, mask=m, **kw)
    kinds = {"fused": attention_mod.Attention, "tiled": TiledAttention}
    assert (type(y.creator) is kinds[path]) if path in kinds else (
        type(y.creator) not in kinds.values())
    y.backward(grad)
    mask_grad = m.grad if isinstance(m, Tensor) else None
    return y.numpy(), Q.grad, K.grad, V.grad, mask_grad


@pytest.mark.parametrize("path", ["fused", "composed", "dropout", "tiled"])
@pytest.mark.parametrize("case", range(3), ids=["bool", "additive", "causal"])
def test_a_row_that_sees_no_key_gives_zero_and_no_gradient(path, case):
    """EMPTY ROWS in ops/attention.py: one rule on every CPU path."""
    _, q, k, v, mask, is_causal, empty = _empty_row_cases()[case]
    grad = np.random.default_rng(8).standard_normal(q.shape)
    y, dq, dk, dv, dm = _run_path(path, q, k, v, mask, is_causal, grad)
    assert np.isfinite(y).all() and all(np.isfinite(g).all() for g in (dq, dk, dv))
    assert (y[empty] == 0).all() and (dq[empty] == 0).all()
    quiet = np.where(empty[..., None], 0.0, grad)  # the same without the empty rows' gradient
    _, dq0, dk0, dv0, _ = _run_path(path, q, k, v, mask, is_causal, quiet)
    testing.assert_close(dk, dk0, rtol=1e-12, atol=1e-14)  # they add nothing to dK, dV
    testing.assert_close(dv, dv0, rtol=1e-12, atol=1e-14)
    if dm is not None:
        assert (np.broadcast_to(dm, empty.shape + dm.shape[-1:])[empty] == 0).all()
    if path != "dropout":  # the rows that see a key: the reference softmax
        with np.errstate(invalid="ignore"):  # the reference's empty rows are NaN
            want = ref_attention(q, k, v, mask, is_causal)
        testing.assert_close(y[~empty], want[~empty], rtol=1e-10, atol=1e-12)
