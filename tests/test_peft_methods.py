"""IA3, bottleneck adapters, prompt tuning and prefix tuning: gradcheck in float64,
gradients on the adapter only, IA3's formula and merge / unmerge (bit-exact restore),
zero-init bottlenecks = the base, virtual tokens through a KV cache and generate = a
full recompute, bad input, and logits against the ``peft`` package on tiny HF GPT-2
and Llama models (weights copied in memory)."""

import numpy as np
import pytest

import tinylm
from tinylm import nn, peft, testing
from tinylm.errors import TinyLMError
from tinylm.generate import generate
from tinylm.models import BertConfig, GPT2Config, LlamaConfig, build_model
from tinylm.peft.prefix import PrefixCache
from tinylm.peft.prompt import init_text_ids
from tinylm.tensor import Tensor

V = 41


def llama(dtype="float64", **kw):
    c = dict(vocab_size=V, d_model=16, n_layer=2, n_head=4, n_kv_head=2, d_ff=20,
             max_positions=48)
    return build_model(LlamaConfig(**{**c, **kw})).to(dtype=dtype).eval()


def gpt2(dtype="float64", **kw):
    c = dict(vocab_size=V, d_model=12, n_layer=2, n_head=2, max_positions=48)
    return build_model(GPT2Config(**{**c, **kw})).to(dtype=dtype).eval()


MODELS = {"gpt2": gpt2, "llama": llama}


