"""Generation: KV-cache decoding equals transformers' greedy output and tinylm's own
full recompute; left-padded batches equal one prompt at a time; the samplers keep
exactly the tokens their definitions keep; penalties; stop strings; seeds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinylm
from tinylm import generate as G
from tinylm.errors import TinyLMError
from tinylm.models import Decoder, GPT2Config, LlamaConfig

# --------------------------------------------------------------------------- samplers

logit_rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(2, 12)),
                        elements=st.floats(-8, 8, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.integers(1, 14))
def test_top_k_keeps_the_k_largest(logits, k):
    out = G.top_k_filter(logits, k)
    for row, new in zip(logits, out):
        kept = np.isfinite(new)
        # token kept <=> fewer than k tokens are strictly larger
        expect = np.array([(row > x).sum() < k for x in row])
        assert (kept == expect).all()
        assert (new[kept] == row[kept]).all()


def _probs(row):
    p = np.exp(row - row.max())
    return p / p.sum()


@settings(max_examples=80, deadline=None)
@given(logit_rows, st.floats(0.01, 0.99))
def test_top_p_keeps_the_nucleus(logits, p):
    out = G.top_p_filter(logits, p)
    for row, new in zip(logits, out):
        probs = _probs(row)
        above = np.array([probs[probs > x].sum() for x in probs])
        assume(np.all(np.abs(above - p) > 1e-9))
        assert (np.isfinite(new) == (above < p)).all()
        assert np.isfinite(new).any()


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_above_the_scaled_max(logits, min_p):
    out = G.min_p_filter(logits, min_p)
    for row, new in zip(logits, out):
        probs = _probs(row)
        threshold = min_p * probs.max()
        assume(np.all(np.abs(probs - threshold) > 1e-12))
        assert (np.isfinite(new) == (probs >= threshold)).all()


def test_top_p_worked_example():
    logits = np.log(np.array([[0.5, 0.3, 0.2]]))
    assert np.isfinite(G.top_p_filter(logits, 0.6)).tolist() == [[True, True, False]]
    assert np.isfinite(G.top_p_filter(logits, 0.5)).tolist() == [[True, False, False]]


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    logits = np.array([[2.0, -1.0, 0.5, -3.0, 1.0], [0.0, 4.0, -2.0, 1.0, -0.5]])
    ids = [[0, 1, 1], [3, 4, 2]]
    seen = np.zeros_like(logits, dtype=bool)
    for i, r in enumerate(ids):
        seen[i, r] = True
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.3)
    theirs = proc(torch.tensor(ids), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(G.repetition_penalty(logits, seen, 1.3), theirs)


def test_frequency_and_presence_penalty_by_hand():
    logits = np.array([[1.0, 2.0, 3.0]])
    counts = np.array([[0, 2, 1]])
    out = G.frequency_penalty(logits, counts, frequency=0.5, presence=0.25)
    np.testing.assert_allclose(out, [[1.0, 2.0 - 1.0 - 0.25, 3.0 - 0.5 - 0.25]])


def test_temperature_and_top_k_match_transformers_warpers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20))
    cfg = G.SamplingConfig(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05)
    ours = G.process_logits(logits, cfg)
    t = torch.tensor(logits)
    ids = torch.zeros((3, 1), dtype=torch.long)
    for proc in (transformers.TemperatureLogitsWarper(0.7), transformers.TopKLogitsWarper(6),
                 transformers.TopPLogitsWarper(0.8), transformers.MinPLogitsWarper(0.05)):
        t = proc(ids, t)
    theirs = t.numpy()
    assert (np.isfinite(ours) == np.isfinite(theirs)).all()
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)])


def test_pick_draws_from_the_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.tile([[0.1, 0.6, 0.3]], (20000, 1)))
    draws = G.pick(logits, 1.0, rng)
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.02)
    assert (G.pick(np.array([[-np.inf, 0.0, -np.inf]]), 1.0, rng) == 1).all()


# --------------------------------------------------------------------------- decoding


def tiny(kind="gpt2", max_positions=64):
    tinylm.seed(0)
    if kind == "gpt2":
        c = GPT2Config(vocab_size=50, d_model=32, n_layer=2, n_head=4,
                       max_positions=max_positions)
    else:
        c = LlamaConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                        max_positions=max_positions)
    model = Decoder(c)
    # a larger init so that the greedy choice is well separated from the runner-up
    for p in model.parameters():
        p.data[...] = p.data * 8
    return model.eval()


def recompute_greedy(model, ids, n):
    """The reference: run the whole (cropped) context for every new token."""
    ctx, out = list(ids), []
    limit = model.config.max_positions
    with tinylm.no_grad():
        for _ in range(n):
            logits = model(np.array([ctx[-limit:]])).logits.numpy()[0, -1]
            out.append(int(logits.argmax()))
            ctx.append(out[-1])
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_kv_cache_greedy_equals_full_recompute(kind):
    model = tiny(kind)
    prompt = [3, 14, 15, 9, 2]
    assert G.sample(model, prompt, 20, temperature=0) == recompute_greedy(model, prompt, 20)


def test_sliding_window_past_max_positions():
    model = tiny("gpt2", max_positions=8)
    prompt = [3, 14, 15, 9, 2]
    assert G.sample(model, prompt, 12, temperature=0) == recompute_greedy(model, prompt, 12)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padded_batch_equals_one_prompt_at_a_time(kind):
    model = tiny(kind)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1], [20, 21, 22]]
    batch = G.generate(model, prompts, 10, temperature=0)
    for i, p in enumerate(prompts):
        alone = G.generate(model, [p], 10, temperature=0)
        assert batch.tokens[i] == alone.tokens[0]
        np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-4)


@pytest.mark.parametrize("positional", ["alibi", "sinusoidal", "rope"])
def test_left_padding_with_other_positional_schemes(positional):
    tinylm.seed(0)
    model = Decoder(GPT2Config(vocab_size=50, d_model=32, n_layer=2, n_head=4,
                               max_positions=64, positional=positional)).eval()
    for p in model.parameters():
        p.data[...] = p.data * 8
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1], [20, 21, 22]]
    batch = G.generate(model, prompts, 10, temperature=0).tokens
    assert batch == [G.generate(model, [p], 10, temperature=0).tokens[0] for p in prompts]
    assert batch[0] == recompute_greedy(model, prompts[0], 10)


def test_sampling_is_reproducible_with_a_seed():
    model = tiny()
    kw = dict(temperature=1.0, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.1,
              frequency_penalty=0.2)
    a = G.generate(model, [[1, 2], [3]], 15, seed=7, **kw)
    b = G.generate(model, [[1, 2], [3]], 15, seed=7, **kw)
    c = G.generate(model, [[1, 2], [3]], 15, seed=8, **kw)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens


def test_eos_stops_a_row_and_is_kept():
    model = tiny()
    greedy = G.sample(model, [3, 4], 10, temperature=0)
    eos = greedy[3]
    first = greedy.index(eos)
    out = G.generate(model, [[3, 4]], 10, temperature=0, eos_id=eos)
    assert out.tokens[0] == greedy[:first + 1] and out.finish_reasons == ["eos"]


class _Letters:
    """A toy tokenizer: id i is the letter chr(97 + i % 26)."""

    def decode_bytes(self, ids):
        return bytes(97 + i % 26 for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode()


def test_stop_strings():
    model = tiny()
    tok = _Letters()
    greedy = G.sample(model, [3, 4], 12, temperature=0)
    text = tok.decode(greedy)
    stop = text[4:6]
    end = text.index(stop) + len(stop)
    out = G.generate(model, [[3, 4]], 12, temperature=0, stop=[stop, "@@"], tokenizer=tok)
    assert out.tokens[0] == greedy[:end] and out.finish_reasons == ["stop"]
    assert G.cut_at_stop(tok.decode(out.tokens[0]), [stop]) == text[:end - len(stop)]
    with pytest.raises(TinyLMError, match="tokenizer"):
        G.generate(model, [[3]], 2, stop=["x"])


def test_on_token_streams_in_order():
    model = tiny()
    seen = []
    out = G.generate(model, [[1, 2]], 6, temperature=0, on_token=lambda r, t, lp: seen.append(t))
    assert seen == out.tokens[0]


def test_bad_arguments_are_tinylm_errors():
    model = tiny()
    for kw in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(min_p=2.0)):
        with pytest.raises(TinyLMError):
            G.generate(model, [[1]], 2, **kw)
    with pytest.raises(TinyLMError):
        G.generate(model, [[1], []], 2)


# --------------------------------------------------------------------------- vs transformers


def _hf_greedy(hf, prompts, n, eos):
    import torch

    out = []
    for p in prompts:
        with torch.no_grad():
            ones = torch.ones((1, len(p)), dtype=torch.long)
            seq = hf.generate(torch.tensor([p]), attention_mask=ones,
                              max_new_tokens=n, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos)
        new = seq[0, len(p):].tolist()
        if eos in new:
            new = new[:new.index(eos) + 1]
        out.append(new)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from model_helpers import build_hf, load_in_tinylm

    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4,
                                         n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                         initializer_range=0.4)
        hf = build_hf(transformers.GPT2LMHeadModel, config)
    else:
        config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=72,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=0, eos_token_id=0,
                                          initializer_range=0.2)
        hf = build_hf(transformers.LlamaForCausalLM, config)
    # (a wide init: transformers' default makes random models repeat one token)
    model = load_in_tinylm(hf, tmp_path)
    prompts = [[5, 6, 7, 8], [11], [40, 41, 42, 43, 44, 45, 46]]
    theirs = _hf_greedy(hf, prompts, 16, eos=0)
    ours = G.generate(model, prompts, 16, temperature=0, eos_id=0)
    assert ours.tokens == theirs
    assert len({t for row in theirs for t in row}) > 10  # not a degenerate repeat
    # transformers' own left-padded batch agrees too
    ids, mask, _ = G.left_pad(prompts, pad_id=0)
    with torch.no_grad():
        seq = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=16, do_sample=False, eos_token_id=0, pad_token_id=0)
    for row, new in zip(seq[:, ids.shape[1]:].tolist(), ours.tokens):
        assert row[:len(new)] == new


T5_PROMPTS = [[5, 6, 7, 8], [11, 12], [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture
def hf_t5_pair(tmp_path):
    """A tiny random T5 from transformers and the same weights loaded into tinylm."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from model_helpers import build_hf, load_in_tinylm

    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
                                   eos_token_id=1, pad_token_id=0, initializer_factor=4.0)
    hf = build_hf(transformers.T5ForConditionalGeneration, config)
    return hf, load_in_tinylm(hf, tmp_path)


