"""Objectives: batches against their definitions (BERT's 80/10/10, T5's span
corruption, the prefix-LM mask), the plugin registry, and family mismatches."""

import numpy as np
import pytest

import tinylm
from tinylm import plugins
from tinylm.models import BertConfig, GPT2Config, LlamaConfig, T5Config, build_model
from tinylm.nn import additive_mask
from tinylm.objectives import (
    EOT, IGNORE, CausalLM, MaskedLM, ObjectiveError, PrefixLM, SpanCorruption, model_kind,
    prefix_lm_mask, random_spans_noise_mask, span_counts,
)
from tinylm.tokenizers import CharTokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMN"  # 50 ordinary tokens


def tokenizer_for(cls, block_size=64, **options):
    return CharTokenizer.train(LETTERS, special_tokens=cls.special_tokens(block_size, **options))


def test_builtin_objectives_are_registered_through_the_hook():
    found = plugins.registry("objectives")
    assert {"causal-lm", "prefix-lm", "masked-lm", "span-corruption"} <= set(found)
    owners = plugins.registered_by("objectives")
    assert owners["masked-lm"] == "tinylm.default_plugins.objectives"
    assert plugins.get_objective("span-corruption") is SpanCorruption
    with pytest.raises(tinylm.TinyLMError, match="Did you mean 'masked-lm'"):
        plugins.get_objective("masked-ln")


def test_causal_lm_shifts_by_one():
    w = np.arange(12).reshape(2, 6)
    batch = CausalLM(tokenizer_for(CausalLM)).make_batch(w, np.random.default_rng(0))
    assert batch["ids"].tolist() == [[0, 1, 2, 3, 4], [6, 7, 8, 9, 10]]
    assert batch["targets"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]]


# --------------------------------------------------------------------------- masked LM


def test_masked_lm_statistics_match_bert():
    tok = tokenizer_for(MaskedLM)
    obj = MaskedLM(tok)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, len(LETTERS), size=(400, 128))  # ordinary tokens only
    batch = obj.make_batch(windows, rng)
    chosen = batch["targets"] != IGNORE
    n = chosen.sum()
    assert abs(n / windows.size - 0.15) < 0.005  # 15% chosen (51,200 tokens)
    assert np.array_equal(batch["targets"][chosen], windows[chosen])  # targets: the originals
    assert np.array_equal(batch["ids"][~chosen], windows[~chosen])  # the rest untouched
    ids = batch["ids"][chosen]
    masked = ids == obj.mask_id
    kept = ids == windows[chosen]
    replaced = ~masked & ~kept
    V = len(LETTERS)
    # 80% [MASK]; 10% random (a random token equals the original 1/V of the time); 10% kept
    assert abs(masked.mean() - 0.8) < 0.015
    assert abs(kept.mean() - (0.1 + 0.1 / V)) < 0.01
    assert abs(replaced.mean() - 0.1 * (1 - 1 / V)) < 0.01
    assert set(np.unique(ids[replaced])) <= set(range(V))  # random tokens are ordinary ones


def test_masked_lm_never_masks_special_tokens_and_every_row_predicts():
    tok = tokenizer_for(MaskedLM)
    obj = MaskedLM(tok, mask_prob=0.02)
    eot = tok.token_to_id(EOT)
    rng = np.random.default_rng(1)
    windows = rng.integers(0, len(LETTERS), size=(200, 16))
    windows[:, ::2] = eot
    batch = obj.make_batch(windows, rng)
    assert (batch["targets"][:, ::2] == IGNORE).all()
    assert ((batch["targets"] != IGNORE).sum(axis=1) >= 1).all()


def test_masked_lm_options_and_tokenizer_are_checked():
    with pytest.raises(ObjectiveError, match=r"needs the special token '\[MASK\]'"):
        MaskedLM(CharTokenizer.train("abc", special_tokens=[EOT]))
    with pytest.raises(ObjectiveError, match="has no option"):
        MaskedLM(tokenizer_for(MaskedLM), mask_rate=0.2)
    with pytest.raises(ObjectiveError, match="mask_prob"):
        MaskedLM(tokenizer_for(MaskedLM), mask_prob=1.5)