def ids(B=2, T=5, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def logits(model, x, **kw):
    with tinylm.no_grad():
        return model(x, **kw).logits.numpy()


# options that make every method differ from the base (random IA3 / bottleneck up)
METHODS = {
    "ia3": dict(init_ia3_weights=False),
    "bottleneck": dict(bottleneck_size=2, init_weights=False),
    "prompt_tuning": dict(num_virtual_tokens=2),
    "prefix_tuning": dict(num_virtual_tokens=2),
    "prefix_projection": dict(num_virtual_tokens=2, prefix_projection=True,
                              encoder_hidden_size=3),
}


def applied(arch, method, dtype="float64", **kw):
    model = MODELS[arch](dtype)
    name = "prefix_tuning" if method == "prefix_projection" else method
    return peft.apply(model, name, **{**METHODS[method], **kw})


def peft_params(model):
    return [(n, p) for n, p in model.named_parameters() if ".peft." in f".{n}"]


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradcheck_in_float64(arch, method):
    """The logits' gradient w.r.t. every adapter parameter, against finite differences."""
    model = applied(arch, method)
    holders = [(m, name) for _, m in model.named_modules() for name, p in m._parameters.items()
               if p is not None and p.requires_grad]
    assert holders and all(".peft." in f".{n}" for n, _ in peft_params(model))
    x = ids(B=2, T=3)

    def fn(*ps):
        for (m, name), p in zip(holders, ps):
            m._parameters[name] = p
        return model(x).logits

    values = [m._parameters[name].data for m, name in holders]
    assert testing.gradcheck(fn, *values, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_only_adapter_parameters_get_gradients(method):
    model = applied("llama", method, dtype="float32")
    model.train()
    x = ids()
    model(x, targets=np.roll(x, -1, axis=1)).loss.backward()
    for name, p in model.named_parameters():
        is_peft = ".peft." in f".{name}"
        assert (p.grad is not None) == is_peft, name
        assert p.requires_grad == is_peft, name
    report = peft.trainable_parameters(model)
    assert report.trainable == sum(p.size for _, p in peft_params(model)) > 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_on_a_quantized_base(method):
    """A Q8_0 Llama (QuantLinear hosts): the adapters train, the packed base does not."""
    from tinylm.quant.layers import QuantLinear
    from tinylm.quant.model import quantize

    model = quantize(llama("float32", d_model=32, d_ff=64), "q8_0")
    assert isinstance(model.transformer.blocks[0].attn.qkv, QuantLinear)
    name = "prefix_tuning" if method == "prefix_projection" else method
    peft.apply(model, name, **METHODS[method])
    x = ids()
    model(x, targets=np.roll(x, -1, axis=1)).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in peft_params(model)} != set()
    if method == "ia3":
        with pytest.raises(TinyLMError, match="quantized"):
            peft.merge(model)


# --------------------------------------------------------------------------- IA3


def test_ia3_defaults_are_peft_s():
    """Llama: k_proj and v_proj rows of qkv scaled at the output, down_proj at its input;
    GPT-2: all of c_attn and mlp.c_proj (not attn.c_proj)."""
    m = peft.apply(llama(), "ia3")
    qkv, down = m.transformer.blocks[0].attn.qkv, m.transformer.blocks[0].mlp.down
    kv = 2 * 4  # n_kv_head * head_dim
    assert qkv.peft.default.k_proj.ia3_l.shape == (kv, 1)
    assert qkv.peft.default.v_proj.ia3_l.shape == (kv, 1)
    assert down.peft.default.ia3_l.shape == (1, 20) and down.peft.default.feedforward
    assert not hasattr(m.transformer.blocks[0].mlp.up, "peft")
    g = peft.apply(gpt2(), "ia3")
    b = g.transformer.blocks[1]
    assert b.attn.qkv.peft.default.ia3_l.shape == (36, 1)
    assert b.mlp.down.peft.default.ia3_l.shape == (1, 48)
    assert "peft" not in b.attn.out._modules
    assert all(float(p.data.min()) == float(p.data.max()) == 1.0 for _, p in peft_params(g))


def test_ia3_is_the_formula_on_rows_and_columns():
    model = peft.apply(llama(), "ia3", init_ia3_weights=False)
    block = model.transformer.blocks[0]
    qkv, down = block.attn.qkv, block.mlp.down
    x = np.random.default_rng(1).standard_normal((2, 3, 16))
    a = qkv.peft.default
    scale = np.concatenate([np.ones(16), a.k_proj.ia3_l.data[:, 0], a.v_proj.ia3_l.data[:, 0]])
    want = (x @ qkv.weight.data.T) * scale
    np.testing.assert_allclose(qkv(Tensor(x)).numpy(), want, rtol=1e-12, atol=1e-12)
    h = np.random.default_rng(2).standard_normal((2, 3, 20))
    want = (h * down.peft.default.ia3_l.data) @ down.weight.data.T
    np.testing.assert_allclose(down(Tensor(h)).numpy(), want, rtol=1e-12, atol=1e-12)
    with peft.disable_adapters(model):  # the base product; BLAS may block (2, 3, 20) differently
        np.testing.assert_allclose(down(Tensor(h)).numpy(), h @ down.weight.data.T,
                                   rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float64", 1e-12)])
def test_ia3_merge_unmerge_restores_bits_and_merged_logits_match(arch, dtype, tol):
    model = applied(arch, "ia3", dtype=dtype)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    x = ids()
    unmerged = logits(model, x)
    peft.merge(model)
    changed = [n for n, p in model.named_parameters() if not np.array_equal(p.data, before[n])]
    assert any(n.endswith("qkv.weight") for n in changed)
    assert any(n.endswith("down.weight") for n in changed)
    assert rel(logits(model, x), unmerged) < tol
    peft.unmerge(model)
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, before[n], err_msg=n)
    assert rel(logits(model, x), unmerged) == 0.0


def test_ia3_ones_unmerge_by_division_and_merge_and_unload():
    model = peft.apply(gpt2(), "ia3")  # ones: dividing them out is exact
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    peft.merge(model)
    assert all(a._saved is None for _, _, a in peft.iter_adapters(model))
    peft.unmerge(model)
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, before[n])
    for _, p in peft_params(model):
        p.data[...] = np.random.default_rng(3).uniform(0.5, 1.5, p.shape)
    x = ids()
    want = logits(model, x)
    plain = peft.merge_and_unload(model)
    assert not peft_params(plain) and not peft.adapter_names(plain)
    assert rel(logits(plain, x), want) < 1e-12


def test_ia3_two_adapters_switch():
    model = peft.apply(llama(), "ia3", init_ia3_weights=False)
    peft.apply(model, "ia3", adapter_name="other", init_ia3_weights=False)
    x = ids()
    first = logits(model, x)
    peft.set_adapter(model, "other")
    assert rel(logits(model, x), first) > 1e-3
    peft.set_adapter(model, "default")
    assert rel(logits(model, x), first) == 0.0