def test_t5_greedy_equals_transformers_generate(hf_t5_pair):
    torch = pytest.importorskip("torch")
    hf, model = hf_t5_pair
    prompts = T5_PROMPTS
    ours = G.generate(model, prompts, 12, temperature=0, eos_id=1)
    ids, mask, _ = G.left_pad(prompts, pad_id=0)
    with torch.no_grad():
        seq = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=12, do_sample=False)
    for row, new in zip(seq[:, 1:].tolist(), ours.tokens):  # drop the decoder-start token
        assert row[:len(new)] == new
    assert len({t for row in ours.tokens for t in row}) > 3


# --------------------------------------------------------------------------- beam search


@pytest.fixture(scope="module")
def hf_gpt2_pair(tmp_path_factory):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from model_helpers import build_hf, load_in_tinylm

    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     initializer_range=0.4)
    hf = build_hf(transformers.GPT2LMHeadModel, config)
    return hf, load_in_tinylm(hf, tmp_path_factory.mktemp("gpt2-beam"))


BEAM_PROMPTS = [[5, 6, 7, 8], [11], [40, 41, 42, 43, 44, 45, 46]]


# eos 95 / 84 end some beams early (the random model emits them); 0 never comes
@pytest.mark.parametrize("eos", [0, 95, 84])
@pytest.mark.parametrize("length_penalty,early_stopping",
                         [(1.0, False), (2.0, True), (-1.0, "never"), (0.5, "never")])
