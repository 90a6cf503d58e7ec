"""MultiHeadAttention (MHA, MQA, GQA; self and cross), its masks and the KV cache."""

from __future__ import annotations

import numpy as np
import pytest

import tinylm
from tinylm import testing
from tinylm.errors import ShapeError, TinyLMError
from tinylm.nn import AttentionSetup, KVCache, MultiHeadAttention, additive_mask
from tinylm.positional import RoPE


def reference(attn, x, memory=None, keep=None, causal=False):
    """The layer's math in float64 NumPy, one head at a time."""
    nh, nkv, hs = attn.n_head, attn.n_kv_head, attn.head_dim
    B, T, _ = x.shape
    W = lambda lin: (lin.weight.numpy().astype(np.float64),  # noqa: E731
                     None if lin.bias is None else lin.bias.numpy().astype(np.float64))
    lin = lambda a, wb: a @ wb[0].T + (0 if wb[1] is None else wb[1])  # noqa: E731
    if attn.cross:
        q = lin(x, W(attn.q))
        k, v = np.split(lin(memory, W(attn.kv)), 2, axis=-1)
    else:
        q, k, v = np.split(lin(x, W(attn.qkv)), [nh * hs, (nh + nkv) * hs], axis=-1)
    S = k.shape[1]
    out = np.zeros((B, T, nh * hs))
    scale = 1 / np.sqrt(hs) if attn.scale is None else attn.scale
    for b in range(B):
        for h in range(nh):
            g = h // (nh // nkv)  # the kv head this query head reads
            s = q[b, :, h * hs:(h + 1) * hs] @ k[b, :, g * hs:(g + 1) * hs].T * scale
            allowed = np.ones((T, S), bool)
            if causal:
                allowed &= np.tril(np.ones((T, S), bool), S - T)
            if keep is not None:
                allowed &= keep[b].astype(bool)[None, :]
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, h * hs:(h + 1) * hs] = p @ v[b, :, g * hs:(g + 1) * hs]
    return lin(out, W(attn.out))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("causal, padded", [(True, False), (False, True), (True, True)])
def test_self_attention_matches_reference(n_kv_head, causal, padded):
    tinylm.seed(0)
    attn = MultiHeadAttention(32, 4, n_kv_head=n_kv_head).to(dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 6, 32))
    keep = np.array([[1] * 6, [1] * 4 + [0] * 2]) if padded else None
    mask = additive_mask(keep, 6, 6, causal, np.float64) if padded else None
    y = attn(tinylm.tensor(x), AttentionSetup(mask=mask, is_causal=causal and not padded))
    want = reference(attn, x, keep=keep, causal=causal)
    rows = np.ones((2, 6), bool) if keep is None else keep.astype(bool)
    testing.assert_close(y.numpy()[rows], want[rows], rtol=1e-9, atol=1e-9)


def test_kv_heads_shrink_the_projection():
    mha, gqa, mqa = (MultiHeadAttention(32, 8, n_kv_head=n) for n in (8, 2, 1))
    assert [m.qkv.weight.shape[0] for m in (mha, gqa, mqa)] == [96, 32 + 16, 32 + 8]
    with pytest.raises(TinyLMError, match="must divide n_head"):
        MultiHeadAttention(32, 8, n_kv_head=3)


def test_cross_attention_matches_reference_with_memory_padding():
    attn = MultiHeadAttention(16, 4, n_kv_head=2, cross=True, d_memory=24,
                              bias=False).to(dtype="float64")
    rng = np.random.default_rng(1)
    x, memory = rng.standard_normal((2, 3, 16)), rng.standard_normal((2, 5, 24))
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    setup = AttentionSetup(memory=tinylm.tensor(memory),
                           memory_mask=additive_mask(keep, 3, 5, False, np.float64),
                           mask=np.full((1, 1, 3, 3), np.nan), is_causal=True)  # not read
    y = attn(tinylm.tensor(x), setup)
    testing.assert_close(y, reference(attn, x, memory, keep=keep), rtol=1e-9, atol=1e-9)
    with pytest.raises(TinyLMError, match=r"memory=\.\.\."):
        attn(tinylm.tensor(x))


