"""QLoRA: LoRA (and DoRA) on a frozen quantized base (tinylm.quant's QuantLinear).
Gradients reach the LoRA weights only, through QuantMatmul's backward to x; no float
copy of the base is kept; the result equals the same LoRA on the dequantized base."""

import numpy as np
import pytest

from tinylm import backend, peft
from tinylm.errors import TinyLMError
from tinylm.models import LlamaConfig, build_model
from tinylm.quant import QuantLinear
from tinylm.quant.model import dequantize_model, quantize

V = 67


def llama():
    backend.seed(0)  # every call: the same weights
    # widths that are multiples of NF4's block of 64 (Q4_0's is 32)
    c = LlamaConfig(vocab_size=V, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128,
                    max_positions=32)
    return build_model(c).eval()


def ids(B=2, T=5, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _pair(scheme, **options):
    """The quantized model with LoRA and the dequantized copy with the same LoRA."""
    q = quantize(llama(), scheme, skip=["lm_head"])
    f = dequantize_model(quantize(llama(), scheme, skip=["lm_head"]))
    for m in (q, f):
        peft.apply(m, "lora", r=4, init_lora_weights=False, rank_pattern={"v_proj": 2},
                   target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                   **options)  # row pieces of the fused qkv and whole hosts
    fp = dict(f.named_parameters())
    for n, p in q.named_parameters():
        if ".peft." in n:
            fp[n].data[...] = p.data
    return q, f


@pytest.mark.parametrize("scheme", ["nf4", "q4_0"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_grads_on_lora_only_and_equal_to_the_dequantized_base(scheme, use_dora):
    q, f = _pair(scheme, use_dora=use_dora)
    hosts = [m for _, m, _ in peft.adapter_sets(q)]
    assert hosts and all(isinstance(h, QuantLinear) for h in hosts)
    pieces = [p for _, _, a in peft.iter_adapters(q) for p in a.pieces]
    assert {p.holder.lora_A.dtype for p in pieces} == {np.dtype(np.float32)}
    assert sum(p.rows is not None for p in pieces) == 4  # q and v of two layers
    x, targets = ids(), ids(seed=1)
    outs = []
    for m in (q, f):
        out = m(x, targets=targets)
        out.loss.backward()
        outs.append(out.logits.numpy())
    assert rel(outs[0], outs[1]) < 1e-5
    fp = dict(f.named_parameters())
    for n, p in q.named_parameters():
        if ".peft." in n:
            assert p.grad is not None and np.isfinite(p.grad).all(), n
            assert rel(p.grad, fp[n].grad) < 1e-4, n
        else:
            assert p.grad is None and not p.requires_grad, n
    # no float weight was kept on the quantized hosts: only packed buffers and LoRA
    for h in hosts:
        assert not [k for k, v in h._parameters.items() if v is not None and k != "bias"]
        assert "qweight" in h._buffers


def test_qlora_counts_packed_weights_and_refuses_to_merge():
    q = quantize(llama(), "nf4", skip=["lm_head"])
    total = sum(p.size for p in q.parameters()) + sum(
        m.weight_shape[0] * m.weight_shape[1] for m in q.modules() if isinstance(m, QuantLinear))
    peft.apply(q, "lora", r=4)
    report = peft.trainable_parameters(q)
    assert report.total == total + report.trainable and report.trainable > 0
    with pytest.raises(TinyLMError, match="quantized layer .*dequantize the model first"):
        peft.merge(q)
    with pytest.raises(TinyLMError, match="dequantize the model first"):
        peft.merge_and_unload(q)
    assert not any(a.merged for _, _, a in peft.iter_adapters(q))


def test_qlora_trains():
    """A few SGD steps on the LoRA weights lower the loss on a fixed batch."""
    from tinylm import optim

    q = quantize(llama(), "q4_0", skip=["lm_head"])
    peft.apply(q, "lora", r=4, alpha=8)
    params = [p for p in q.parameters() if p.requires_grad]
    opt = optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    x, t = ids(B=4, T=8), ids(B=4, T=8, seed=2)
    losses = []
    for _ in range(5):
        loss = q(x, targets=t).loss
        losses.append(float(loss.item()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.05