def test_beam_search_equals_transformers(hf_gpt2_pair, eos, length_penalty, early_stopping):
    import torch

    hf, model = hf_gpt2_pair
    for p in BEAM_PROMPTS:
        with torch.no_grad():
            ones = torch.ones((1, len(p)), dtype=torch.long)
            seq = hf.generate(torch.tensor([p]), attention_mask=ones,
                              max_new_tokens=12, num_beams=3, do_sample=False,
                              length_penalty=length_penalty, early_stopping=early_stopping,
                              eos_token_id=eos, pad_token_id=eos)
        theirs = seq[0, len(p):].tolist()
        ours = G.beam_search(model, [p], 12, num_beams=3, length_penalty=length_penalty,
                             early_stopping=early_stopping, eos_id=eos).tokens[0]
        assert theirs[:len(ours)] == ours and all(t == eos for t in theirs[len(ours):])


def test_beam_search_batch_equals_one_prompt_at_a_time(hf_gpt2_pair):
    _, model = hf_gpt2_pair
    batch = G.beam_search(model, BEAM_PROMPTS, 10, num_beams=3, eos_id=95)
    for i, p in enumerate(BEAM_PROMPTS):
        alone = G.beam_search(model, [p], 10, num_beams=3, eos_id=95)
        assert batch.tokens[i] == alone.tokens[0]
        assert batch.scores[i] == pytest.approx(alone.scores[0], abs=1e-4)


def test_one_beam_is_greedy(hf_gpt2_pair):
    _, model = hf_gpt2_pair
    assert (G.beam_search(model, [[3, 4]], 10, num_beams=1).tokens[0]
            == G.sample(model, [3, 4], 10, temperature=0))


# --------------------------------------------------------------------------- speculative


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_target_greedy(kind, k):
    target = tiny(kind)
    tinylm.seed(1)
    draft = Decoder(GPT2Config(vocab_size=50, d_model=16, n_layer=1, n_head=2,
                               max_positions=64)).eval()
    prompt = [3, 14, 15, 9, 2]
    expect = G.sample(target, prompt, 25, temperature=0)
    out = G.speculative_greedy(target, draft, prompt, 25, k=k)
    assert out.tokens == expect
    assert 0 <= out.accepted <= out.proposed


