"""Continuous batching in `tinylm serve`: requests decoded together return what they
return alone. The slot cache's batched decode equals each row decoded alone with a
`KVCache` (GPT-2 and Llama: learned positions, RoPE, GQA; rows joining, leaving,
copied); 16 concurrent greedy requests of different lengths equal their lone runs
and were decoded in shared batches (the engine's counts, also at /metrics); a request
that arrives mid-decode joins the running batch; seeded sampling does not depend on
the batch; the engine alone equals `generate` on a Llama."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import tinylm
from serve_helpers import NAME, Gated, client, raw, running, tiny_model, tiny_tokenizer, \
    wait_until
from tinylm.autograd import no_grad
from tinylm.generate import generate
from tinylm.models import Decoder, GPT2Config, LlamaConfig
from tinylm.nn import KVCache
from tinylm.sampling import SamplingConfig
from tinylm.serve.cache import SlotCache
from tinylm.serve.engine import Delta, Engine, Job
from tinylm.serve.forward import pick_logits

openai = pytest.importorskip("openai")

CONFIGS = {
    "gpt2": GPT2Config(vocab_size=97, d_model=32, n_layer=2, n_head=4, max_positions=64),
    "llama": LlamaConfig(vocab_size=97, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                         max_positions=64),
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --------------------------------------------------------------------------- the cache


def _alone(model, prompt, steps):
    """Greedy logits of ``prompt`` and ``steps`` more tokens, decoded alone (KVCache)."""
    cache = KVCache()
    logits = model(np.array([prompt]), cache=cache).logits.data[0, -1]
    rows, token = [logits], int(logits.argmax())
    for _ in range(steps):
        logits = model(np.array([[token]]), cache=cache).logits.data[0, -1]
        rows.append(logits)
        token = int(logits.argmax())
    return np.stack(rows)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_slot_cache_batch_equals_rows_alone(family):
    """Rows of different lengths decode together as each does alone; three start with
    one right-padded prefill (last-position logits only), one joins after three steps
    (prefilled alone), one leaves (the survivors move down), one is a copy of another."""
    tinylm.seed(1)
    model = Decoder(CONFIGS[family]).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 11, 6, 17)]
    with no_grad():
        want = [_alone(model, p, 8) for p in prompts]
        cache = SlotCache(max_rows=5, max_length=64)
        got = [[] for _ in prompts]
        order = []  # which prompt each cache row decodes

        def prefill(p):
            row = len(order)
            logits = model(np.array([prompts[p]]), cache=cache.row(row)).logits.data[0, -1]
            got[p].append(logits)
            order.append(p)

        first = [prompts[p] for p in (0, 1, 2)]
        lengths = np.array([len(q) for q in first])
        ids = np.full((3, lengths.max()), 5)  # right-padded, any padding token
        for i, q in enumerate(first):
            ids[i, :len(q)] = q
        logits = pick_logits(model, ids, lengths - 1, cache=cache.prefill([0, 1, 2], lengths))
        got[0], got[1], got[2] = [[row] for row in logits]
        order += [0, 1, 2]
        for step in range(8):
            if step == 3:
                prefill(3)
                cache.copy_row(len(order) - 1, len(order))  # a second choice of prompt 3
                order.append(3)
            if step == 5:  # prompt 1 leaves; rows 2.. move down
                cache.keep([i for i, p in enumerate(order) if p != 1])
                order = [p for p in order if p != 1]
            B = len(order)
            tokens = np.array([int(got[p][-1].argmax()) for p in order])[:, None]
            mask, positions = cache.decode_inputs(B)
            logits = model(tokens, attention_mask=mask, positions=positions,
                           cache=cache.rows(B)).logits.data[:, -1]
            seen = set()
            for i, p in enumerate(order):
                if p in seen:  # the copy: the same sequence, the same logits
                    np.testing.assert_allclose(logits[i], got[p][-1], atol=1e-6)
                    continue
                seen.add(p)
                if len(got[p]) <= 8:
                    got[p].append(logits[i])
    for p in range(4):
        n = len(got[p])
        np.testing.assert_allclose(np.stack(got[p]), want[p][:n], atol=2e-5)
    assert len(got[1]) == 6 and len(got[3]) == 6  # it left early; it came late


class _OwnForward(Decoder):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_pick_logits_of_a_model_with_its_own_forward():
    """A model whose forward is not Decoder's goes through that forward: the same
    logits, at the columns asked for."""
    tinylm.seed(2)
    plain = Decoder(CONFIGS["llama"]).eval()
    own = _OwnForward(CONFIGS["llama"]).eval()
    own.load_state_dict(plain.state_dict())
    ids = np.random.default_rng(1).integers(0, 97, (3, 7))
    at = np.array([6, 2, 4])
    with no_grad():
        want = plain(ids).logits.data[np.arange(3), at]
        np.testing.assert_allclose(pick_logits(plain, ids, at), want, atol=1e-5)
        np.testing.assert_allclose(pick_logits(own, ids, at), want, atol=1e-6)


# --------------------------------------------------------------------------- the server


def _requests():
    """16 greedy requests of different prompt lengths and max_tokens."""
    starts = ["ROMEO:", "First Citizen:\nBefore we proceed", "All:\nSpeak, speak.",
              "MENENIUS:\nI tell you, friends, most charitable care", "Citizen:", "What",
              "KING RICHARD III:\nNow is the winter", "JULIET:\nO", "\n", "Second Citizen:",
              "CORIOLANUS:\nThey said they were an-hungry", "A", "Nay, but speak not",
              "MARCIUS:\nHe that will give good words", "LARTIUS:", "Hear me speak."]
    return [dict(prompt=p, max_tokens=8 + 3 * (i % 6)) for i, p in enumerate(starts)]


def _run(api, request):
    r = api.completions.create(model=NAME, temperature=0, logprobs=2, **request)
    c = r.choices[0]
    return c.text, c.finish_reason, c.logprobs.top_logprobs


def test_16_concurrent_greedy_requests_equal_their_lone_runs(tok):
    model = tiny_model(tok, max_positions=128, cls=Gated)
    requests = _requests()
    with running(model, tok, max_batch=16) as s:
        api = client(s)
        alone = [_run(api, r) for r in requests]
        steps_alone = s.engine.metrics()["batch_size_steps"]
        assert set(steps_alone) == {1}  # one at a time: batches of one
        # the premise: no step's two best tokens tie within float rounding
        gaps = [sorted(top.values())[-1] - sorted(top.values())[-2]
                for _, _, tops in alone for top in tops if len(top) == 2]
        assert min(gaps) > 1e-5
        model.gate.clear()  # hold the engine in the first prefill until all have queued
        clients = [client(s) for _ in requests]
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(_run, c, r) for c, r in zip(clients, requests)]
            wait_until(lambda: s.engine.waiting + s.engine.prefilling == len(requests),
                       what="all to queue")
            model.gate.set()
            together = [f.result(30) for f in futures]
        for (text, reason, _), (t2, r2, _) in zip(alone, together):
            assert (t2, r2) == (text, reason)
        metrics = json.loads(raw(s.port, b"GET /metrics HTTP/1.1\r\nConnection: close"
                                         b"\r\n\r\n").split(b"\r\n\r\n", 1)[1])["engine"]
    sizes = {int(k): v for k, v in metrics["batch_size_steps"].items()}
    shared = {b: n - steps_alone.get(b, 0) for b, n in sizes.items()}
    assert metrics["max_batch_size"] == 16 and shared[16] >= 7  # all 16 for the shortest run
    assert len([b for b, n in shared.items() if n and b > 1]) >= 5  # and fewer as they left
    # every token came from a prefill or a batched step, none was decoded twice
    assert metrics["tokens"] == 2 * sum(len(tops) for _, _, tops in alone)


def test_a_request_joins_a_running_batch(tok):
    model = tiny_model(tok, max_positions=128, cls=Gated)
    with running(model, tok, max_batch=4) as s:
        api = client(s)
        long_req, short_req = dict(prompt="ROMEO:", max_tokens=60), dict(prompt="All:",
                                                                          max_tokens=10)
        alone = [_run(api, r) for r in (long_req, short_req)]
        assert [a[1] for a in alone] == ["length", "length"]
        base = s.engine.metrics()["tokens"]
        model.delay = 0.005
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_run, client(s), long_req)
            wait_until(lambda: s.engine.metrics()["tokens"] >= base + 10,
                       what="the long request to be decoding")
            second = pool.submit(_run, client(s), short_req)
            got = [first.result(30), second.result(30)]
        model.delay = 0
        assert [g[:2] for g in got] == [a[:2] for a in alone]
        sizes = s.engine.metrics()["batch_size_steps"]
        assert sizes.get(2, 0) == 9  # the short one's steps, each beside the long one
        assert sizes[1] == 59 + 9 + (59 - 9)  # the lone runs, and the long one alone


def test_seeded_sampling_does_not_depend_on_the_batch(tok):
    model = tiny_model(tok, cls=Gated)
    kinds = [dict(prompt="ROMEO:", n=2, seed=1, temperature=0.9, top_p=0.9),
             dict(prompt="All:", seed=2, temperature=1.2, frequency_penalty=1.0),
             dict(messages=[{"role": "user", "content": "Speak."}], seed=3, temperature=0.7),
             dict(prompt="What", seed=4, temperature=0)]

    def run(api, kw):
        kw = dict(kw, model=NAME, max_tokens=12)
        if "messages" in kw:
            return [c.message.content for c in api.chat.completions.create(**kw).choices]
        return [c.text for c in api.completions.create(**kw).choices]

    with running(model, tok, max_batch=8) as s:
        alone = [run(client(s), kw) for kw in kinds]
        model.gate.clear()
        with ThreadPoolExecutor(len(kinds)) as pool:
            futures = [pool.submit(run, client(s), kw) for kw in kinds]
            wait_until(lambda: s.engine.waiting + s.engine.prefilling == len(kinds),
                       what="all to queue")
            model.gate.set()
            together = [f.result(30) for f in futures]
        assert together == alone
        assert s.engine.metrics()["max_batch_size"] == 5  # the n=2 request took two rows


def test_engine_equals_generate_on_a_llama(tok):
    """The engine without HTTP, on RoPE + GQA + RMSNorm: six jobs of different lengths
    and samplings, decoded in one batch, give generate()'s tokens."""
    tinylm.seed(3)
    config = LlamaConfig(vocab_size=len(tok), d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                         d_ff=64, max_positions=96)
    model = Decoder(config).eval()
    prompts = [tok.encode(t) for t in ("ROMEO:", "First Citizen:\nWe are accounted poor",
                                       "A", "All:\nResolved. resolved.", "MENENIUS:", "Hear")]
    configs = [SamplingConfig(temperature=0), SamplingConfig(temperature=0.8, top_k=30),
               SamplingConfig(temperature=1.0, presence_penalty=1.0)]
    got = {}
    engine = Engine(model, tok, max_rows=8, max_length=96)
    jobs = []
    for i, p in enumerate(prompts):
        got[i] = []

        def sink(events, i=i):
            got[i].extend(e.token for e in events if isinstance(e, Delta))

        jobs.append(Job(p, 10 + i, configs[i % 3], seed=i, sink=sink))
    engine.submit(jobs)  # queued before the thread starts: all admitted together
    engine.start()
    try:
        wait_until(lambda: engine.metrics().get("jobs", 0) == len(jobs), what="the jobs")
    finally:
        engine.close()
    for i, p in enumerate(prompts):
        out = generate(model, [p], 10 + i, sampling=configs[i % 3], seed=i, eos_id=())
        assert got[i] == out.tokens[0]
    assert engine.metrics()["max_batch_size"] == 6


def test_close_stops_decoding_while_a_job_waits_for_rows(tok):
    """close() ends the thread at the next step even when the queue's head waits for
    rows (the stop is not behind it in the queue): both jobs get a Failure."""
    from tinylm.serve.engine import Failure

    model = tiny_model(tok, max_positions=128, cls=Gated)
    model.delay = 0.02  # 120 steps: about 2.4 s of decoding left when close() comes
    engine = Engine(model, tok, max_rows=1, max_length=128)
    events = {0: [], 1: []}
    jobs = [Job(tok.encode("ROMEO:"), 120, SamplingConfig(temperature=0),
                sink=lambda e, i=i: events[i].extend(e)) for i in (0, 1)]
    engine.start()
    thread = engine._thread
    try:
        engine.submit(jobs)
        wait_until(lambda: engine.metrics().get("tokens", 0) >= 3, what="decoding")
        engine.close(timeout=1.0)
        assert not thread.is_alive()
    finally:
        model.delay = 0
        thread.join(10)
    assert isinstance(events[0][-1], Failure) and isinstance(events[1][-1], Failure)
    assert events[1] == [events[1][-1]]  # the waiting one never started
