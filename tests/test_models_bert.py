"""BERT (masked-LM, sequence classification, bare encoder): a tiny transformers model
(random weights, built locally) loaded by tinylm: logits and hidden states match,
gradients match, and tinylm's export loads back into transformers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinylm  # noqa: E402
from model_helpers import (  # noqa: E402
    EPS, TOL, WIDE_INIT, assert_grads_match, assert_logits_match, build_hf, load_in_float64,
    padded_batch, torch_loss,
)
from tinylm.models import BertConfig, Encoder  # noqa: E402

VOCAB = 97
HEADS = {"mlm": "BertForMaskedLM", "classification": "BertForSequenceClassification",
         "none": "BertModel"}


def inputs(seed=0):
    ids, mask = padded_batch(VOCAB, seed=seed)
    types = np.random.default_rng(seed).integers(0, 2, ids.shape)
    return ids, mask, types


def run_hf(hf, ids, mask, types):
    return hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              token_type_ids=torch.from_numpy(types), output_hidden_states=True)


@pytest.fixture(scope="module", params=sorted(HEADS))
def pair(request, tmp_path_factory):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=WIDE_INIT, layer_norm_eps=EPS)
    hf = build_hf(getattr(transformers, HEADS[request.param]), config)
    return request.param, hf, load_in_float64(hf, tmp_path_factory.mktemp("bert"))


def test_config_is_translated(pair):
    head, hf, model = pair
    assert isinstance(model, Encoder) and isinstance(model.config, BertConfig)
    c = model.config
    assert (c.head, c.norm_position, c.activation, c.norm_eps) == (head, "post", "gelu", EPS)
    assert model.num_parameters() == hf.num_parameters()


def test_logits_and_hidden_states_match_with_padding(pair):
    head, hf, model = pair
    ids, mask, types = inputs()
    with torch.no_grad():
        theirs = run_hf(hf, ids, mask, types)
    with tinylm.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=types)
    valid = mask.astype(bool)
    assert_logits_match(ours.hidden_states.numpy(), theirs.hidden_states[-1].numpy(), valid)
    if head == "mlm":
        assert_logits_match(ours.logits.numpy(), theirs.logits.numpy(), valid)
    elif head == "classification":
        assert_logits_match(ours.logits.numpy(), theirs.logits.numpy())
    else:
        assert_logits_match(ours.pooled.numpy(), theirs.pooler_output.numpy())


def test_gradients_match(pair):
    head, hf, model = pair
    ids, mask, types = inputs(seed=1)
    hf.zero_grad()
    model.zero_grad()
    out_hf = run_hf(hf, ids, mask, types)
    if head == "mlm":
        targets = np.where((mask == 1) & (np.arange(ids.shape[1]) % 3 == 0), ids, -100)
        tl = torch_loss(out_hf.logits, targets)
        out = model(ids, attention_mask=mask, token_type_ids=types, targets=targets)
        loss = out.loss
    elif head == "classification":
        targets = np.array([0, 2, 1])
        tl = torch_loss(out_hf.logits, targets)
        loss = model(ids, attention_mask=mask, token_type_ids=types, targets=targets).loss
    else:  # a loss on the hidden states and the pooled vector
        c = np.random.default_rng(2).standard_normal((3, 9, 32))
        tl = (out_hf.last_hidden_state * torch.from_numpy(c)).sum() + out_hf.pooler_output.sum()
        out = model(ids, attention_mask=mask, token_type_ids=types)
        loss = (out.hidden_states * c).sum() + out.pooled.sum()
    tl.backward()
    loss.backward()
    assert loss.item() == pytest.approx(tl.item(), rel=TOL)
    assert_grads_match(model, hf)


def test_round_trip_through_transformers(pair, tmp_path):
    head, hf, model = pair
    model.save_pretrained(tmp_path)
    back = getattr(transformers, HEADS[head]).from_pretrained(tmp_path, attn_implementation="eager")
    ids, mask, types = inputs(seed=3)
    with tinylm.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=types)
    valid = mask.astype(bool)
    for reference in (back.double().eval(), hf):  # so back is the model we started from
        with torch.no_grad():
            theirs = run_hf(reference, ids, mask, types)
        assert_logits_match(ours.hidden_states.numpy(), theirs.hidden_states[-1].numpy(), valid)
        if head != "none":
            assert_logits_match(ours.logits.numpy(), theirs.logits.numpy(),
                                valid if head == "mlm" else None)


# --------------------------------------------------------------------------- no pooler


def small_config():
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=WIDE_INIT, layer_norm_eps=EPS)


def test_a_bert_saved_without_its_pooler_loads_without_one(tmp_path):
    """BertModel(add_pooling_layer=False): no pooler tensors in the file, so none in
    the model (pooled is None); the hidden states match, and the export round-trips."""
    config = small_config()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    model = load_in_float64(hf, tmp_path)
    assert model.config.head == "none" and not model.config.pooler and model.pooler is None
    assert model.num_parameters() == hf.num_parameters()
    assert tinylm.models.hf.read_hf_config(tmp_path / "hf").pooler is False  # tinylm info too
    ids, mask, types = inputs()
    with torch.no_grad():
        theirs = run_hf(hf, ids, mask, types)
    with tinylm.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=types)
    assert ours.pooled is None
    valid = mask.astype(bool)
    assert_logits_match(ours.hidden_states.numpy(), theirs.last_hidden_state.numpy(), valid)
    model.save_pretrained(tmp_path / "out")
    again = tinylm.load_pretrained(tmp_path / "out")
    assert again.pooler is None
    back = transformers.BertModel.from_pretrained(tmp_path / "out", add_pooling_layer=False,
                                                  attn_implementation="eager").double().eval()
    with torch.no_grad():
        theirs = run_hf(back, ids, mask, types)
    assert_logits_match(ours.hidden_states.numpy(), theirs.last_hidden_state.numpy(), valid)


def test_an_mlm_checkpoint_without_architectures_loads_its_head(tmp_path):
    """transformers' BertForMaskedLM (no pooler) saved with save_pretrained, its
    config.json without "architectures" (as many fine-tuned checkpoints): the head
    comes from the tensors; logits match."""
    import json

    hf = build_hf(transformers.BertForMaskedLM, small_config())
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))
    model = tinylm.load_pretrained(path).to(dtype="float64")
    hf.double()
    assert model.config.head == "mlm" and model.pooler is None
    ids, mask, types = inputs(seed=4)
    with torch.no_grad():
        theirs = run_hf(hf, ids, mask, types)
    with tinylm.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=types)
    assert_logits_match(ours.logits.numpy(), theirs.logits.numpy(), mask.astype(bool))