def test_speculative_with_itself_accepts_everything():
    target = tiny("llama")
    prompt = [3, 14, 15]
    out = G.speculative_greedy(target, _clone(target), prompt, 12, k=4)
    assert out.tokens == G.sample(target, prompt, 12, temperature=0)
    assert out.accepted == out.proposed


def _clone(model):
    twin = Decoder(model.config)
    twin.load_state_dict({n: p.data.copy() for n, p in model.named_parameters()}, strict=False)
    return twin.eval()


def test_speculative_stops_at_eos():
    target = tiny()
    draft = _clone(target)
    greedy = G.sample(target, [3, 4], 10, temperature=0)
    eos = greedy[4]
    out = G.speculative_greedy(target, draft, [3, 4], 10, k=3, eos_id=eos)
    assert out.tokens == greedy[:greedy.index(eos) + 1]


def test_speculative_accept_reproduces_the_target_distribution():
    """Whatever the draft's q, the first token is distributed as p_0 and, when a second
    token follows, it is distributed as p_1 (Monte Carlo, 40k draws, V = 5)."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5) * 0.7, size=3)  # (n+1, V) target
    q = rng.dirichlet(np.ones(5) * 0.7, size=2)  # (n, V) draft, far from p
    first, second, N = np.zeros(5), np.zeros(5), 40_000
    for _ in range(N):
        proposal = [int(rng.choice(5, p=q[0])), int(rng.choice(5, p=q[1]))]
        tokens, accepted = G.speculative_accept(p, q, proposal, rng)
        assert len(tokens) == accepted + 1 and tokens[:accepted] == proposal[:accepted]
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
    np.testing.assert_allclose(first / N, p[0], atol=0.012)
    np.testing.assert_allclose(second / second.sum(), p[1], atol=0.02)


def test_speculative_sample_is_seeded_and_exact_with_itself():
    target = tiny("llama")
    prompt = [3, 14, 15]
    a = G.speculative_sample(target, _clone(target), prompt, 12, k=3, temperature=0.8, seed=5)
    b = G.speculative_sample(target, _clone(target), prompt, 12, k=3, temperature=0.8, seed=5)
    assert a.tokens == b.tokens and len(a.tokens) == 12
    assert a.accepted == a.proposed  # p == q: every draft token is kept
    draft = Decoder(GPT2Config(vocab_size=50, d_model=16, n_layer=1, n_head=2,
                               max_positions=64)).eval()
    c = G.speculative_sample(target, draft, prompt, 12, k=3, temperature=1.0, seed=1)
    assert len(c.tokens) == 12 and all(0 <= t < 50 for t in c.tokens)
    with pytest.raises(TinyLMError):
        G.speculative_sample(target, draft, prompt, 4, temperature=-1.0)


def test_greedy_with_repetition_penalty_equals_transformers(hf_gpt2_pair):
    import torch

    hf, model = hf_gpt2_pair
    for p in BEAM_PROMPTS:
        with torch.no_grad():
            ones = torch.ones((1, len(p)), dtype=torch.long)
            seq = hf.generate(torch.tensor([p]), attention_mask=ones,
                              max_new_tokens=15, do_sample=False, repetition_penalty=1.5,
                              eos_token_id=0, pad_token_id=0)
        ours = G.generate(model, [p], 15, temperature=0, repetition_penalty=1.5, eos_id=0)
        assert ours.tokens[0] == seq[0, len(p):].tolist()[:len(ours.tokens[0])]


def test_t5_beam_search_equals_transformers(hf_t5_pair):
    torch = pytest.importorskip("torch")
    hf, model = hf_t5_pair
    prompts = T5_PROMPTS
    for eos in (1, 62, 8):  # 62 and 8 end some beams early
        batch = G.beam_search(model, prompts, 10, num_beams=3, eos_id=eos).tokens
        for p, ours in zip(prompts, batch):
            with torch.no_grad():
                seq = hf.generate(torch.tensor([p]), max_new_tokens=10, num_beams=3,
                                  do_sample=False, eos_token_id=eos)
            theirs = seq[0, 1:].tolist()  # drop the decoder-start token
            assert theirs[:len(ours)] == ours


def test_speculative_refuses_a_draft_with_another_vocabulary():
    other = Decoder(GPT2Config(vocab_size=60, d_model=16, n_layer=1, n_head=2, max_positions=64))
    with pytest.raises(TinyLMError, match="vocab_size"):
        G.speculative_greedy(tiny(), other, [1, 2], 5)
