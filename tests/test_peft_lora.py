"""LoRA, rsLoRA and DoRA: the forward against the formulas, gradcheck in float64,
merge / unmerge (bit-exact restore), merged vs unmerged logits, rank/alpha patterns,
the bias options, dropout, and one module against the ``peft`` package."""

import math

import numpy as np
import pytest

from tinylm import nn, peft, testing
from tinylm.errors import TinyLMError
from tinylm.models import GPT2Config, LlamaConfig, build_model
from tinylm.peft.lora import LoraAdapter
from tinylm.tensor import Tensor

V = 53


def llama(dtype="float32", **kw):
    c = dict(vocab_size=V, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=40,
             max_positions=32)
    return build_model(LlamaConfig(**{**c, **kw})).to(dtype=dtype).eval()


def gpt2(dtype="float32"):
    c = GPT2Config(vocab_size=V, d_model=24, n_layer=2, n_head=3, max_positions=32)
    return build_model(c).to(dtype=dtype).eval()


def ids(B=2, T=5, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def host(out=12, inp=10, bias=True, dtype="float64"):
    return nn.Sequential(nn.Linear(inp, out, bias=bias, dtype=dtype))


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_is_the_formula(rslora):
    m = host()
    peft.apply(m, "lora", r=3, alpha=5, use_rslora=rslora, target_modules=["0"],
               init_lora_weights=False)
    lin, a = m[0], m[0].peft.default
    x = np.random.default_rng(1).standard_normal((2, 4, 10))
    s = 5 / math.sqrt(3) if rslora else 5 / 3
    want = x @ lin.weight.data.T + lin.bias.data + s * (x @ a.lora_A.data.T) @ a.lora_B.data.T
    np.testing.assert_allclose(m(Tensor(x)).numpy(), want, rtol=1e-12, atol=1e-12)


def _dora_reference(w, b, A, B, mag, s, x):
    norm = np.linalg.norm(w + s * B @ A, axis=1)
    return (mag / norm) * (x @ (w + s * B @ A).T) + b


def test_dora_forward_is_the_formula_and_starts_at_the_base():
    m = host()
    x = np.random.default_rng(2).standard_normal((3, 10))
    base = m(Tensor(x)).numpy()
    peft.apply(m, "lora", r=2, alpha=4, use_dora=True, target_modules=["0"])
    np.testing.assert_allclose(m(Tensor(x)).numpy(), base, rtol=1e-12, atol=1e-12)
    a = m[0].peft.default
    np.testing.assert_allclose(a.lora_magnitude.data, np.linalg.norm(m[0].weight.data, axis=1))
    rng = np.random.default_rng(3)
    a.lora_B.data[...] = rng.standard_normal(a.lora_B.shape)
    a.lora_magnitude.data[...] = rng.uniform(0.5, 2, a.lora_magnitude.shape)
    want = _dora_reference(m[0].weight.data, m[0].bias.data, a.lora_A.data, a.lora_B.data,
                           a.lora_magnitude.data, 2.0, x)
    np.testing.assert_allclose(m(Tensor(x)).numpy(), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- gradcheck


def _gradcheck_adapter(hostmod, x):
    """gradcheck of hostmod(x) w.r.t. x and every adapter parameter (float64). DoRA's
    row norm is detached (no gradient, as in PEFT), so the finite differences hold it
    at its value too: what is checked is the gradient of the function DoRA defines."""
    params = [(holder, name) for _, holder in hostmod.peft.named_modules()
              for name in ("lora_A", "lora_B", "lora_magnitude")
              if holder._parameters.get(name) is not None]
    adapter = hostmod.peft.default
    if adapter.use_dora:
        fixed = {id(p): adapter._weight_norm(p, p.holder.lora_A.data, p.holder.lora_B.data)
                 for p in adapter.pieces}
        adapter._weight_norm = lambda p, a, b: fixed[id(p)]

    def fn(xt, *ps):
        for (holder, name), p in zip(params, ps):
            holder._parameters[name] = p
        return hostmod(xt)

    values = [holder._parameters[name].data for holder, name in params]
    assert testing.gradcheck(fn, x, *values, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(), dict(use_rslora=True), dict(use_dora=True),
                                     dict(use_dora=True, use_rslora=True)])
def test_gradcheck_whole_host(options):
    m = host(out=5, inp=4)
    peft.apply(m, "lora", r=2, alpha=3, target_modules=["0"], init_lora_weights=False,
               **options)
    x = np.random.default_rng(4).standard_normal((2, 3, 4))
    _gradcheck_adapter(m[0], x)


@pytest.mark.parametrize("use_dora", [False, True])
def test_gradcheck_row_sliced_qkv(use_dora):
    """q_proj and v_proj on the fused qkv (different ranks and alphas per piece)."""
    model = llama("float64", d_model=8, n_head=2, n_kv_head=1, d_ff=8)
    peft.apply(model, "lora", r=2, alpha=3, target_modules=["q_proj", "v_proj"],
               rank_pattern={"v_proj": 1}, alpha_pattern={"q_proj": 5},
               init_lora_weights=False, use_dora=use_dora)
    qkv = model.transformer.blocks[0].attn.qkv
    a = qkv.peft.default
    assert [(p.name, p.r, p.alpha) for p in a.pieces] == [("q_proj", 2, 5), ("v_proj", 1, 3)]
    x = np.random.default_rng(5).standard_normal((2, 8))
    _gradcheck_adapter(qkv, x)


def test_sliced_pieces_are_the_formula_on_their_rows():
    model = llama("float64")
    peft.apply(model, "lora", r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    qkv = model.transformer.blocks[1].attn.qkv
    a = qkv.peft.default
    x = np.random.default_rng(6).standard_normal((2, 3, 32))
    want = x @ qkv.weight.data.T
    for p in a.pieces:
        want[..., p.rows] += p.scaling * (x @ p.holder.lora_A.data.T) @ p.holder.lora_B.data.T
    np.testing.assert_allclose(qkv(Tensor(x)).numpy(), want, rtol=1e-12, atol=1e-12)
    q = 4 * 8
    assert a.pieces[0].rows == slice(0, q) and a.pieces[1].rows == slice(q + 16, q + 32)


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float64", 1e-12)])
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("where", ["all-linear", ("q_proj", "v_proj", "down_proj")])
def test_merge_unmerge_restores_exactly_and_merged_logits_match(dtype, tol, use_dora, where):
    model, x = llama(dtype), ids()
    peft.apply(model, "lora", target_modules=where, init_lora_weights=False,
               use_dora=use_dora, rank_pattern={"v_proj": 3})
    if use_dora:  # magnitudes away from the norms, so that DoRA's rescaling shows
        rng = np.random.default_rng(7)
        for n, p in model.named_parameters():
            if n.endswith("lora_magnitude"):
                p.data[...] *= rng.uniform(0.5, 1.5, p.shape)
    before = {n: a.copy() for n, a in model.state_dict().items()}
    unmerged = model(x).logits.numpy()
    peft.merge(model)
    assert all(a.merged for _, _, a in peft.iter_adapters(model))
    changed = [n for n, a in model.state_dict().items() if not np.array_equal(a, before[n])]
    assert "transformer.blocks.0.attn.qkv.weight" in changed
    assert all(n.endswith(".weight") and ".peft." not in n for n in changed)
    merged = model(x).logits.numpy()
    assert rel(merged, unmerged) < tol
    peft.unmerge(model)
    for n, a in model.state_dict().items():
        assert np.array_equal(a, before[n]), n  # bit for bit (0 ulp)
    assert np.array_equal(model(x).logits.numpy(), unmerged)


def test_two_adapters_merged_unmerge_in_reverse():
    model = gpt2()
    peft.apply(model, "lora", init_lora_weights=False)
    peft.apply(model, "lora", adapter_name="b", use_dora=True, init_lora_weights=False)
    w0 = model.transformer.blocks[0].attn.qkv.weight.data.copy()
    peft.merge(model, "default")
    peft.merge(model, "b")
    peft.unmerge(model)
    assert np.array_equal(model.transformer.blocks[0].attn.qkv.weight.data, w0)


def test_tied_head_cannot_merge():
    model = gpt2()  # lm_head is the embedding
    peft.apply(model, "lora", target_modules=["lm_head"], init_lora_weights=False)
    with pytest.raises(TinyLMError, match="tied to another module"):
        peft.merge(model)


# --------------------------------------------------------------------------- options


def test_init_options():
    m = host(out=6, inp=400, dtype="float32")
    peft.apply(m, "lora", r=4, target_modules=["0"])
    a = m[0].peft.default
    assert a.lora_A.dtype == np.float32 and not a.lora_B.data.any()
    bound = 1 / math.sqrt(400)  # PEFT's kaiming_uniform(a=sqrt(5)) on (r, in)
    assert np.abs(a.lora_A.data).max() <= bound and np.abs(a.lora_A.data).max() > 0.9 * bound
    peft.apply(m, "lora", adapter_name="g", r=4, target_modules=["0"],
               init_lora_weights="gaussian")
    g = m[0].peft.g.lora_A.data
    assert abs(g.std() - 1 / 4) < 0.02 and not m[0].peft.g.lora_B.data.any()


def test_bias_options():
    model = gpt2()
    peft.apply(model, "lora", bias="lora_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".peft." not in n}
    assert trainable == {"transformer.blocks.0.attn.qkv.bias", "transformer.blocks.1.attn.qkv.bias"}
    assert trainable <= set(peft.adapter_state_dict(model))
    model(ids()).logits.sum().backward()
    assert model.transformer.blocks[0].attn.qkv.bias.grad is not None
    assert model.transformer.blocks[0].attn.out.bias.grad is None
    model = gpt2()
    peft.apply(model, "lora", bias="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".peft." not in n}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(".bias")}


def test_dropout_acts_in_training_only():
    model, x = llama(), ids()
    peft.apply(model, "lora", dropout=0.5, init_lora_weights=False)
    peft.apply(model, "lora", adapter_name="nodrop", init_lora_weights=False)
    for n, p in model.named_parameters():  # the same weights in both adapters
        if ".peft.nodrop." in n:
            p.data[...] = dict(model.named_parameters())[n.replace(".nodrop.", ".default.")].data
    evals = model(x).logits.numpy()
    peft.set_adapter(model, "nodrop")
    assert np.array_equal(model(x).logits.numpy(), evals)
    peft.set_adapter(model, "default")
    model.train()
    a, b = model(x).logits.numpy(), model(x).logits.numpy()
    assert np.abs(a - b).max() > 1e-4 and np.abs(a - evals).max() > 1e-4


def test_dora_with_dropout_uses_the_dropped_input_for_the_base_term(monkeypatch):
    """PEFT: with dropout acting, DoRA's (m/n - 1) W x' and (m/n) s B A x' use
    x' = dropout(x) while the base W x + b keeps x; the mask is fixed here."""
    from tinylm.peft import lora

    m = host()
    peft.apply(m, "lora", r=2, alpha=3, dropout=0.3, use_dora=True, target_modules=["0"],
               init_lora_weights=False)
    x = np.random.default_rng(8).standard_normal((4, 10))
    keep = np.random.default_rng(9).random(x.shape) > 0.3
    monkeypatch.setattr(lora.ops, "dropout", lambda t, p, training: t * Tensor(keep / 0.7))
    m.train()
    a, lin = m[0].peft.default, m[0]
    a.lora_magnitude.data[...] *= 1.3
    w, b, s = lin.weight.data, lin.bias.data, 1.5
    xd = x * keep / 0.7
    ms = a.lora_magnitude.data / np.linalg.norm(w + s * a.lora_B.data @ a.lora_A.data, axis=1)
    want = x @ w.T + b + (ms - 1) * (xd @ w.T) + ms * s * ((xd @ a.lora_A.data.T) @ a.lora_B.data.T)
    np.testing.assert_allclose(m(Tensor(x)).numpy(), want, rtol=1e-12, atol=1e-12)
    m.eval()  # no dropout: the base output is reused, x' = x
    want = _dora_reference(w, b, a.lora_A.data, a.lora_B.data, a.lora_magnitude.data, s, x)
    np.testing.assert_allclose(m(Tensor(x)).numpy(), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- against peft


@pytest.mark.parametrize("options", [dict(), dict(use_rslora=True), dict(use_dora=True)])
def test_one_linear_matches_the_peft_package(options):
    torch = pytest.importorskip("torch")
    peft_pkg = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(10, 7)).double()
    cfg = peft_pkg.LoraConfig(r=3, lora_alpha=6, target_modules=["0"],
                              init_lora_weights=False, **options)
    theirs = peft_pkg.get_peft_model(base, cfg)
    layer = theirs.base_model.model[0]
    ours = host(out=7, inp=10)
    ours[0].weight.data[...] = layer.base_layer.weight.detach().numpy()
    ours[0].bias.data[...] = layer.base_layer.bias.detach().numpy()
    peft.apply(ours, "lora", r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False,
               **options)
    a = ours[0].peft.default
    a.lora_A.data[...] = layer.lora_A["default"].weight.detach().numpy()
    a.lora_B.data[...] = layer.lora_B["default"].weight.detach().numpy()
    if options.get("use_dora"):
        np.testing.assert_allclose(  # the magnitude init, from the same A, B
            layer.lora_magnitude_vector["default"].weight.detach().numpy(),
            np.linalg.norm(ours[0].weight.data + 2 * a.lora_B.data @ a.lora_A.data, axis=1),
            rtol=1e-12)
        a.lora_magnitude.data[...] = layer.lora_magnitude_vector["default"].weight.detach().numpy()
    x = np.random.default_rng(9).standard_normal((3, 10))
    xt = torch.tensor(x, requires_grad=True)
    y = theirs(xt)
    y.sum().backward()
    xo = Tensor(x, requires_grad=True)
    yo = ours(xo)
    yo.sum().backward()
    np.testing.assert_allclose(yo.numpy(), y.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xo.grad, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.lora_B.grad, layer.lora_B["default"].weight.grad.numpy(),
                               rtol=1e-10, atol=1e-12)
    if options.get("use_dora"):
        np.testing.assert_allclose(
            a.lora_magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad.numpy(),
            rtol=1e-10, atol=1e-12)
    assert isinstance(a, LoraAdapter)