# --------------------------------------------------------------------------- span corruption


def test_noise_mask_follows_t5():
    # T5's compute_input_and_target_lengths(512, 0.15, 3): 568 raw tokens -> 512 inputs,
    # 114 targets (85 noise tokens in 28 spans)
    obj = SpanCorruption(None)
    assert obj.window_length(512) == 568 and obj.lengths(568) == (512, 114)
    assert span_counts(568, 0.15, 3.0) == (85, 28)
    rng = np.random.default_rng(0)
    L = 114
    n_noise, n_spans = span_counts(L, 0.15, 3.0)
    assert (n_noise, n_spans) == (17, 6)
    lengths = []
    for _ in range(300):
        mask = random_spans_noise_mask(L, 0.15, 3.0, rng)
        assert mask.shape == (L,) and mask.sum() == n_noise
        assert not mask[0]  # T5 starts with a non-noise span
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        spans = edges[1::2] - edges[0::2]
        assert len(spans) == n_spans and (spans >= 1).all()
        lengths += spans.tolist()
    assert abs(np.mean(lengths) - 3.0) < 0.2  # mean span length 17 / 6 ~ 2.83
    assert len(set(lengths)) > 3  # lengths vary (random segmentation)


def test_span_corruption_round_trips_and_uses_sentinels_in_order():
    tok = tokenizer_for(SpanCorruption, 64)
    obj = SpanCorruption(tok)
    L = obj.window_length(64)
    in_len, out_len = obj.lengths(L)
    assert in_len <= 64 and obj.lengths(L + 1)[0] > 64  # the longest window that fits
    rng = np.random.default_rng(0)
    windows = rng.integers(0, len(LETTERS), size=(50, L))
    batch = obj.make_batch(windows, rng)
    assert batch["ids"].shape == (50, in_len) and batch["targets"].shape == (50, out_len)
    sentinel_ids = {tok.token_to_id(obj.sentinel(i)): i for i in range(20)
                    if tok.token_to_id(obj.sentinel(i)) is not None}
    for row, inputs, targets in zip(windows, batch["ids"], batch["targets"]):
        assert inputs[-1] == obj.eos_id and targets[-1] == obj.eos_id
        in_sent = [sentinel_ids[i] for i in inputs if i in sentinel_ids]
        out_sent = [sentinel_ids[i] for i in targets if i in sentinel_ids]
        assert in_sent == out_sent == list(range(len(in_sent)))  # <extra_id_0>, _1, ... in order
        assert targets[0] == tok.token_to_id("<extra_id_0>")
        # put the spans back where the sentinels are: the window again
        spans, current = {}, None
        for i in targets[:-1]:
            if i in sentinel_ids:
                current = sentinel_ids[i]
                spans[current] = []
            else:
                spans[current].append(int(i))
        rebuilt = []
        for i in inputs[:-1]:
            rebuilt += spans[sentinel_ids[i]] if i in sentinel_ids else [int(i)]
        assert rebuilt == row.tolist()
        noise = len(targets) - 1 - len(out_sent)
        assert noise == round(L * 0.15)


def test_span_corruption_needs_its_special_tokens():
    assert SpanCorruption.special_tokens(64)[:3] == [EOT, "<pad>", "</s>"]
    with pytest.raises(ObjectiveError, match="'<pad>'"):
        SpanCorruption(CharTokenizer.train("abc", special_tokens=[EOT]))


# --------------------------------------------------------------------------- prefix LM


