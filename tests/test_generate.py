"""Generation: KV-cache decoding equals transformers' greedy output and tinylm's own
full recompute; left-padded batches equal one prompt at a time; penalties; stop
strings; seeds; eos from the model by default; text prompts. The samplers themselves:
test_sampling.py."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import tinylm
from tinylm import generate as G
from tinylm.errors import ConfigError, TinyLMError
from tinylm.models import Decoder, GPT2Config, LlamaConfig

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

    def token_to_id(self, text):
        return None


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
    for kw in (dict(temperature=float("nan")), dict(top_p=float("nan")),
               dict(min_p=float("nan")), dict(repetition_penalty=float("inf")),
               dict(frequency_penalty=float("nan")), dict(presence_penalty=float("-inf"))):
        with pytest.raises(ConfigError, match="finite"):  # was: empty output
            G.generate(model, [[1]], 2, **kw)
    for stop in ("", [""], ["ok", ""], [3]):
        with pytest.raises(TinyLMError, match="stop string"):
            G.generate(model, [[1]], 2, stop=stop, tokenizer=_Letters())
    with pytest.raises(TinyLMError, match="max_new_tokens"):
        G.generate(model, [[1]], -1)


# --------------------------------------------------------------------------- eos, prompts


@contextlib.contextmanager
def config_eos(model, eos):
    """``model``'s config with ``eos_token_id = eos`` inside the block."""
    before, model.config.eos_token_id = model.config.eos_token_id, eos
    try:
        yield
    finally:
        model.config.eos_token_id = before


def test_generation_stops_at_the_config_eos_by_default():
    model = tiny()
    greedy = G.sample(model, [3, 4], 10, temperature=0)
    eos = greedy[3]
    with config_eos(model, eos):
        out = G.generate(model, [[3, 4]], 10, temperature=0)
        assert out.tokens[0] == greedy[:greedy.index(eos) + 1] and out.finish_reasons == ["eos"]
        assert G.sample(model, [3, 4], 10, temperature=0, eos_id=()) == greedy  # none
        assert G.default_eos_ids(model) == {eos}
    with config_eos(model, [eos, 49]):  # a list, as Llama 3's config has
        assert G.default_eos_ids(model) == {eos, 49}


def test_t5_stops_at_its_config_eos_by_default():
    """T5's config has eos_token_id 1 (</s>): generation used to run on past it."""
    from tinylm.models import T5Config, build_model

    tinylm.seed(3)
    model = build_model(T5Config(vocab_size=40, d_model=16, n_layer=1, n_head=2, head_dim=8,
                                 d_ff=32)).eval()
    for p in model.parameters():
        p.data[...] = p.data * 8
    free = G.generate(model, [[5, 6, 7]], 12, temperature=0, eos_id=()).tokens[0]
    assert model.config.eos_token_id == 1 and G.default_eos_ids(model) == {1}
    eos = free[2]
    with config_eos(model, eos):
        out = G.generate(model, [[5, 6, 7]], 12, temperature=0)
        assert out.tokens[0] == free[:free.index(eos) + 1] and out.finish_reasons == ["eos"]
        beams = G.beam_search(model, [[5, 6, 7]], 12, num_beams=1).tokens[0]
        assert beams == free[:free.index(eos) + 1]


def test_the_tokenizers_end_of_text_is_the_eos_when_the_config_has_none():
    class Ends(_Letters):
        def token_to_id(self, text):
            return 7 if text == "</s>" else None

    model = tiny()
    assert G.default_eos_ids(model) == frozenset()
    assert G.default_eos_ids(model, Ends()) == {7}
    assert G.resolve_eos(model, (), Ends()) == frozenset()
    with pytest.raises(TinyLMError, match="eos_id"):
        G.resolve_eos(model, "x")


