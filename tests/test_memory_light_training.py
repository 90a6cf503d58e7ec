"""Activation checkpointing (``tinylm.nn.recompute``, ``Model.gradient_checkpointing``)
and the chunked LM-head cross-entropy (``ops.linear_cross_entropy``, a Decoder forward
with ``return_logits=False``): the same loss and gradients as the plain path, checked
against torch (transformers' GPT-2 and Llama, ``torch.nn.functional.cross_entropy``),
finite differences and the plain tinylm path (bitwise where the arithmetic is the same).
"""

from __future__ import annotations

import numpy as np
import pytest

import tinylm
from tinylm import backend, peft
from tinylm.models import Decoder, EncoderDecoder, GPT2Config, T5Config
from tinylm.ops.linear_cross_entropy import linear_cross_entropy
from tinylm.tensor import Tensor
from tinylm.testing import gradcheck

VOCAB = 61


def _batch(T=12, B=2, vocab=VOCAB, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, T))
    targets = np.roll(ids, -1, axis=1)
    targets[0, :4] = -100  # a masked prompt
    return ids, targets


def _step(model, ids, targets, checkpoint=False, return_logits=True, seed=7, **kw):
    """(loss, {name: grad}, the generator's state after) of one forward + backward."""
    backend.seed(seed)
    model.zero_grad()
    model.gradient_checkpointing(checkpoint)
    out = model(ids, targets=targets, return_logits=return_logits, **kw)
    out.loss.backward()
    grads = {n: None if p.grad is None else p.grad.copy() for n, p in model.named_parameters()}
    model.gradient_checkpointing(False)
    return out.loss.item(), grads, backend.rng(np).bit_generator.state


def _same(g0, g1, rtol=0.0):
    assert g0.keys() == g1.keys()
    for n in g0:
        if g0[n] is None or g1[n] is None:
            assert g0[n] is None and g1[n] is None, n
        elif rtol == 0.0:
            np.testing.assert_array_equal(g0[n], g1[n], err_msg=n)
        else:
            np.testing.assert_allclose(g0[n], g1[n], rtol=rtol, atol=rtol * np.abs(g0[n]).max(),
                                       err_msg=n)


def gpt2(**kw):
    c = dict(vocab_size=VOCAB, d_model=32, n_layer=3, n_head=4, max_positions=128)
    return Decoder(GPT2Config(**{**c, **kw}))


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointing_gives_the_same_gradients_bitwise(dropout):
    model = gpt2(dropout=dropout, attn_dropout=dropout).train()
    ids, targets = _batch()
    l0, g0, rng0 = _step(model, ids, targets)
    l1, g1, rng1 = _step(model, ids, targets, checkpoint=True)
    assert l0 == l1
    _same(g0, g1)
    assert rng0 == rng1  # the rest of the run draws what it would have drawn


def test_checkpointing_is_a_switch_with_the_hugging_face_names():
    model = gpt2()
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.transformer.checkpoint_blocks
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_checkpointing_with_lora_reaches_every_layer_and_not_the_base():
    model = gpt2(dropout=0.1).train()
    peft.apply(model, "lora", r=4, alpha=8, dropout=0.1, target_modules=["qkv", "out"],
               init_lora_weights="gaussian")
    ids, targets = _batch()
    _, g0, _ = _step(model, ids, targets)
    _, g1, _ = _step(model, ids, targets, checkpoint=True)
    _same(g0, g1)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".0." in n for n in trained)  # block 0: its input needs no gradient
    assert all(g1[n] is not None for n in trained)
    assert all(g1[n] is None for n, p in model.named_parameters() if not p.requires_grad)


def test_checkpointing_with_experts_keeps_the_aux_loss_gradient():
    model = gpt2(n_experts=4, moe_top_k=2, moe_aux_coef=0.05).train()
    ids, targets = _batch()
    _, g0, _ = _step(model, ids, targets)
    _, g1, _ = _step(model, ids, targets, checkpoint=True)
    _same(g0, g1)


def test_checkpointing_an_encoder_decoder_hands_back_memory_and_bias_gradients():
    """T5: cross-attention reads the encoder output and self-attention a learned
    position bias, both computed outside the blocks: their gradients go back out."""
    model = EncoderDecoder(T5Config(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4,
                                    head_dim=8, d_ff=64, dropout=0.1)).train()
    ids, targets = _batch()

    def step(checkpoint):
        backend.seed(3)
        model.zero_grad()
        model.gradient_checkpointing(checkpoint)
        model(ids, targets=targets).loss.backward()
        return {n: p.grad.copy() for n, p in model.named_parameters()}

    _same(step(False), step(True))


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_checkpointing_and_the_chunked_loss_with_virtual_tokens(method):
    """Prefix tuning feeds its prefixes through a cache (those blocks run as usual);
    prompt tuning's virtual embeddings enter the checkpointed blocks with the input."""
    model = gpt2().to(dtype="float64").train()
    peft.apply(model, method, num_virtual_tokens=3)
    ids, targets = _batch()
    _, g0, _ = _step(model, ids, targets)
    _, g1, _ = _step(model, ids, targets, checkpoint=True)
    _same(g0, g1)
    _, g2, _ = _step(model, ids, targets, checkpoint=True, return_logits=False)
    _same(g0, g2, rtol=1e-11)


