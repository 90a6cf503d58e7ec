"""GPT-2: a tiny transformers model (random weights, built locally) loaded by tinylm:
logits and gradients match; tinylm's export loads back into transformers; the KV
cache path equals a full recompute."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_helpers import (  # noqa: E402
    EPS, WIDE_INIT, assert_kv_cache_matches_full, assert_loss_and_grads_match,
    assert_matches_hf, build_hf, load_in_float64,
)
from tinylm.models import Decoder, GPT2Config  # noqa: E402

VOCAB = 101


def hf_config(**kw):
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                   n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                   initializer_range=WIDE_INIT, layer_norm_epsilon=EPS, **kw)


@pytest.fixture(scope="module", params=["tied", "untied"])
def pair(request, tmp_path_factory):
    kw = {"tie_word_embeddings": False} if request.param == "untied" else {}
    hf = build_hf(transformers.GPT2LMHeadModel, hf_config(**kw))
    model = load_in_float64(hf, tmp_path_factory.mktemp("gpt2"))
    return hf, model


def test_config_is_translated(pair):
    hf, model = pair
    c = model.config
    assert isinstance(model, Decoder) and isinstance(c, GPT2Config)
    assert (c.d_model, c.n_layer, c.n_head, c.max_positions) == (32, 2, 4, 32)
    assert c.activation == "gelu_tanh" and c.norm_eps == EPS
    assert c.tie_embeddings == hf.config.tie_word_embeddings
    assert (model.lm_head.weight is model.tok_emb.weight) == c.tie_embeddings
    assert model.num_parameters() == hf.num_parameters()


def test_logits_match_with_padding(pair):
    hf, model = pair
    assert_matches_hf(model, hf, VOCAB)


def test_gradients_match(pair):
    hf, model = pair
    assert_loss_and_grads_match(model, hf, VOCAB)


def test_round_trip_through_transformers(pair, tmp_path):
    hf, model = pair
    model.save_pretrained(tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert_matches_hf(model, back.double(), VOCAB, seed=2)
    assert_matches_hf(model, hf, VOCAB, seed=2)  # so back is the model we started from


def test_kv_cache_matches_full_recompute(pair):
    hf, model = pair
    assert_kv_cache_matches_full(model, VOCAB, hf_model=hf)
