"""Speculative decoding with a prompt- or prefix-tuning adapter on the target or the
draft: their P virtual positions sit first in that model's KV cache, so feeding,
cropping and the max_positions check must count them. Oracles: plain greedy /
seeded sampling of the target alone (tinylm.generate), and a full recompute."""

from __future__ import annotations

import numpy as np
import pytest

import tinylm
from tinylm import generate as G
from tinylm import peft
from tinylm.errors import TinyLMError
from tinylm.models import Decoder, GPT2Config, LlamaConfig

V = 50
PROMPT = [3, 14, 15, 9, 2]


def tiny(kind="gpt2", max_positions=64):
    """As test_generate.py's: weights scaled up so the greedy choice is well separated."""
    tinylm.seed(0)
    if kind == "gpt2":
        c = GPT2Config(vocab_size=V, d_model=32, n_layer=2, n_head=4,
                       max_positions=max_positions)
    else:
        c = LlamaConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                        max_positions=max_positions)
    model = Decoder(c)
    for p in model.parameters():
        p.data[...] = p.data * 8
    return model.eval()


def small_draft(kind="gpt2", max_positions=64):
    tinylm.seed(1)
    if kind == "gpt2":
        c = GPT2Config(vocab_size=V, d_model=16, n_layer=1, n_head=2,
                       max_positions=max_positions)
    else:
        c = LlamaConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2, n_kv_head=1, d_ff=24,
                        max_positions=max_positions)
    return Decoder(c).eval()


def clone(model):
    twin = Decoder(model.config)
    twin.load_state_dict({n: p.data.copy() for n, p in model.named_parameters()}, strict=False)
    return twin.eval()


def adapted(model, method, P=3, seed=7):
    """``model`` with a prompt/prefix adapter of P random (far from zero) virtual tokens."""
    tinylm.seed(seed)
    model = peft.apply(model, method, num_virtual_tokens=P)
    for n, p in model.named_parameters():
        if ".peft." in f".{n}":
            p.data[...] = p.data * 4  # so the adapted model's greedy output differs
    return model.eval()


def full_recompute_greedy(model, ids, n):
    """Argmax of the whole context, run afresh (no cache) for every new token."""
    ctx = list(ids)
    with tinylm.no_grad():
        for _ in range(n):
            ctx.append(int(model(np.array([ctx])).logits.numpy()[0, -1].argmax()))
    return ctx[len(ids):]


METHODS = ["prompt_tuning", "prefix_tuning"]
KINDS = ["gpt2", "llama"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_the_adapter_changes_the_target_and_generate_is_the_oracle(kind, method):
    """The oracle itself: generate's greedy output of the adapted model is its full
    recompute, and differs from the base model's (the adapter matters)."""
    target = adapted(tiny(kind), method)
    expect = G.generate(target, PROMPT, 20, temperature=0, eos_id=()).tokens[0]
    assert expect == full_recompute_greedy(target, PROMPT, 20)
    with peft.disable_adapters(target):
        assert G.generate(target, PROMPT, 20, temperature=0, eos_id=()).tokens[0] != expect


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_adapted_target_speculative_greedy_equals_its_greedy(kind, method, k):
    target = adapted(tiny(kind), method)
    draft = small_draft("llama" if kind == "gpt2" else "gpt2")
    expect = G.generate(target, PROMPT, 25, temperature=0, eos_id=()).tokens[0]
    out = G.speculative_greedy(target, draft, PROMPT, 25, k=k, eos_id=())
    assert out.tokens == expect
    assert 0 <= out.accepted <= out.proposed


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_adapted_draft_speculative_greedy_equals_target_greedy(kind, method, k):
    target = tiny(kind)
    draft = adapted(small_draft(kind), method)
    expect = G.generate(target, PROMPT, 25, temperature=0, eos_id=()).tokens[0]
    out = G.speculative_greedy(target, draft, PROMPT, 25, k=k, eos_id=())
    assert out.tokens == expect
    assert 0 <= out.accepted <= out.proposed


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t_method, d_method", [("prompt_tuning", "prefix_tuning"),
                                                ("prefix_tuning", "prompt_tuning")])
