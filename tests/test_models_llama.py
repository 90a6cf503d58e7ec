"""Llama (GQA and MQA, RoPE base, tied or not): a tiny transformers model (random
weights, built locally) loaded by tinylm: logits and gradients match; tinylm's export
loads back into transformers; the KV cache path equals a full recompute."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinylm  # noqa: E402
from model_helpers import (  # noqa: E402
    assert_kv_cache_matches_full, assert_logits_match, assert_loss_and_grads_match,
    assert_matches_hf, build_hf, load_in_tinylm,
)
from tinylm.models import Decoder, LlamaConfig  # noqa: E402

VOCAB = 103
VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied-theta": dict(num_key_value_heads=1, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        **VARIANTS[request.param])
    hf = build_hf(transformers.LlamaForCausalLM, config)
    return hf, load_in_tinylm(hf, tmp_path_factory.mktemp("llama"))


def test_config_is_translated(pair):
    hf, model = pair
    c = model.config
    assert isinstance(model, Decoder) and isinstance(c, LlamaConfig)
    assert c.kv_heads == hf.config.num_key_value_heads and c.positional == "rope"
    assert c.positional_options.get("base", 10000.0) == hf.config.rope_parameters["rope_theta"]
    assert model.transformer.blocks[0].attn.qkv.weight.shape == (32 + 2 * 8 * c.kv_heads, 32)
    assert model.num_parameters() == hf.num_parameters()


def test_logits_match_with_padding(pair):
    hf, model = pair
    assert_matches_hf(model, hf, VOCAB)


def test_gradients_match(pair):
    hf, model = pair
    assert_loss_and_grads_match(model, hf, VOCAB)


def test_round_trip_through_transformers(pair, tmp_path):
    _, model = pair
    model.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert back.config.num_key_value_heads == model.config.kv_heads
    assert_matches_hf(model, back, VOCAB, seed=2)


def test_kv_cache_matches_full_recompute(pair):
    _, model = pair
    assert_kv_cache_matches_full(model, VOCAB)


def test_left_padded_positions_give_the_unpadded_logits(pair):
    """With position ids that skip the padding, a left-padded row equals the row alone."""
    _, model = pair
    ids = np.random.default_rng(4).integers(1, VOCAB, (1, 6))
    padded = np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1)
    mask = np.array([[0, 0, 0] + [1] * 6])
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with tinylm.no_grad():
        alone = model(ids).logits.numpy()
        shifted = model(padded, attention_mask=mask, positions=positions).logits.numpy()
    assert_logits_match(shifted[:, 3:], alone, tol=1e-5)
