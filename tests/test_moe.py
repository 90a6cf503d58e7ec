"""Mixture of experts: the load-balancing loss against its formula, the routed forward
against a token-by-token reference, gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import tinylm
from tinylm import testing
from tinylm.errors import TinyLMError
from tinylm.models import LlamaConfig, build_model
from tinylm.nn import MoE, MoEConfig, load_balancing_loss
from tinylm.tensor import Tensor

P4 = np.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])


def test_load_balancing_loss_hand_computed_switch_case():
    # top-1: experts 0, 0, 1, 0 -> f = (3/4, 1/4); P = mean probs = (0.6, 0.4)
    # aux = E * sum f_e P_e = 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    aux = load_balancing_loss(Tensor(P4), P4.argmax(-1)[:, None], 2)
    assert aux.item() == pytest.approx(1.1, abs=1e-12)


def test_load_balancing_loss_hand_computed_top2_case():
    # tokens pick (0, 1) and (1, 2): counts (1, 2, 1) over N = 2 -> f = (0.5, 1, 0.5)
    # P = (0.3, 0.45, 0.25); aux = 3 * (0.15 + 0.45 + 0.125) = 2.175
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    aux = load_balancing_loss(Tensor(p), np.array([[0, 1], [1, 2]]), 3)
    assert aux.item() == pytest.approx(2.175)


def test_load_balancing_loss_masks_padding_and_is_k_when_uniform():
    # the last token is padding: f = (2/3, 1/3), P = (0.5, 0.5) -> aux = 1
    aux = load_balancing_loss(Tensor(P4), P4.argmax(-1)[:, None], 2, mask=np.array([1, 1, 1, 0]))
    assert aux.item() == pytest.approx(1.0)
    uniform = np.full((6, 3), 1 / 3)
    top2 = np.array([[0, 1], [1, 2], [2, 0]] * 2)
    assert load_balancing_loss(Tensor(uniform), top2, 3).item() == pytest.approx(2.0)
    with pytest.raises(TinyLMError, match="no token"):
        load_balancing_loss(Tensor(P4), P4.argmax(-1)[:, None], 2, mask=np.zeros(4))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(masked):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((12, 5)).astype(np.float32)
    mask = (rng.random((3, 4)) > 0.3).astype(np.int64) if masked else None
    probs = tinylm.ops.softmax(Tensor(logits))
    top = np.argsort(-probs.numpy(), axis=-1, kind="stable")[:, :2]
    ours = load_balancing_loss(probs, top, 5, None if mask is None else mask.reshape(-1))
    theirs = load_balancing_loss_func((torch.from_numpy(logits),), 5, 2,
                                      None if mask is None else torch.from_numpy(mask))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def make_moe(top_k=2, renormalize=True, gated=True):
    tinylm.seed(3)
    config = MoEConfig(d_model=4, d_ff=6, n_experts=3, top_k=top_k,
                       activation="silu" if gated else "gelu", gated=gated, bias=not gated,
                       renormalize=renormalize)
    return MoE(config).to(dtype="float64")


@pytest.mark.parametrize("top_k, renormalize, gated", [(2, True, True), (1, False, False),
                                                       (3, True, True)])
def test_moe_matches_a_token_by_token_reference(top_k, renormalize, gated):
    moe = make_moe(top_k, renormalize, gated)
    x = np.random.default_rng(0).standard_normal((2, 5, 4))
    y, aux = moe(Tensor(x))
    want = np.zeros_like(x)
    with tinylm.no_grad():
        for b in range(2):
            for t in range(5):
                logits = x[b, t] @ moe.router.weight.numpy().T
                p = np.exp(logits - logits.max())
                p /= p.sum()
                top = np.argsort(-p)[:top_k]
                w = p[top] / (p[top].sum() if renormalize and top_k > 1 else 1)
                for e, we in zip(top, w):
                    want[b, t] += we * moe.experts[e](Tensor(x[b, t][None])).numpy()[0]
    testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    assert aux.shape == () and np.isfinite(aux.item()) and aux.item() > 0


def test_moe_gradcheck_input():
    moe = make_moe()
    x = np.random.default_rng(1).standard_normal((2, 3, 4))

    def f(t):
        y, aux = moe(t)
        return y, aux

    testing.gradcheck(f, x)


def test_moe_parameter_gradients_match_finite_differences():
    """Router (through the gate weights and the aux loss) and expert weights."""
    moe = make_moe()
    x = Tensor(np.random.default_rng(2).standard_normal((2, 3, 4)))
    c = np.random.default_rng(3).standard_normal((2, 3, 4))

    def loss():
        y, aux = moe(x)
        return (y * c).sum() + aux * 2.5

    moe.zero_grad()
    loss().backward()
    for p in (moe.router.weight, moe.experts[0].gate.weight, moe.experts[2].down.weight):
        numeric = np.zeros(p.shape)
        flat, grad = p.data.reshape(-1), numeric.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + 1e-6
            with tinylm.no_grad():
                plus = loss().item()
            flat[i] = old - 1e-6
            with tinylm.no_grad():
                minus = loss().item()
            flat[i] = old
            grad[i] = (plus - minus) / 2e-6
        testing.assert_close(p.grad, numeric, rtol=1e-5, atol=1e-7)


def test_unused_experts_and_padding_mask():
    moe = make_moe(top_k=1)
    moe.router.weight.data[...] = 0
    moe.router.weight.data[0, 0] = 50.0  # with x[..., 0] > 0 every token picks expert 0
    x = np.abs(np.random.default_rng(4).standard_normal((1, 4, 4)))
    y, aux = moe(Tensor(x), mask=np.array([[1, 1, 1, 0]]))
    assert np.isfinite(y.numpy()).all()
    assert aux.item() == pytest.approx(3.0, rel=1e-3)  # all on one expert: E * 1 * ~1
    with pytest.raises(TinyLMError, match="top_k"):
        MoEConfig(d_model=4, d_ff=6, n_experts=2, top_k=3)
    with pytest.raises(TinyLMError, match="activation"):
        MoEConfig(d_model=4, d_ff=6, n_experts=2, activation="swish")


def test_moe_model_adds_the_weighted_aux_loss():
    config = LlamaConfig(vocab_size=40, d_model=16, n_layer=2, n_head=2, d_ff=24,
                         n_experts=4, moe_top_k=2, moe_aux_coef=0.1)
    model = build_model(config)
    ids = np.random.default_rng(0).integers(0, 40, (2, 5))
    out = model(ids, targets=ids)
    ce = tinylm.ops.cross_entropy(out.logits, ids)
    assert out.aux_loss.shape == () and out.aux_loss.item() > 0  # summed over the layers
    assert out.loss.item() == pytest.approx(ce.item() + 0.1 * out.aux_loss.item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