def test_checkpointing_under_no_grad_and_in_decoding():
    model = gpt2().eval()
    model.gradient_checkpointing(True)
    ids, _ = _batch()
    with tinylm.no_grad():
        a = model(ids).logits.numpy()
    model.gradient_checkpointing(False)
    with tinylm.no_grad():
        b = model(ids).logits.numpy()
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- chunked loss


@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("sum", 0.0), ("mean", 0.1)])
def test_linear_cross_entropy_matches_torch(reduction, smoothing):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    h, w = rng.normal(size=(3, 7, 16)), rng.normal(size=(VOCAB, 16))
    t = rng.integers(0, VOCAB, (3, 7))
    t[1, 2:5] = -100
    th, tw = (torch.tensor(a, requires_grad=True) for a in (h, w))
    ref = torch.nn.functional.cross_entropy((th @ tw.T).reshape(-1, VOCAB), torch.tensor(t)
                                            .reshape(-1), reduction=reduction,
                                            label_smoothing=smoothing)
    ref.backward()
    ours_h, ours_w = Tensor(h, requires_grad=True), Tensor(w, requires_grad=True)
    loss = linear_cross_entropy(ours_h, t, weight=ours_w, reduction=reduction,
                                label_smoothing=smoothing, chunk_bytes=5 * VOCAB * 8)
    loss.backward()  # chunks of 5 rows: 21 rows in 5 chunks, the last one short
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(ours_h.grad, th.grad.numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ours_w.grad, tw.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_linear_cross_entropy_gradcheck():
    rng = np.random.default_rng(2)
    h, w = rng.normal(size=(5, 6)), rng.normal(size=(11, 6))
    t = np.array([3, -100, 0, 10, 7])
    assert gradcheck(lambda a, b: linear_cross_entropy(a, t, weight=b, label_smoothing=0.05,
                                                       chunk_bytes=2 * 11 * 8) * 1.7, h, w)


def test_linear_cross_entropy_without_a_graph_and_bad_targets():
    rng = np.random.default_rng(3)
    h, w = rng.normal(size=(4, 6)), rng.normal(size=(9, 6))
    with tinylm.no_grad():
        a = linear_cross_entropy(Tensor(h), np.array([1, 2, 3, 4]), weight=Tensor(w))
    logits = h @ w.T
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    np.testing.assert_allclose(a.item(), np.mean(lse - logits[np.arange(4), [1, 2, 3, 4]]),
                               rtol=1e-13)
    with pytest.raises(tinylm.TinyLMError, match="outside"):
        linear_cross_entropy(Tensor(h), np.array([1, 2, 9, 0]), weight=Tensor(w))
    with pytest.raises(tinylm.TinyLMError, match="reduction"):
        linear_cross_entropy(Tensor(h), np.array([1, 2, 3, 0]), weight=Tensor(w),
                             reduction="none")


@pytest.mark.parametrize("tied", [True, False])
def test_decoder_loss_without_logits_equals_the_plain_loss(tied):
    model = gpt2(tie_embeddings=tied).to(dtype="float64").train()
    ids, targets = _batch()
    l0, g0, _ = _step(model, ids, targets)
    l1, g1, _ = _step(model, ids, targets, return_logits=False)
    np.testing.assert_allclose(l1, l0, rtol=1e-13)
    _same(g0, g1, rtol=1e-11)
    model.return_logits = False  # the model-wide switch (tinylm finetune sets it)
    out = model(ids, targets=targets)
    assert out.logits is None and out.loss.item() == pytest.approx(l0, rel=1e-13)
    assert model(ids).logits.shape == (2, 12, VOCAB)  # no targets: logits as always
    assert model(ids, targets=targets, return_logits=True).logits is not None


def test_quantized_tied_head_loss_without_logits():
    """QLoRA's packed head (Q4_0, tied to the packed embedding) multiplies itself."""
    from tinylm.quant.model import quantize

    model = gpt2(d_model=64)
    quantize(model, "q4_0")
    peft.apply(model, "lora", r=4, target_modules=["qkv"], init_lora_weights="gaussian")
    model.train()
    ids, targets = _batch()
    l0, g0, _ = _step(model, ids, targets)
    l1, g1, _ = _step(model, ids, targets, checkpoint=True, return_logits=False)
    assert model(ids, targets=targets, return_logits=False).logits is None  # the head path
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    _same(g0, g1, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_checkpointed_chunked_training_matches_transformers(family, tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from model_helpers import EPS, WIDE_INIT, assert_grads_match, build_hf, load_in_float64, \
        tol_for, \
        padded_batch, torch_loss

    import torch

    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                      initializer_range=WIDE_INIT, layer_norm_epsilon=EPS,
                                      tie_word_embeddings=False)
        hf = build_hf(transformers.GPT2LMHeadModel, cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=56,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64,
                                       initializer_range=WIDE_INIT, rms_norm_eps=EPS)
        # sdpa: eager Llama attention on a float64 model NaNs a left-padded row
        hf = build_hf(transformers.LlamaForCausalLM, cfg, attn_implementation="sdpa")
    model = load_in_float64(hf, tmp_path)
    ids, mask = padded_batch(VOCAB, seed=1)
    targets = np.where(mask == 1, np.roll(ids, -1, axis=1), -100)
    hf.zero_grad()
    tl = torch_loss(hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
                    .logits, targets)
    tl.backward()
    model.gradient_checkpointing(True)
    out = model(ids, attention_mask=mask, targets=targets, return_logits=False)
    assert out.logits is None
    out.loss.backward()
    assert out.loss.item() == pytest.approx(tl.item(), rel=tol_for(hf))
    assert_grads_match(model, hf)


# --------------------------------------------------------------------------- tinylm finetune


def test_finetune_saves_memory_by_default_for_a_quantized_base():
    from tinylm.finetune import FinetuneSpec, memory_estimate, save_memory
    from tinylm.quant.model import quantize

    plain, packed = gpt2(d_model=64, vocab_size=20000), gpt2(d_model=64)
    quantize(packed, "q4_0")
    spec = FinetuneSpec("base", "lora")
    before = memory_estimate(plain, 8, 128)["activations"]
    assert save_memory(plain, spec) is False and not plain.is_gradient_checkpointing
    assert plain.return_logits is False  # the chunked loss: always
    chunked = memory_estimate(plain, 8, 128)["activations"]
    assert save_memory(packed, spec) is True and packed.is_gradient_checkpointing
    assert save_memory(plain, FinetuneSpec("base", "lora", gradient_checkpointing=True))
    both = memory_estimate(plain, 8, 128)["activations"]
    assert before > chunked > both > 0
    assert not save_memory(packed, FinetuneSpec("base", "lora", gradient_checkpointing=False))


def test_linear_cross_entropy_through_any_frozen_head_module():
    """A head that is neither a Tensor nor multiplies itself runs on each chunk."""
    from tinylm import nn, ops

    class Scaled(nn.Module):  # a frozen head with a nonlinearity after the product
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 13, bias=False)

        def forward(self, x):
            return ops.tanh(self.proj(x)) * 3.0

    head = Scaled().to(dtype="float64").requires_grad_(False)
    rng = np.random.default_rng(4)
    h, t = rng.normal(size=(9, 6)), rng.integers(0, 13, 9)
    a, b = Tensor(h, requires_grad=True), Tensor(h, requires_grad=True)
    plain = ops.cross_entropy(head(a), t)
    plain.backward()
    ours = linear_cross_entropy(b, t, head=head, vocab_size=13, chunk_bytes=4 * 13 * 8)
    ours.backward()
    np.testing.assert_allclose(ours.item(), plain.item(), rtol=1e-13)
    np.testing.assert_allclose(b.grad, a.grad, rtol=1e-11, atol=1e-14)


def test_checkpointing_under_autocast_recomputes_in_half():
    """The re-run in backward autocasts as the forward did (backward runs outside the
    ``autocast`` block in the Trainer), so the gradients are the plain run's."""
    from tinylm import amp

    model = gpt2().train()
    ids, targets = _batch()
    with amp.autocast("float16"):
        l0, g0, _ = _step(model, ids, targets)
        model.zero_grad()
        backend.seed(7)
        model.gradient_checkpointing(True)
        out = model(ids, targets=targets)
    out.loss.backward()  # outside autocast, as Trainer does
    g1 = {n: None if p.grad is None else p.grad.copy() for n, p in model.named_parameters()}
    model.gradient_checkpointing(False)
    assert out.loss.item() == l0
    _same(g0, g1)


def test_an_adapter_on_the_head_is_not_skipped_by_the_chunked_loss():
    model = peft.apply(gpt2().to(dtype="float64"), "lora", r=4, target_modules=["lm_head"],
                       init_lora_weights=False)
    ids, targets = _batch()
    l0, g0, _ = _step(model, ids, targets)
    l1, g1, _ = _step(model, ids, targets, return_logits=False)
    np.testing.assert_allclose(l1, l0, rtol=1e-13)
    _same(g0, g1, rtol=1e-11)
    assert any(n.endswith("lora_B.default.weight") or "lora_B" in n for n, g in g1.items()
               if g is not None)


def test_finetune_puts_the_memory_settings_back():
    """What ``finetune`` does around ``trainer.fit``: the caller's model answers with
    logits and without checkpointing afterwards, as it did before."""
    from tinylm.finetune import (FinetuneSpec, memory_settings, restore_memory_settings,
                                 save_memory)

    model = gpt2()
    ids, targets = _batch()
    before = memory_settings(model)
    assert save_memory(model, FinetuneSpec("base", "lora", gradient_checkpointing=True))
    assert model(ids, targets=targets).logits is None
    restore_memory_settings(model, before)
    assert model.return_logits is True and not model.is_gradient_checkpointing
    assert model(ids, targets=targets).logits.shape == (2, 12, VOCAB)
