"""Shared by the test_models_*.py files: tiny Hugging Face models built locally from
configs (random weights, nothing downloaded), padded batches, and the comparisons.

"Relative error" is max |ours - theirs| / max |theirs| over the compared array (one
parameter's gradient, the logits of the real tokens): elementwise relative error is
meaningless where a value is ~0.

The parity tests run where a mix-up shows: weights drawn wide (initializer_range 0.2
instead of 0.02, so the activations' inputs are O(1), where GELU and its tanh
approximation differ by ~1e-3), norm epsilons far from every family's default, both
sides in float64 (``load_in_float64``), and TOL = 1e-6 relative: what is left is
float32 RoPE angles (both compute them so) and float64 rounding. An exact GELU for
GPT-2's gelu_new, or a norm eps read from the wrong key, fails by orders of magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

import tinylm
from tinylm.models.hf import hf_state_dict

TOL = 1e-6  # relative, both sides in float64
# transformers' Llama and T5 take their RMSNorm statistics in float32 even in a float64
# model (and Llama's eager attention its softmax): they agree to a few 1e-7, not 1e-15
FLOAT32_INSIDE = {"llama": 3e-6, "t5": 3e-6}
SELF_TOL = 1e-10  # tinylm against itself (a KV cache against a full recompute), float64
WIDE_INIT = 0.2  # initializer_range for the parity models (transformers' default: 0.02)
EPS = 1e-3  # the parity models' norm epsilon: no family's default


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def randomize(hf_model, seed: int = 0):
    """Norm weights and biases start at 1 and 0: shake them so a mix-up would show."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            lowered = name.lower()
            if "norm" in lowered or "ln_" in lowered or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return hf_model.eval()


def build_hf(model_class, config, attn_implementation="eager"):
    """A randomly initialised ``transformers`` model with eager attention (the reference)."""
    import torch

    torch.manual_seed(0)
    return randomize(model_class._from_config(config, attn_implementation=attn_implementation))


def tol_for(hf_model) -> float:
    """TOL, or what transformers' own float32 steps leave (FLOAT32_INSIDE)."""
    return FLOAT32_INSIDE.get(getattr(hf_model.config, "model_type", ""), TOL)


def padded_batch(vocab: int, B: int = 3, T: int = 9, seed: int = 0):
    """ids (B, T) and an attention mask: row 0 full, row 1 right-padded, row 2 left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, T - 3:] = 0
    if B > 2:
        mask[2, :2] = 0
    return ids, mask


def load_in_tinylm(hf_model, tmp_path, **save_kwargs):
    path = tmp_path / "hf"
    hf_model.save_pretrained(path, **save_kwargs)
    return tinylm.load_pretrained(path)


def load_in_float64(hf_model, tmp_path, **save_kwargs):
    """The float32 checkpoint loaded by tinylm, then both models made float64 (exact:
    the same weights on both sides) so the comparisons can be tight."""
    model = load_in_tinylm(hf_model, tmp_path, **save_kwargs)
    hf_model.double()
    return model.to(dtype="float64")


def assert_logits_match(ours, theirs, valid=None, tol=TOL):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if valid is not None:
        ours, theirs = ours[valid], theirs[valid]
    err = rel_err(ours, theirs)
    assert err < tol, f"relative error {err:.2e} >= {tol}"
    return err


def assert_grads_match(model, hf_model, tol=None):
    """Every parameter's gradient, mapped to Hugging Face names, against torch's."""
    tol = tol_for(hf_model) if tol is None else tol
    ours = hf_state_dict(model, grads=True)
    theirs = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    floor = 1e-3 * max(np.abs(g).max() for g in theirs.values())  # for gradients that are ~0
    worst = 0.0
    for name, g in theirs.items():
        err = np.abs(ours[name] - g).max() / max(np.abs(g).max(), floor)
        assert err < tol, f"{name}: gradient relative error {err:.2e}"
        worst = max(worst, err)
    return worst


def torch_loss(logits, targets):
    import torch

    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1),
        ignore_index=-100)


def kv_steps(model, ids, mask, prefix: int = 4, **kwargs):
    """Logits from a prefix then one token at a time through a KV cache."""
    cache = tinylm.nn.KVCache()
    with tinylm.no_grad():
        steps = [model(ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache,
                       **kwargs).logits.numpy()]
        for t in range(prefix, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                               **kwargs).logits.numpy())
    return np.concatenate(steps, axis=1)


def assert_matches_hf(model, hf_model, vocab: int, seed: int = 0):
    """Logits on a padded batch: ours against ``hf_model``'s, over the real tokens."""
    import torch

    ids, mask = padded_batch(vocab, seed=seed)
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.from_numpy(ids),
                          attention_mask=torch.from_numpy(mask)).logits
    with tinylm.no_grad():
        ours = model(ids, attention_mask=mask).logits
    return assert_logits_match(ours.numpy(), theirs.numpy(), mask.astype(bool),
                               tol=tol_for(hf_model))


def assert_loss_and_grads_match(model, hf_model, vocab: int, seed: int = 1):
    """Next-token loss on a padded batch and every parameter's gradient, ours against torch's."""
    import torch

    ids, mask = padded_batch(vocab, seed=seed)
    targets = np.where(mask == 1, np.roll(ids, -1, axis=1), -100)
    hf_model.zero_grad()
    model.zero_grad()
    logits = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    tl = torch_loss(logits, targets)
    tl.backward()
    out = model(ids, attention_mask=mask, targets=targets)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(tl.item(), rel=tol_for(hf_model))
    return assert_grads_match(model, hf_model)


def assert_kv_cache_matches_full(model, vocab: int, seed: int = 3, hf_model=None):
    """Prefix-then-one-token-at-a-time through a KV cache equals a full recompute (and,
    given ``hf_model``, transformers' full forward)."""
    import torch

    ids, mask = padded_batch(vocab, T=12, seed=seed)
    with tinylm.no_grad():
        full = model(ids, attention_mask=mask).logits.numpy()
    steps = kv_steps(model, ids, mask)
    valid = mask.astype(bool)
    if hf_model is not None:
        with torch.no_grad():
            theirs = hf_model(input_ids=torch.from_numpy(ids),
                              attention_mask=torch.from_numpy(mask)).logits.numpy()
        assert_logits_match(steps, theirs, valid, tol=tol_for(hf_model))
    return assert_logits_match(steps, full, valid, tol=SELF_TOL)
