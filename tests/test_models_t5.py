"""T5 (v1.0: ReLU, tied and scaled; v1.1: gated-GELU, untied): a tiny transformers
model (random weights, built locally) loaded by tinylm: logits and gradients match;
tinylm's export loads back into transformers; the decoder's KV cache path equals a
full recompute."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinylm  # noqa: E402
from model_helpers import (  # noqa: E402
    EPS, SELF_TOL, assert_grads_match, assert_logits_match, build_hf, load_in_float64,
    padded_batch, tol_for, torch_loss,
)
from tinylm.models import EncoderDecoder, T5Config  # noqa: E402
from tinylm.models.encoder_decoder import shift_right  # noqa: E402

VOCAB = 99
VARIANTS = {
    "v1.0": dict(feed_forward_proj="relu"),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    # T5's init is already wide: 1/sqrt(fan-in) per matrix (initializer_factor 1), so
    # the feed-forward's inputs are O(1) (a wider one only amplifies transformers'
    # float32 RMSNorm statistics, see model_helpers.FLOAT32_INSIDE)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
                                   initializer_factor=1.0, layer_norm_epsilon=EPS,
                                   **VARIANTS[request.param])
    hf = build_hf(transformers.T5ForConditionalGeneration, config)
    return hf, load_in_float64(hf, tmp_path_factory.mktemp("t5"))


def batch(seed=0):
    ids, mask = padded_batch(VOCAB, seed=seed)
    dec, dec_mask = padded_batch(VOCAB, T=6, seed=seed + 10)
    dec_mask[2] = 1  # decoder rows: full, right-padded, full
    return ids, mask, dec, dec_mask


def run_hf(hf, ids, mask, dec, dec_mask):
    return hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              decoder_input_ids=torch.from_numpy(dec),
              decoder_attention_mask=torch.from_numpy(dec_mask))


def test_config_is_translated(pair):
    hf, model = pair
    c = model.config
    assert isinstance(model, EncoderDecoder) and isinstance(c, T5Config)
    assert (c.attn_scale, c.norm, c.bias, c.positional) == (1.0, "rmsnorm", False, "t5")
    assert c.norm_eps == EPS and c.activation == ("gelu_tanh" if c.gated_mlp else "relu")
    assert c.gated_mlp == hf.config.is_gated_act
    assert c.decoder_layers == hf.config.num_decoder_layers
    assert c.scale_decoder_output == hf.config.scale_decoder_outputs
    assert model.num_parameters() == hf.num_parameters()


def test_logits_match_with_padding(pair):
    hf, model = pair
    ids, mask, dec, dec_mask = batch()
    with torch.no_grad():
        theirs = run_hf(hf, ids, mask, dec, dec_mask)
    with tinylm.no_grad():
        ours = model(ids, decoder_ids=dec, attention_mask=mask, decoder_attention_mask=dec_mask)
    valid, tol = dec_mask.astype(bool), tol_for(hf)
    assert_logits_match(ours.logits.numpy(), theirs.logits.numpy(), valid, tol=tol)
    assert_logits_match(ours.encoder_hidden_states.numpy(),
                        theirs.encoder_last_hidden_state.numpy(), mask.astype(bool), tol=tol)


def test_gradients_match(pair):
    hf, model = pair
    ids, mask, dec, dec_mask = batch(seed=1)
    targets = np.where(dec_mask == 1, np.roll(dec, -1, axis=1), -100)
    hf.zero_grad()
    model.zero_grad()
    tl = torch_loss(run_hf(hf, ids, mask, dec, dec_mask).logits, targets)
    tl.backward()
    out = model(ids, decoder_ids=dec, attention_mask=mask, decoder_attention_mask=dec_mask,
                targets=targets)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(tl.item(), rel=tol_for(hf))
    assert_grads_match(model, hf)


def test_labels_are_shifted_right_as_transformers_does(pair):
    hf, model = pair
    ids, mask, _, _ = batch(seed=2)
    labels = np.random.default_rng(0).integers(1, VOCAB, (3, 5))
    labels[1, 3:] = -100
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    labels=torch.from_numpy(labels))
    with tinylm.no_grad():
        ours = model(ids, attention_mask=mask, targets=labels)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=tol_for(hf))
    assert shift_right(labels, 0, 0)[1].tolist() == [0, *labels[1, :3], 0]  # -100 -> pad


def test_round_trip_through_transformers(pair, tmp_path):
    hf, model = pair
    model.save_pretrained(tmp_path)
    back = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager").double().eval()
    ids, mask, dec, dec_mask = batch(seed=3)
    with tinylm.no_grad():
        ours = model(ids, decoder_ids=dec, attention_mask=mask, decoder_attention_mask=dec_mask)
    for reference in (back, hf):  # so back is the model we started from
        with torch.no_grad():
            theirs = run_hf(reference, ids, mask, dec, dec_mask)
        assert_logits_match(ours.logits.numpy(), theirs.logits.numpy(), dec_mask.astype(bool),
                            tol=tol_for(hf))


def test_kv_cache_matches_full_recompute(pair):
    hf, model = pair
    ids, mask, dec, _ = batch(seed=4)
    with tinylm.no_grad():
        full = model(ids, decoder_ids=dec, attention_mask=mask).logits.numpy()
        memory, _ = model.encode(ids, mask)
        cache = tinylm.nn.KVCache()
        steps = [model(decoder_ids=dec[:, t:t + 1], memory=memory, attention_mask=mask,
                       cache=cache).logits.numpy() for t in range(dec.shape[1])]
    with torch.no_grad():
        theirs = run_hf(hf, ids, mask, dec, np.ones_like(dec)).logits.numpy()
    steps = np.concatenate(steps, axis=1)
    assert_logits_match(steps, theirs, tol=tol_for(hf))
    assert_logits_match(steps, full, tol=SELF_TOL)