def test_adapters_of_different_sizes_on_both_models(kind, t_method, d_method):
    target = adapted(tiny(kind), t_method, P=2)
    draft = adapted(small_draft(kind), d_method, P=5, seed=8)
    expect = G.generate(target, PROMPT, 20, temperature=0, eos_id=()).tokens[0]
    for k in (2, 4):
        assert G.speculative_greedy(target, draft, PROMPT, 20, k=k, eos_id=()).tokens == expect


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_adapted_twin_draft_accepts_everything(kind, method):
    """A draft that is the target (adapter and all) agrees on every token: any slip in
    either cache's bookkeeping would show as a rejection."""
    target = adapted(tiny(kind), method)
    draft = adapted(clone(tiny(kind)), method)
    expect = G.generate(target, PROMPT, 16, temperature=0, eos_id=()).tokens[0]
    out = G.speculative_greedy(target, draft, PROMPT, 16, k=4, eos_id=())
    assert out.tokens == expect and out.accepted == out.proposed


@pytest.mark.parametrize("method", METHODS)
def test_speculative_sample_is_seeded_and_exact_with_an_adapted_twin(method):
    """As test_generate's plain case: p == q keeps every draft token, a seed repeats."""
    target = adapted(tiny("llama"), method)
    draft = adapted(clone(tiny("llama")), method)
    kw = dict(k=3, temperature=0.8, seed=5, eos_id=())
    a = G.speculative_sample(target, draft, PROMPT[:3], 12, **kw)
    b = G.speculative_sample(target, draft, PROMPT[:3], 12, **kw)
    assert a.tokens == b.tokens and len(a.tokens) == 12
    assert a.accepted == a.proposed


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["target", "draft"])
def test_speculative_sample_top1_is_the_adapted_target_greedy(method, where):
    """top_k=1 leaves the target one token to draw: sampling must give its greedy output
    whatever the draft proposes."""
    target, draft = tiny("llama"), small_draft()
    if where == "target":
        target = adapted(target, method)
    else:
        draft = adapted(draft, method)
    greedy = G.generate(target, PROMPT, 15, temperature=0, eos_id=()).tokens[0]
    for k in (1, 3):
        out = G.speculative_sample(target, draft, PROMPT, 15, k=k, seed=2, eos_id=(),
                                   sampling=G.SamplingConfig(temperature=1.0, top_k=1))
        assert out.tokens == greedy
    kw = dict(k=3, temperature=1.0, seed=1, eos_id=())
    a = G.speculative_sample(target, draft, PROMPT, 12, **kw)
    assert a.tokens == G.speculative_sample(target, draft, PROMPT, 12, **kw).tokens
    assert len(a.tokens) == 12 and all(0 <= t < V for t in a.tokens)


