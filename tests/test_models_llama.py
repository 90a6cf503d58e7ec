"""Llama (GQA and MQA, RoPE base, llama3 and linear RoPE scaling, tied or not): a tiny
transformers model (random weights, built locally) loaded by tinylm: logits and gradients
match; tinylm's export loads back into transformers, rope scaling included; the KV cache
path equals a full recompute."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinylm  # noqa: E402
from model_helpers import (  # noqa: E402
    EPS, SELF_TOL, WIDE_INIT, assert_kv_cache_matches_full, assert_logits_match,
    assert_loss_and_grads_match, assert_matches_hf, build_hf, load_in_float64, tol_for,
)
from tinylm.models import Decoder, LlamaConfig  # noqa: E402
from tinylm.positional import RoPE  # noqa: E402

VOCAB = 103
# Llama 3.1's rope scaling with a tiny original context (head_dim 16: wavelengths 6.3,
# 20, 63, ...), so one frequency stays, one is blended and the rest are divided.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
SCALED = dict(hidden_size=64, num_key_value_heads=2, max_position_embeddings=256)
VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied-theta": dict(num_key_value_heads=1, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "rope-llama3": dict(SCALED, rope_parameters={**LLAMA3, "rope_theta": 10000.0}),
    "rope-linear": dict(SCALED, rope_scaling={"rope_type": "linear", "factor": 4.0},
                        rope_theta=500000.0),  # the pre-v5 spelling of the config
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    config = transformers.LlamaConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 72,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
        "bos_token_id": 0, "eos_token_id": 0, "initializer_range": WIDE_INIT,
        "rms_norm_eps": EPS, **VARIANTS[request.param]})
    # sdpa: transformers' eager Llama attention takes its softmax in float32, where a
    # float64 model's finfo.min mask turns -inf and a left-padded row gives NaN
    hf = build_hf(transformers.LlamaForCausalLM, config, attn_implementation="sdpa")
    return hf, load_in_float64(hf, tmp_path_factory.mktemp("llama"))


def hf_rope_scaling(hf_config):
    """The rope_parameters entries other than theta (empty for plain RoPE)."""
    rope = hf_config.rope_parameters
    return {} if rope["rope_type"] == "default" else {
        k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}


def test_config_is_translated(pair):
    hf, model = pair
    c = model.config
    d, hs = hf.config.hidden_size, c.head_size
    assert isinstance(model, Decoder) and isinstance(c, LlamaConfig)
    assert c.kv_heads == hf.config.num_key_value_heads and c.positional == "rope"
    assert c.positional_options.get("base", 10000.0) == hf.config.rope_parameters["rope_theta"]
    scaling = dict(c.positional_options.get("scaling", {}))
    scaling = {"rope_type": scaling.pop("type"), **scaling} if scaling else {}
    assert scaling == hf_rope_scaling(hf.config)
    assert model.transformer.blocks[0].attn.qkv.weight.shape == (d + 2 * hs * c.kv_heads, d)
    assert c.norm_eps == EPS and c.activation == "silu"
    assert model.num_parameters() == hf.num_parameters()


def test_rope_frequencies_are_transformers(pair):
    """The scaled (or plain) inverse frequencies are those of transformers' rotary_emb,
    and with scaling they differ from plain RoPE's; a sequence well past the original
    context (32 for llama3) still gives transformers' logits."""
    hf, model = pair
    ours = model.transformer.pos.inv_freq.astype(np.float64)
    theirs = hf.model.rotary_emb.inv_freq.numpy().astype(np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=5e-7, atol=0)  # float32 pow: <= 1-2 ulp
    assert hf.model.rotary_emb.attention_scaling == 1.0
    plain = RoPE(model.config.head_size,
                 base=model.config.positional_options.get("base", 10000.0))
    assert np.array_equal(plain.inv_freq, model.transformer.pos.inv_freq) == (
        not hf_rope_scaling(hf.config))
    ids = np.random.default_rng(5).integers(1, VOCAB, (2, 60))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    with tinylm.no_grad():
        got = model(ids).logits.numpy()
    assert_logits_match(got, want, tol=tol_for(hf))


def test_logits_match_with_padding(pair):
    hf, model = pair
    assert_matches_hf(model, hf, VOCAB)


def test_gradients_match(pair):
    hf, model = pair
    assert_loss_and_grads_match(model, hf, VOCAB)


def test_round_trip_through_transformers(pair, tmp_path):
    hf, model = pair
    model.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert back.config.num_key_value_heads == model.config.kv_heads
    assert hf_rope_scaling(back.config) == hf_rope_scaling(hf.config)
    assert_matches_hf(model, back.double(), VOCAB, seed=2)
    assert_matches_hf(model, hf, VOCAB, seed=2)  # so back is the model we started from


def test_kv_cache_matches_full_recompute(pair):
    hf, model = pair
    assert_kv_cache_matches_full(model, VOCAB, hf_model=hf)


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
    assert_logits_match(shifted[:, 3:], alone, tol=SELF_TOL)