def test_attention_gradcheck_gqa_with_rope_and_mask():
    tinylm.seed(0)
    attn = MultiHeadAttention(8, 4, n_kv_head=2).to(dtype="float64")
    rope = RoPE(2).rotation(np.arange(3))
    keep = np.array([[1, 1, 0], [1, 1, 1]])
    setup = AttentionSetup(mask=additive_mask(keep, 3, 3, True, np.float64), rotate=rope)
    x = np.random.default_rng(2).standard_normal((2, 3, 8))
    testing.gradcheck(lambda t: attn(t, setup), x)


def test_additive_mask_semantics():
    keep = np.array([[1, 1, 0]])
    b = additive_mask(keep, 2, 3, causal=True, dtype=np.float32)  # queries at positions 1, 2
    lo = -np.inf  # a hidden key: a row with none visible follows the empty-row rule
    np.testing.assert_array_equal(b[0, 0], [[0, 0, lo], [0, 0, lo]])
    assert additive_mask(None, 2, 2, True, np.float16).dtype == np.float32  # scores are >= f32
    with pytest.raises(ShapeError, match="attention_mask must be"):
        additive_mask(np.ones((1, 4)), 2, 3, True, np.float32)


def test_a_fully_masked_query_gives_zero_attention_and_no_gradient():
    """A padding query of a left-padded causal batch sees nothing: its attention output
    is 0 (the layer returns out's bias there), no NaN leaks, and its input gets no
    gradient through attention."""
    attn = MultiHeadAttention(16, 2)
    attn.out.bias.data[...] = np.arange(16)
    x = tinylm.randn(1, 4, 16, requires_grad=True)
    mask = additive_mask(np.array([[0, 0, 1, 1]]), 4, 4, True, np.float32)
    y = attn(x, AttentionSetup(mask=mask))
    (y * y).sum().backward()
    assert np.isfinite(y.numpy()).all() and np.isfinite(x.grad).all()
    np.testing.assert_array_equal(y.numpy()[0, :2], np.broadcast_to(np.arange(16), (2, 16)))
    assert (x.grad[0, :2] == 0).all() and (np.abs(x.grad[0, 2:]).sum(-1) > 0).all()


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_kv_cache_matches_full_recompute_and_grows(n_kv_head):
    tinylm.seed(0)
    attn = MultiHeadAttention(32, 4, n_kv_head=n_kv_head)
    rope = RoPE(8)
    x = tinylm.randn(2, 40, 32)  # past the slot's first capacity (16)
    with tinylm.no_grad():
        full = attn(x, AttentionSetup(is_causal=True, rotate=rope.rotation(np.arange(40))))
        full = full.numpy()
        cache, steps = KVCache(), []
        for start, stop in [(0, 7), *[(t, t + 1) for t in range(7, 30)], (30, 40)]:
            pos = cache.advance(np.arange(start, stop))
            assert cache.length == stop and pos.shape == (stop,)
            setup = AttentionSetup(is_causal=True, cache=cache,
                                   rotate=rope.rotation(np.arange(start, stop)))
            steps.append(attn(x[:, start:stop], setup).numpy())
    testing.assert_close(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-6)


def test_kv_cache_static_cross_entries_and_reorder():
    attn = MultiHeadAttention(16, 2, cross=True)
    cache = KVCache()
    calls = []

    def project():
        calls.append(1)
        return tinylm.randn(3, 2, 5, 8), tinylm.randn(3, 2, 5, 8)

    k1, _ = cache.static(attn, project)
    k2, _ = cache.static(attn, project)
    assert k1 is k2 and len(calls) == 1
    self_attn = MultiHeadAttention(16, 2)
    cache.advance(np.arange(2))
    with tinylm.no_grad():
        self_attn(tinylm.randn(3, 2, 16), AttentionSetup(cache=cache))
    slot_k = cache._slots[id(self_attn)].k.copy()
    cache.reorder(np.array([2, 0]))
    np.testing.assert_array_equal(cache._slots[id(self_attn)].k, slot_k[[2, 0]])
    assert cache.static(attn, project)[0].shape[0] == 2


