"""GPT-2: a tiny transformers model (random weights, built locally) loaded by tinylm:
logits and gradients match; tinylm's export loads back into transformers; the KV
cache path equals a full recompute."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinylm  # noqa: E402
from model_helpers import (  # noqa: E402
    assert_grads_match, assert_logits_match, build_hf, kv_steps, load_in_tinylm, padded_batch,
    torch_loss,
)
from tinylm.models import Decoder, GPT2Config  # noqa: E402

VOCAB = 101


def hf_config(**kw):
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                   n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kw)


@pytest.fixture(scope="module", params=["tied", "untied"])
def pair(request, tmp_path_factory):
    kw = {"tie_word_embeddings": False} if request.param == "untied" else {}
    hf = build_hf(transformers.GPT2LMHeadModel, hf_config(**kw))
    model = load_in_tinylm(hf, tmp_path_factory.mktemp("gpt2"))
    return hf, model


def test_config_is_translated(pair):
    hf, model = pair
    c = model.config
    assert isinstance(model, Decoder) and isinstance(c, GPT2Config)
    assert (c.d_model, c.n_layer, c.n_head, c.max_positions) == (32, 2, 4, 32)
    assert c.activation == "gelu_tanh"
    assert c.tie_embeddings == hf.config.tie_word_embeddings
    assert (model.lm_head.weight is model.tok_emb.weight) == c.tie_embeddings
    assert model.num_parameters() == hf.num_parameters()


def test_logits_match_with_padding(pair):
    hf, model = pair
    ids, mask = padded_batch(VOCAB)
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    with tinylm.no_grad():
        ours = model(ids, attention_mask=mask).logits
    assert_logits_match(ours.numpy(), theirs.numpy(), mask.astype(bool))


def test_gradients_match(pair):
    hf, model = pair
    ids, mask = padded_batch(VOCAB, seed=1)
    targets = np.where(mask == 1, np.roll(ids, -1, axis=1), -100)
    hf.zero_grad()
    model.zero_grad()
    logits = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    tl = torch_loss(logits, targets)
    tl.backward()
    out = model(ids, attention_mask=mask, targets=targets)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(tl.item(), rel=1e-5)
    assert_grads_match(model, hf)


def test_round_trip_through_transformers(pair, tmp_path):
    _, model = pair
    model.save_pretrained(tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager")
    ids, mask = padded_batch(VOCAB, seed=2)
    with torch.no_grad():
        theirs = back(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    with tinylm.no_grad():
        ours = model(ids, attention_mask=mask).logits
    assert_logits_match(ours.numpy(), theirs.numpy(), mask.astype(bool))


def test_kv_cache_matches_full_recompute(pair):
    _, model = pair
    ids, mask = padded_batch(VOCAB, T=12, seed=3)
    with tinylm.no_grad():
        full = model(ids, attention_mask=mask).logits.numpy()
    valid = mask.astype(bool)
    assert_logits_match(kv_steps(model, ids, mask), full, valid, tol=1e-5)