def test_ia3_bad_input():
    with pytest.raises(TinyLMError, match="not in target_modules"):
        peft.config_for("ia3", target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(TinyLMError, match="fused"):
        peft.apply(llama(), "ia3", target_modules=["k_proj"], feedforward_modules=["k_proj"])
    with pytest.raises(TinyLMError, match="init_ia3_weights"):
        peft.config_for("ia3", init_ia3_weights="yes")
    with pytest.raises(TinyLMError, match="matches no"):
        peft.apply(llama(), "ia3", target_modules=["nothing_here"])
    model = peft.apply(gpt2(tie_embeddings=True), "ia3", target_modules=["lm_head"])
    with pytest.raises(TinyLMError, match="tied"):
        peft.merge(model)


# --------------------------------------------------------------------------- bottleneck


def test_zero_init_bottleneck_is_the_base_exactly():
    model = llama()
    x = ids()
    base = logits(model, x)
    peft.apply(model, "bottleneck", bottleneck_size=3, non_linearity="gelu")
    np.testing.assert_array_equal(logits(model, x), base)
    hosts = [h for h, _, _ in peft.iter_adapters(model)]
    assert hosts == ["transformer.blocks.0.attn", "transformer.blocks.0.mlp",
                     "transformer.blocks.1.attn", "transformer.blocks.1.mlp"]
    a = model.transformer.blocks[1].mlp.peft.default
    a.up.weight.data[...] = np.random.default_rng(4).standard_normal(a.up.weight.shape)
    assert rel(logits(model, x), base) > 1e-4


def test_bottleneck_is_the_formula_and_chooses_layers():
    model = peft.apply(gpt2(), "bottleneck", bottleneck_size=2, non_linearity="silu",
                       placement=["mlp"], layers_to_transform=[1], scaling=0.5,
                       init_weights=False)
    assert [h for h, _, _ in peft.iter_adapters(model)] == ["transformer.blocks.1.mlp"]
    mlp = model.transformer.blocks[1].mlp
    a = mlp.peft.default
    h = np.random.default_rng(5).standard_normal((2, 3, 12))
    with peft.disable_adapters(model):
        y = mlp(Tensor(h)).numpy()
    z = y @ a.down.weight.data.T + a.down.bias.data
    z = z / (1 + np.exp(-z))
    want = y + 0.5 * (z @ a.up.weight.data.T + a.up.bias.data)
    np.testing.assert_allclose(mlp(Tensor(h)).numpy(), want, rtol=1e-12, atol=1e-12)


def test_bottleneck_on_a_mixture_of_experts_keeps_its_aux_loss():
    model = gpt2(n_experts=2, moe_top_k=1)
    x = ids()
    with tinylm.no_grad():
        base = model(x)
        peft.apply(model, "bottleneck", bottleneck_size=2)
        out = model(x)
    assert out.aux_loss is not None
    np.testing.assert_array_equal(out.aux_loss.numpy(), base.aux_loss.numpy())
    np.testing.assert_array_equal(out.logits.numpy(), base.logits.numpy())


@pytest.mark.parametrize("options,match", [
    (dict(bottleneck_size=0), "bottleneck_size"),
    (dict(non_linearity="swish"), "non_linearity"),
    (dict(placement=["ffn"]), "placement"),
    (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(adapter_dropout=1.0), "adapter_dropout"),
    (dict(nonsense=1), "no option"),
])
def test_bottleneck_bad_config(options, match):
    with pytest.raises(TinyLMError, match=match):
        peft.config_for("bottleneck", **options)


def test_bottleneck_bad_layers_and_no_merge():
    with pytest.raises(TinyLMError, match="names no block"):
        peft.apply(gpt2(), "bottleneck", layers_to_transform=[7])
    model = peft.apply(gpt2(), "bottleneck", bottleneck_size=2)
    with pytest.raises(TinyLMError, match="cannot be merged"):
        peft.merge(model)


# --------------------------------------------------------------------------- virtual tokens


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_prompt_tuning_is_the_prompt_in_front_with_its_logits_cut(arch):
    """= the base stack run on [prompt; token embeddings] at positions 0..P+T-1, the
    first P hidden states dropped; the loss is over the real tokens only."""
    model = applied(arch, "prompt_tuning", num_virtual_tokens=3)
    x = ids()
    targets = np.roll(x, -1, axis=1)
    out = model(x, targets=targets)
    assert out.logits.shape == (2, 5, V)
    prompt = model.transformer.peft.default.prompt_embeddings.data
    with tinylm.no_grad(), peft.disable_adapters(model):
        emb = model.tok_emb(x).numpy()
        full = np.concatenate([np.broadcast_to(prompt, (2, 3, emb.shape[2])), emb], axis=1)
        h, _ = model.transformer(Tensor(full))
        want = model.lm_head(h[:, 3:]).numpy()
        base = model(x).logits.numpy()
    np.testing.assert_allclose(out.logits.numpy(), want, rtol=1e-12, atol=1e-12)
    assert rel(out.logits.numpy(), base) > 1e-4
    lp = want - np.log(np.exp(want).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp, targets[..., None], -1).mean()
    assert float(out.loss.item()) == pytest.approx(nll, rel=1e-12)


def kv_steps(model, x, mask, prefix=2):
    """Logits from a prefix then one token at a time through a KV cache."""
    cache = nn.KVCache()
    steps = [logits(model, x[:, :prefix], attention_mask=mask[:, :prefix], cache=cache)]
    for t in range(prefix, x.shape[1]):
        steps.append(logits(model, x[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    return np.concatenate(steps, axis=1)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "prefix_projection"])
def test_virtual_tokens_through_a_kv_cache_equal_a_full_recompute(arch, method):
    model = applied(arch, method)
    x = ids(B=3, T=7, seed=6)
    mask = np.ones_like(x)
    mask[1, 5:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    full = logits(model, x, attention_mask=mask)
    steps = kv_steps(model, x, mask)
    valid = mask.astype(bool)
    assert rel(steps[valid], full[valid]) < 1e-10
    with peft.disable_adapters(model):
        assert rel(logits(model, x, attention_mask=mask)[valid], full[valid]) > 1e-4


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_generate_with_virtual_tokens_is_greedy_full_recompute(method):
    """tinylm.generate (left-padded prompts, a KV cache) = argmax of full recomputes
    of each prompt alone."""
    model = applied("llama", method, num_virtual_tokens=3)
    prompts = [[3, 9, 4, 1, 7], [12, 5]]
    out = generate(model, prompts, 4, temperature=0, eos_id=())
    for prompt, new in zip(prompts, out.tokens):
        row = list(prompt)
        for _ in range(4):
            row.append(int(logits(model, np.array([row]))[0, -1].argmax()))
        assert new == row[len(prompt):]


def test_prefix_cache_keeps_gradients_and_crops():
    model = applied("gpt2", "prefix_tuning", num_virtual_tokens=2)
    adapter = model.transformer.peft.default
    cache = adapter.new_cache(model.transformer, 2)
    assert isinstance(cache, PrefixCache)
    x = ids(T=4)
    out = model(x[:, :3], cache=cache)
    out.logits.sum().backward()
    assert adapter.embedding.grad is not None and np.abs(adapter.embedding.grad).max() > 0
    assert cache.length == 5
    cache.crop(4)  # the prefix and 2 tokens
    step = logits(model, x[:, 2:3], cache=cache)
    np.testing.assert_allclose(step[:, 0], logits(model, x[:, :3])[:, 2], rtol=1e-10)


def test_virtual_tokens_refuse_a_cache_filled_without_them():
    model = applied("gpt2", "prompt_tuning")
    cache = nn.KVCache()
    with peft.disable_adapters(model):
        logits(model, ids(), cache=cache)
    with pytest.raises(TinyLMError, match="start a new KVCache"):
        logits(model, ids(T=1), cache=cache)


def test_prompt_tuning_text_and_vocab_init(tmp_path):
    from tinylm.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ")
    path = tmp_path / "chars.txt"
    tok.save(path)
    model = peft.apply(gpt2(), "prompt_tuning", num_virtual_tokens=7,
                       prompt_tuning_init="TEXT", prompt_tuning_init_text="abc",
                       tokenizer_name_or_path=str(path))
    want = model.tok_emb.weight.data[init_text_ids("abc", tok, 7)]
    np.testing.assert_array_equal(model.transformer.peft.default.prompt_embeddings.data, want)
    assert init_text_ids("abcdefgh", tok, 3) == tok.encode("abc")
    model = peft.apply(gpt2(), "prompt_tuning", num_virtual_tokens=4,
                       prompt_tuning_init="SAMPLE_VOCAB")
    rows = model.transformer.peft.default.prompt_embeddings.data
    table = model.tok_emb.weight.data
    assert all((np.abs(table - r).max(axis=1) == 0).any() for r in rows)


@pytest.mark.parametrize("method,options,match", [
    ("prompt_tuning", dict(num_virtual_tokens=0), "num_virtual_tokens"),
    ("prompt_tuning", dict(prompt_tuning_init="text"), "prompt_tuning_init"),
    ("prompt_tuning", dict(prompt_tuning_init="TEXT"), "prompt_tuning_init_text"),
    ("prefix_tuning", dict(num_virtual_tokens=1.5), "num_virtual_tokens"),
    ("prefix_tuning", dict(encoder_hidden_size=0), "encoder_hidden_size"),
    ("prefix_tuning", dict(init_weights="ones"), "init_weights"),
    ("prefix_tuning", dict(prefix_projection="yes"), "prefix_projection"),
])
def test_virtual_token_bad_config(method, options, match):
    with pytest.raises(TinyLMError, match=match):
        peft.config_for(method, **options)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_need_a_decoder_and_cannot_merge(method):
    bert = build_model(BertConfig(vocab_size=V, d_model=8, n_layer=1, n_head=2, d_ff=16,
                                  max_positions=16))
    with pytest.raises(TinyLMError, match="decoder-only"):
        peft.apply(bert, method)
    model = peft.apply(gpt2(), method, num_virtual_tokens=2)
    with pytest.raises(TinyLMError, match="cannot be merged"):
        peft.merge(model)
    with pytest.raises(TinyLMError, match="attention_mask"):
        logits(model, ids(), attention_mask=np.ones((2, 3, 5)))


# --------------------------------------------------------------------------- against peft


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_pair(request, tmp_path_factory):
    """(a tiny random HF model in float64, the same weights in tinylm)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from model_helpers import WIDE_INIT, build_hf, load_in_float64

    if request.param == "gpt2":
        config = transformers.GPT2Config(vocab_size=V, n_embd=24, n_layer=2, n_head=3,
                                         n_positions=40, initializer_range=WIDE_INIT)
        hf = build_hf(transformers.GPT2LMHeadModel, config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
            initializer_range=WIDE_INIT, rms_norm_eps=1e-3)
        hf = build_hf(transformers.LlamaForCausalLM, config, attn_implementation="sdpa")
    return hf, load_in_float64(hf, tmp_path_factory.mktemp(request.param))


def _peft_model(hf, config):
    import copy

    import peft as peft_pkg

    theirs = peft_pkg.get_peft_model(copy.deepcopy(hf), config).double().eval()
    return theirs


def _compare(theirs, ours, P=0):
    import torch

    from model_helpers import padded_batch, tol_for

    x, mask = padded_batch(V, T=8, seed=7)
    with torch.no_grad():
        t = theirs(input_ids=torch.from_numpy(x),
                   attention_mask=torch.from_numpy(mask)).logits.numpy()[:, P:]
    o = logits(ours, x, attention_mask=mask)
    valid = mask.astype(bool)
    err = rel(o[valid], t[valid])
    assert err < max(tol_for(theirs.get_base_model()), 1e-6), err


def test_ia3_matches_the_peft_package(hf_pair):
    import peft as peft_pkg
    import torch

    hf, model = hf_pair
    theirs = _peft_model(hf, peft_pkg.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    ours = peft.apply(model, "ia3", adapter_name="parity")
    names = peft.hf_module_names(ours)
    copied = 0
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "ia3_l") and "default" in module.ia3_l:
                host_name, rows, _ = names[name]
                a = dict(ours.named_modules())[host_name].peft.parity
                holder = a if rows is None else getattr(a, name.rpartition(".")[2])
                holder.ia3_l.data[...] = module.ia3_l["default"].numpy()
                copied += 1
    assert copied == len(peft_params(ours)) > 0
    try:
        _compare(theirs, ours)
    finally:
        peft.delete_adapter(ours, "parity")


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "prefix_projection"])
def test_virtual_tokens_match_the_peft_package(hf_pair, method):
    import peft as peft_pkg
    import torch

    hf, model = hf_pair
    P = 3
    if method == "prompt_tuning":
        config = peft_pkg.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
        ours = peft.apply(model, "prompt_tuning", adapter_name="parity", num_virtual_tokens=P)
    else:
        proj = method == "prefix_projection"
        config = peft_pkg.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                             prefix_projection=proj, encoder_hidden_size=5)
        ours = peft.apply(model, "prefix_tuning", adapter_name="parity", num_virtual_tokens=P,
                          prefix_projection=proj, encoder_hidden_size=5)
    theirs = _peft_model(hf, config)
    enc = theirs.prompt_encoder["default"]
    a = ours.transformer.peft.parity
    with torch.no_grad():
        if method == "prompt_tuning":
            a.prompt_embeddings.data[...] = enc.embedding.weight.numpy()
        else:
            a.embedding.data[...] = enc.embedding.weight.numpy()
        if method == "prefix_projection":
            for mine, i in ((a.transform_in, 0), (a.transform_out, 2)):
                mine.weight.data[...] = enc.transform[i].weight.numpy()
                mine.bias.data[...] = enc.transform[i].bias.numpy()
    try:
        _compare(theirs, ours, P if method == "prompt_tuning" else 0)
    finally:
        peft.delete_adapter(ours, "parity")