def test_kv_cache_passes_gradients_to_the_new_positions():
    attn = MultiHeadAttention(16, 2)
    cache = KVCache()
    with tinylm.no_grad():
        cache.advance(np.arange(3))
        attn(tinylm.randn(1, 3, 16), AttentionSetup(is_causal=True, cache=cache))
    x = tinylm.randn(1, 1, 16, requires_grad=True)
    cache.advance(np.arange(3, 4))
    attn(x, AttentionSetup(is_causal=True, cache=cache)).sum().backward()
    assert x.grad is not None and np.abs(x.grad).sum() > 0
    assert attn.qkv.weight.grad is not None


# --------------------------------------------------------------------------- blocks


def test_post_norm_block_is_norm_of_the_residual_sum():
    from tinylm.nn import BlockConfig, TransformerBlock

    tinylm.seed(0)
    config = BlockConfig(d_model=16, n_head=2, d_ff=32, norm_position="post", norm_eps=1e-12,
                         activation="gelu")
    block = TransformerBlock(config).to(dtype="float64")
    x = tinylm.tensor(np.random.default_rng(0).standard_normal((2, 3, 16)))
    y, aux = block(x)
    h = block.norm1(x + block.attn(x))
    testing.assert_close(y, block.norm2(h + block.mlp(h)))
    assert aux is None