def test_beam_search_and_speculative_stop_at_the_config_eos():
    model = tiny()
    greedy = G.sample(model, [3, 4], 10, temperature=0)
    eos = greedy[2]
    with config_eos(model, eos):
        assert G.speculative_greedy(model, _clone(model), [3, 4], 10, k=3).tokens[-1] == eos
        found = G.beam_search(model, [[3, 4]], 10, num_beams=1).tokens[0]
        assert found == greedy[:greedy.index(eos) + 1]
        assert G.beam_search(model, [[3, 4]], 10, num_beams=1, eos_id=()).tokens[0] == greedy


def test_text_prompts_need_the_tokenizer():
    model = tiny()
    tok = _Letters()
    tok.encode = lambda text: [ord(c) - 97 for c in text]
    ids = G.generate(model, [[2, 0, 19]], 5, temperature=0).tokens
    assert G.generate(model, "cat", 5, temperature=0, tokenizer=tok).tokens == ids
    assert G.generate(model, ["cat", "b"], 5, temperature=0, tokenizer=tok).tokens[0] == ids[0]
    assert G.sample(model, "cat", 5, temperature=0, tokenizer=tok) == ids[0]
    assert G.beam_search(model, "cat", 5, num_beams=2, tokenizer=tok).tokens[0] == \
        G.beam_search(model, [2, 0, 19], 5, num_beams=2).tokens[0]
    for call in (lambda: G.generate(model, "cat", 5),  # was: ValueError: invalid literal
                 lambda: G.sample(model, "cat", 5),
                 lambda: G.beam_search(model, ["cat"], 5),
                 lambda: G.speculative_greedy(model, _clone(model), "cat", 5)):
        with pytest.raises(TinyLMError, match="tokenizer="):
            call()
    for bad in ([1.5, 2], [[1, "x"]], b"cat", 7):
        with pytest.raises(TinyLMError, match="prompt"):
            G.generate(model, bad, 2)


def test_sample_keeps_its_keywords():
    """tinylm.train calls sample(model, ids, n, temperature=..., top_k=..., rng=...)."""
    model = tiny()
    a = G.sample(model, [1, 2], 8, temperature=0.9, top_k=20, rng=np.random.default_rng(3))
    b = G.sample(model, [1, 2], 8, sampling=G.SamplingConfig(temperature=0.9, top_k=20),
                 seed=np.random.default_rng(3))
    assert a == b and len(a) == 8
    with pytest.raises(TinyLMError, match="not both"):
        G.sample(model, [1], 2, seed=1, rng=np.random.default_rng(1))


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


def test_speculative_sample_applies_the_filters_and_refuses_penalties():
    target = tiny("llama")
    prompt = [3, 14, 15]
    greedy = G.sample(target, prompt, 10, temperature=0, eos_id=())
    draft = Decoder(GPT2Config(vocab_size=50, d_model=16, n_layer=1, n_head=2,
                               max_positions=64)).eval()
    top1 = G.speculative_sample(target, draft, prompt, 10, k=3, seed=2, eos_id=(),
                                sampling=G.SamplingConfig(temperature=1.0, top_k=1))
    assert top1.tokens == greedy  # top-k 1 leaves the target one token to draw
    with pytest.raises(ConfigError, match="penalties"):
        G.speculative_sample(target, draft, prompt, 4, repetition_penalty=1.2)


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


@pytest.mark.parametrize("kw, match", [(dict(length_penalty=float("nan")), "length_penalty"),
                                       (dict(length_penalty=float("inf")), "length_penalty"),
                                       (dict(num_beams=0), "num_beams"),
                                       (dict(early_stopping="sometimes"), "early_stopping")])
def test_beam_search_refuses_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        G.beam_search(tiny(), [[1, 2]], 4, **kw)


def test_speculative_refuses_a_draft_with_another_vocabulary():
    other = Decoder(GPT2Config(vocab_size=60, d_model=16, n_layer=1, n_head=2, max_positions=64))
    with pytest.raises(TinyLMError, match="vocab_size"):
        G.speculative_greedy(tiny(), other, [1, 2], 5)