@pytest.mark.parametrize("method", METHODS)
def test_speculative_sample_first_token_is_the_adapted_target_distribution(method):
    """The first sampled token, over many seeds, is distributed as the adapted target's
    softmax at the prompt's end (a draft far from it proposes)."""
    target = adapted(tiny("gpt2"), method)
    with tinylm.no_grad():
        logits = target(np.array([PROMPT])).logits.numpy()[0, -1].astype(np.float64)
    T = 8.0  # a high temperature spreads p over many tokens
    p = np.exp((logits - logits.max()) / T)
    p /= p.sum()
    draft = adapted(small_draft(), method, seed=9)
    N, counts = 600, np.zeros(V)
    for seed in range(N):
        out = G.speculative_sample(target, draft, PROMPT, 1, k=2, temperature=T, seed=seed,
                                   eos_id=())
        counts[out.tokens[0]] += 1
    top = np.argsort(-p)[:5]
    # binomial standard error <= 0.5 / sqrt(600) ~ 0.02: 4.5 of them
    np.testing.assert_allclose(counts[top] / N, p[top], atol=0.09)
    assert 0.5 * np.abs(counts / N - p).sum() < 0.15  # total variation


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["target", "draft"])
def test_speculative_sample_draws_from_the_adapted_target_top_k(kind, method, where):
    """With top_k=3 every token speculative sampling gives must be among the adapted
    target's 3 most likely after the context so far (full recompute), over many
    rounds and seeds; and the draws are not all its greedy choice."""
    target, draft = tiny(kind), small_draft("llama" if kind == "gpt2" else "gpt2")
    if where == "target":
        target = adapted(target, method)
    else:
        draft = adapted(draft, method)
    greedy = G.generate(target, PROMPT, 20, temperature=0, eos_id=()).tokens[0]
    off_greedy = False
    for seed in range(3):
        out = G.speculative_sample(target, draft, PROMPT, 20, k=3, seed=seed, eos_id=(),
                                   sampling=G.SamplingConfig(temperature=2.0, top_k=3))
        assert len(out.tokens) == 20
        ctx = PROMPT + out.tokens
        with tinylm.no_grad():
            logits = target(np.array([ctx[:-1]])).logits.numpy()[0, len(PROMPT) - 1:]
        top3 = np.argsort(-logits, axis=-1)[:, :3]  # (20, 3)
        assert all(t in row for t, row in zip(out.tokens, top3.tolist()))
        off_greedy |= out.tokens != greedy
    assert off_greedy


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["target", "draft"])
def test_max_positions_counts_the_virtual_tokens(method, where):
    """prompt 5 + 8 new + k 3 = 16 fits max_positions=16, but not with P=3 in front;
    the refusal is one line saying what to do. Without the adapter it runs."""
    target, draft = tiny("gpt2", max_positions=16), small_draft("gpt2", max_positions=16)
    if where == "target":
        target = adapted(target, method)
    else:
        draft = adapted(draft, method)
    with pytest.raises(TinyLMError, match=f"3 virtual tokens.*max_positions=16 of the "
                                          f"{where} model; ask for fewer") as e:
        G.speculative_greedy(target, draft, PROMPT, 8, k=3, eos_id=())
    assert "\n" not in str(e.value)
    out = G.speculative_greedy(target, draft, PROMPT, 5, k=3, eos_id=())  # 5 + 5 + 3 + 3
    assert out.tokens == G.generate(target, PROMPT, 5, temperature=0, eos_id=()).tokens[0]
    with peft.disable_adapters(target if where == "target" else draft):
        G.speculative_greedy(target, draft, PROMPT, 8, k=3, eos_id=())


# --------------------------------------------------------------------------- generate's window


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_generate_slides_a_window_of_max_positions_less_the_virtual_tokens(kind, method):
    """max_positions 8, P 3: past 5 tokens of context the window slides, and each new
    token is the argmax of a full recompute of the last 5 (a GPT-2 with learned
    positions failed: 'position 8 is beyond the model's max_positions=8')."""
    model = adapted(tiny(kind, max_positions=8), method)
    ctx = list(PROMPT[:4])
    want = []
    with tinylm.no_grad():
        for _ in range(10):
            want.append(int(model(np.array([ctx[-5:]])).logits.numpy()[0, -1].argmax()))
            ctx.append(want[-1])
    assert G.generate(model, PROMPT[:4], 10, temperature=0, eos_id=()).tokens[0] == want


def test_beam_search_and_generate_refuse_what_the_virtual_tokens_leave_no_room_for():
    model = adapted(tiny("gpt2", max_positions=8), "prompt_tuning")
    with pytest.raises(TinyLMError, match="max_positions=8 less its 3 virtual tokens"):
        G.beam_search(model, [PROMPT[:4]], 2, num_beams=2, eos_id=())
    assert len(G.beam_search(model, [PROMPT[:4]], 1, num_beams=2, eos_id=()).tokens[0]) == 1
    full = adapted(tiny("gpt2", max_positions=3), "prompt_tuning")
    with pytest.raises(TinyLMError, match="use fewer num_virtual_tokens"):
        G.generate(full, [1], 2, temperature=0)