def test_block_config_is_frozen_checked_and_built_once_from_the_model_config():
    import dataclasses

    from tinylm.models import BertConfig, LlamaConfig, build_model
    from tinylm.models.base import block_config
    from tinylm.nn import ACTIVATIONS, NORMS, BlockConfig, MoE, MoEConfig, TransformerBlock

    c = LlamaConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=48,
                    n_experts=3, moe_top_k=1, moe_renormalize=False, norm_eps=1e-5)
    bc = block_config(c)
    assert (bc.d_model, bc.n_head, bc.n_kv_head, bc.head_dim, bc.d_ff) == (32, 4, 2, 8, 48)
    assert (bc.activation, bc.gated, bc.bias, bc.norm, bc.norm_eps) == (
        "silu", True, False, "rmsnorm", 1e-5)
    assert bc.moe == MoEConfig(d_model=32, d_ff=48, n_experts=3, top_k=1, activation="silu",
                               gated=True, bias=False, renormalize=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bc.d_ff = 64
    model = build_model(c)
    blocks = list(model.transformer.blocks)
    assert all(b.config is blocks[0].config for b in blocks)  # one config per stack
    assert isinstance(blocks[0].mlp, MoE) and blocks[0].mlp.config == bc.moe
    dense = TransformerBlock(dataclasses.replace(bc, n_experts=0, cross=True))
    assert dense.config.moe is None and hasattr(dense, "cross_attn")
    assert block_config(BertConfig()).norm_position == "post"
    # one list of names in nn: block configs, model configs and the layers all use it
    for name in ACTIVATIONS:
        assert BlockConfig(d_model=8, n_head=2, d_ff=8, activation=name).activation == name
        LlamaConfig(activation=name)
    for name in NORMS:
        LlamaConfig(norm=name)
        BlockConfig(d_model=8, n_head=2, d_ff=8, norm=name)
    for bad in (dict(activation="swish"), dict(norm="batchnorm"), dict(norm_position="mid"),
                dict(n_experts=2, moe_top_k=3)):
        with pytest.raises(TinyLMError, match="invalid BlockConfig"):
            BlockConfig(d_model=8, n_head=2, d_ff=8, **bad)
    with pytest.raises(TinyLMError, match=r"activation must be one of \('gelu', 'gelu_tanh'"):
        LlamaConfig(activation="swish")


def test_one_attention_setup_per_forward_reaches_every_layer(monkeypatch):
    """The BlockStack builds the setup once; every block hands it on unchanged."""
    from tinylm.models import T5Config, build_model

    seen = []
    forward = MultiHeadAttention.forward

    def spy(self, x, setup):
        seen.append((self.cross, setup))
        return forward(self, x, setup)

    monkeypatch.setattr(MultiHeadAttention, "forward", spy)
    model = build_model(T5Config(vocab_size=40, d_model=16, n_layer=2, n_head=2, head_dim=8,
                                 d_ff=32))
    ids = np.random.default_rng(0).integers(1, 40, (2, 5))
    keep = np.array([[1] * 5, [1] * 3 + [0] * 2])
    model(ids, decoder_ids=ids[:, :3], attention_mask=keep)
    assert [cross for cross, _ in seen] == [False, False] + [False, True] * 2
    encoder, decoder = {id(s) for _, s in seen[:2]}, {id(s) for _, s in seen[2:]}
    assert len(encoder) == len(decoder) == 1 and encoder != decoder
    enc, dec = seen[0][1], seen[2][1]
    assert enc.mask.shape == (2, 2, 5, 5) and not enc.is_causal  # padding + T5's bias
    assert enc.token_mask.tolist() == keep.tolist() and enc.memory is None
    assert dec.is_causal and dec.mask.shape == (1, 2, 3, 3)  # T5's bias; causal unmasked
    assert dec.memory.shape == (2, 5, 16) and dec.memory_mask.shape == (2, 1, 3, 5)


def test_positional_schemes_name_their_hook_position_bias():
    from tinylm.positional import PositionalEncoding

    with pytest.raises(TinyLMError, match="position_bias"):
        class OldStyle(PositionalEncoding):  # noqa: F841
            def bias(self, q_pos, k_pos):
                return None


def test_dropout_is_active_in_training_only():
    from tinylm.models import GPT2Config, build_model

    model = build_model(GPT2Config(vocab_size=30, d_model=16, n_layer=1, n_head=2,
                                   max_positions=8, dropout=0.3, attn_dropout=0.3))
    ids = np.arange(12).reshape(2, 6)
    train = [model(ids).logits.numpy() for _ in range(2)]
    assert not np.allclose(train[0], train[1])
    model.eval()
    with tinylm.no_grad():
        a, b = model(ids).logits.numpy(), model(ids).logits.numpy()
    np.testing.assert_array_equal(a, b)


def test_models_run_on_every_device(device):
    """The families, GQA + RoPE + MoE + T5 bias, on CPU and (with -m gpu) CUDA."""
    from tinylm.models import LlamaConfig, T5Config, build_model

    configs = [LlamaConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=48,
                           n_experts=3, moe_top_k=2),
               T5Config(vocab_size=40, d_model=32, n_layer=1, n_head=4, head_dim=8, d_ff=48)]
    ids = np.random.default_rng(0).integers(0, 40, (2, 6))
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    for config in configs:
        tinylm.seed(0)
        model = build_model(config).eval()
        kwargs = {"decoder_ids": ids[:, :3]} if config.architecture == "t5" else {}
        with tinylm.no_grad():
            want = model(ids, attention_mask=mask, **kwargs).logits.numpy()
            model.to(device)
            got = model(ids, attention_mask=mask, **kwargs).logits
            assert got.device == device
            if config.architecture != "t5":
                cache = KVCache()
                model(ids[:, :5], attention_mask=mask[:, :5], cache=cache)
                step = model(ids[:, 5:], attention_mask=mask, cache=cache).logits
                testing.assert_close(step.numpy()[:, 0], want[:, 5], rtol=1e-4, atol=1e-5)
        testing.assert_close(got.numpy(), want, rtol=1e-4, atol=1e-5)
        model.to(device)
        loss = model(ids, targets=ids[:, :3] if kwargs else ids, **kwargs).loss
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
