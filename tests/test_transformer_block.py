"""End to end: a 2-layer causal transformer trained one step in tinylm and in torch.

The same weights go into both (tests/tiny_gpt.py builds the twins); the loss, every
parameter's gradient and the parameters after one AdamW step must agree. Compared by
relative error ||a - b|| / ||b|| per parameter.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiny_gpt import TinyGPT, torch_twin  # noqa: E402  (tests/ is on sys.path)

from tinylm import backend  # noqa: E402
from tinylm.optim import AdamW  # noqa: E402

VOCAB, D, HEADS, T, B = 65, 64, 4, 16, 4
TOL = {"float32": 1e-5, "float64": 1e-10}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_pair(dtype: str, tie: bool = False):
    backend.seed(1234)
    model = TinyGPT(vocab=VOCAB, block_size=T, d=D, n_head=HEADS, n_layer=2, tie=tie)
    if dtype == "float64":
        model.to(dtype="float64")
    twin = torch_twin(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(B, T))
    targets = rng.integers(0, VOCAB, size=(B, T))
    return model, twin, ids, targets


def train_step(model, twin, ids, targets):
    _, loss = model(ids, targets)
    loss.backward()
    _, tloss = twin(torch.from_numpy(ids), torch.from_numpy(targets))
    tloss.backward()
    return loss, tloss


def check_grads(model, twin, tol):
    theirs = dict(twin.named_parameters())
    errors = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.dtype == p.dtype, f"{name}: gradient is {p.grad.dtype}, parameter {p.dtype}"
        errors[name] = rel_err(p.grad, theirs[name].grad.numpy())
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"gradients differ from torch (relative error > {tol}): {bad}"
    return errors


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_loss_and_gradients_match_torch(dtype):
    model, twin, ids, targets = make_pair(dtype)
    loss, tloss = train_step(model, twin, ids, targets)
    assert loss.dtype == np.dtype(dtype)
    assert rel_err(loss.data, tloss.item()) < TOL[dtype]
    errors = check_grads(model, twin, TOL[dtype])
    assert len(errors) == 2 + 2 * 12 + 2 + 1  # wte, wpe, 2 blocks, ln_f, lm_head


def test_tied_embedding_gradient_accumulates_like_torch():
    # lm_head shares wte's weight: its gradient is the sum of the scatter-add from the
    # embedding and the linear layer's weight gradient.
    model, twin, ids, targets = make_pair("float64", tie=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    train_step(model, twin, ids, targets)
    check_grads(model, twin, TOL["float64"])


def test_logits_match_torch_without_grad():
    from tinylm.autograd import no_grad

    model, twin, ids, _ = make_pair("float32")
    with no_grad():
        logits = model(ids)
    assert not logits.requires_grad and logits.creator is None
    with torch.no_grad():
        tlogits = twin(torch.from_numpy(ids))
    assert rel_err(logits.data, tlogits.numpy()) < TOL["float32"]


def check_params(model, twin, tol):
    theirs = dict(twin.named_parameters())
    errors = {n: rel_err(p.data, theirs[n].detach().numpy()) for n, p in model.named_parameters()}
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"parameters differ from torch after AdamW: {bad}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adamw_steps_match_torch(dtype):
    # Both optimizers get the same gradients (ours), so the update rule is compared on
    # its own: the key bias's true gradient is zero (softmax ignores a per-row shift),
    # so each side's float32 rounding noise there would be amplified by Adam's
    # normalisation into different, equally right, steps.
    model, twin, ids, targets = make_pair(dtype)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    topt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    theirs = dict(twin.named_parameters())
    for _ in range(3):  # several steps: the bias corrections and moments matter
        opt.zero_grad()
        topt.zero_grad()
        loss, tloss = train_step(model, twin, ids, targets)
        assert rel_err(loss.data, tloss.item()) < TOL[dtype]
        check_grads(model, twin, TOL[dtype])
        for name, p in model.named_parameters():
            theirs[name].grad = torch.from_numpy(np.array(p.grad))
        opt.step()
        topt.step()
        check_params(model, twin, TOL[dtype])
    for name, p in model.named_parameters():
        assert p.data.dtype == np.dtype(dtype), name


def test_three_training_steps_match_torch_float64():
    # Fully independent: each side uses its own gradients and its own AdamW.
    model, twin, ids, targets = make_pair("float64")
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    topt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        topt.zero_grad()
        loss, tloss = train_step(model, twin, ids, targets)
        assert rel_err(loss.data, tloss.item()) < TOL["float64"]
        losses.append(loss.item())
        opt.step()
        topt.step()
    check_params(model, twin, TOL["float64"])
    assert losses[-1] < losses[0]  # it learns


@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_matches_composed_path(causal):
    # A mask tensor that requires grad takes the composed path (matmul, masked_fill,
    # softmax); a constant mask the fused Attention node. Same values, same gradients.
    import tinylm.ops as F
    from tinylm.tensor import Tensor

    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((2, 4, 5, 3)) for _ in range(3)]
    bias = rng.standard_normal((5, 5))
    grad = rng.standard_normal((2, 4, 5, 3))
    results = []
    for learned in (False, True):
        q, k, v = (Tensor(a, requires_grad=True) for a in arrays)
        mask = Tensor(bias, requires_grad=learned)
        y = F.scaled_dot_product_attention(q, k, v, mask=mask, is_causal=causal)
        assert (type(y.creator).__name__ == "Attention") != learned
        y.backward(grad)
        results.append([y.data, q.grad, k.grad, v.grad])
    for fused, composed in zip(*results):
        assert rel_err(fused, composed) < 1e-12