def test_prefix_lm_mask_and_targets():
    assert prefix_lm_mask([2], 5)[0].astype(int).tolist() == [
        [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    bias = additive_mask(None, 5, 5, True, np.float32, prefix_length=np.array([2, 4]))
    assert bias.shape == (2, 1, 5, 5)
    assert np.array_equal(bias[:, 0] == 0, prefix_lm_mask([2, 4], 5))
    obj = PrefixLM(tokenizer_for(PrefixLM))
    windows = np.arange(2 * 33).reshape(2, 33)
    batch = obj.make_batch(windows, np.random.default_rng(0))
    for P, targets in zip(batch["prefix_length"], batch["targets"]):
        assert 1 <= P < 32
        assert (targets[:P - 1] == IGNORE).all() and (targets[P - 1:] != IGNORE).all()


def test_prefix_lm_model_is_bidirectional_over_the_prefix_only():
    tinylm.seed(0)
    model = build_model(GPT2Config(vocab_size=20, d_model=16, n_layer=1, n_head=2,
                                   max_positions=8))
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    P = np.array([4])
    base = model(ids, prefix_length=P).logits.numpy()
    for j in range(8):
        changed = ids.copy()
        changed[0, j] = 19
        diff = np.abs(model(changed, prefix_length=P).logits.numpy() - base).max(axis=-1)[0]
        moved = diff > 1e-6
        expect = np.arange(8) >= j  # causal: position j and later see token j
        if j < 4:
            expect[:] = True  # a prefix token is seen by every position
        assert moved.tolist() == expect.tolist(), j
    causal = model(ids).logits.numpy()
    assert not np.allclose(causal[0, 0], base[0, 0])  # without the prefix: causal again


# --------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("objective, config, message", [
    (CausalLM, BertConfig, r"'causal-lm' trains decoder models, but bert is an encoder; "
                           r"use --objective masked-lm"),
    (MaskedLM, GPT2Config, r"'masked-lm' trains encoder models, but gpt2 is a decoder; "
                           r"use --objective causal-lm or prefix-lm"),
    (SpanCorruption, LlamaConfig, r"'span-corruption' trains encoder-decoder models, but llama"),
    (PrefixLM, T5Config, r"but t5 is an encoder-decoder; use --objective span-corruption"),
])
def test_family_and_objective_must_fit(objective, config, message):
    small = dict(vocab_size=120, d_model=16, n_layer=1, n_head=2, d_ff=32)
    if config is T5Config:
        small["head_dim"] = 8
    model = build_model(config(**small))
    with pytest.raises(ObjectiveError, match=message):
        objective(tokenizer_for(objective)).check_model(model)


def test_model_kind_is_each_familys_class_attribute():
    from tinylm.models import Decoder, Encoder, EncoderDecoder, Model

    assert (Decoder.kind, Encoder.kind, EncoderDecoder.kind) == (
        "decoder", "encoder", "encoder-decoder")
    small = build_model(GPT2Config(vocab_size=10, d_model=16, n_layer=1, n_head=2))
    assert model_kind(small) == model_kind(Decoder) == "decoder"  # instance or class

    class Retrieval(Encoder):  # a plugin family inherits or overrides its kind
        pass

    class Seq2Seq(Model):
        kind = "encoder-decoder"

    def builder(config):  # a registered builder function may carry a kind
        return Seq2Seq(config)

    builder.kind = "encoder-decoder"
    assert model_kind(Retrieval) == "encoder"
    assert model_kind(Seq2Seq) == model_kind(builder) == "encoder-decoder"
    assert model_kind(Model) is None and model_kind(lambda c: c) is None


def test_masked_lm_needs_the_mlm_head():
    model = build_model(BertConfig(vocab_size=120, d_model=16, n_layer=1, n_head=2, d_ff=32,
                                   head="classification"))
    with pytest.raises(ObjectiveError, match="head = 'mlm'"):
        MaskedLM(tokenizer_for(MaskedLM)).check_model(model)


def test_vocabulary_must_fit_the_model():
    model = build_model(GPT2Config(vocab_size=10, d_model=16, n_layer=1, n_head=2))
    with pytest.raises(ObjectiveError, match="vocab_size"):
        CausalLM(tokenizer_for(CausalLM)).check_model(model)
