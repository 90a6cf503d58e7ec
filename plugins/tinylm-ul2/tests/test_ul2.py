"""tinylm-ul2: each denoiser's span statistics against its configuration, the batch
layouts for T5 and decoders, and training.

The statistics use windows whose token at position j is j, so a batch says exactly
which positions were dropped. T5's counts are deterministic given the window length L
(n = round(rate L) noise tokens in k = round(n / mean_span) spans), so per row they
must hold exactly; what is random is where the spans sit and how long each is: a
uniform random composition of n into k parts, whose part lengths have mean n / k,
variance m (k - 1) (m + k) / (k^2 (k + 1)) (m = n - k) and the pmf
P(len = j) = C(n - j - 1, k - 2) / C(n - 1, k - 1). Sample means and frequencies are
checked against these within Z standard errors of the sample size (Z = 5: a false
alarm is below 1e-6 per check; the seeds are fixed anyway)."""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest

from tinylm import plugins
from tinylm.objectives import IGNORE, ObjectiveError, span_counts
from tinylm.train import Trainer, TrainConfig

import tinylm_ul2
from tinylm_ul2.denoisers import PAPER_MIXTURE, parse
from tinylm_ul2.objective import UL2

Z = 5.0
SPECIAL_BASE = 10_000  # special-token ids sit above every position id
N_ROWS = 3000


@pytest.fixture(autouse=True)
def ul2_plugin(monkeypatch):
    monkeypatch.setenv("TINYLM_LOAD_PLUGINS", "")
    plugins.reset()
    plugins.register_plugin(tinylm_ul2, "ul2")
    yield
    plugins.reset()


class Tok:
    """The ids an objective asks a tokenizer for: each special token above 10000."""

    def __init__(self, tokens):
        self.ids = {t: SPECIAL_BASE + i for i, t in enumerate(tokens)}
        self.vocab_size = SPECIAL_BASE + len(tokens)

    def token_to_id(self, token):
        return self.ids.get(token)


def fake_model(kind, vocab):
    """What check_model looks at: the kind, the config, forward's parameters."""
    def forward(ids, targets=None, attention_mask=None, prefix_length=None):
        raise AssertionError("not called")
    config = types.SimpleNamespace(vocab_size=vocab, architecture="fake")
    return types.SimpleNamespace(kind=kind, config=config, forward=forward)


def objective(kind, block_size, **options):
    tok = Tok(UL2.special_tokens(block_size, **options))
    obj = UL2(tok, **options)
    window = obj.window_length(block_size)
    obj.check_model(fake_model(kind, tok.vocab_size))
    return obj, tok, window


def batch_of(obj, window, n_rows, seed=0):
    positions = np.broadcast_to(np.arange(window), (n_rows, window))
    return obj.make_batch(positions, np.random.default_rng(seed))


def one_hot_weights(i, n=7):
    return ",".join("1" if j == i else "0" for j in range(n))


def sentinel_ids(tok):
    return {v: int(k[len("<extra_id_"):-1]) for k, v in tok.ids.items()
            if k.startswith("<extra_id_")}


def decode_t5_row(ids, targets, tok):
    """(kept positions, [noise spans as position lists]) of one R/X row, checking the
    layout: mode token, inputs with sentinels 0, 1, ... in order, </s>, padding."""
    s = sentinel_ids(tok)
    eos, pad = tok.ids["</s>"], tok.ids["<pad>"]
    ids = list(ids[1:])  # the mode token
    end = ids.index(eos)
    assert all(t == pad for t in ids[end + 1:])
    targets = [t for t in targets if t != IGNORE]
    assert targets[-1] == eos
    spans, kept, order = [], [], []
    for t in targets[:-1]:
        if t in s:
            order.append(s[t])
            spans.append([])
        else:
            spans[-1].append(t)
    assert order == list(range(len(order)))  # sentinels in order
    assert [s[t] for t in ids[:end] if t in s] == order  # the same ones in the inputs
    kept = [t for t in ids[:end] if t not in s]
    return kept, spans


# --------------------------------------------------------------------------- spans


RX = [d for d in PAPER_MIXTURE.split(",") if not d.startswith("S")]


@pytest.mark.parametrize("spec", RX)
def test_span_statistics_match_each_denoiser(spec):
    """Per row: corruption n = round(rate L), k = round(n / mean_span) spans, mean
    span n / k (within the rounding of mean_span); over the rows: the first noise and
    first kept span lengths have the composition's mean, the noise span lengths its
    pmf, and the window comes back from inputs + targets."""
    i = PAPER_MIXTURE.split(",").index(spec)
    kind, mu, rate = spec.split(":")
    mu, rate = float(mu), float(rate)
    obj, tok, window = objective("encoder-decoder", 512, weights=one_hot_weights(i))
    L = obj.lengths(512, "encoder-decoder")[i]
    batch = batch_of(obj, window, N_ROWS)
    assert set(batch["denoiser"]) == {i}
    assert (batch["ids"][:, 0] == tok.ids[f"[{kind}]"]).all()
    n = min(max(int(round(L * rate)), 1), L - 1)  # T5's formula, written out again
    k = max(int(round(n / mu)), 1)
    assert abs(n / L - rate) <= 0.5 / L + 1e-12
    if round(n / mu) >= 1:
        assert abs(n / k - mu) <= mu / (2 * k)  # the rounding of k, no more
    first_noise, first_keep, lengths = [], [], []
    for row in range(N_ROWS):
        kept, spans = decode_t5_row(batch["ids"][row], batch["targets"][row], tok)
        assert len(spans) == k and sum(map(len, spans)) == n
        assert sorted(kept + [p for s in spans for p in s]) == list(range(L))
        assert all(s == list(range(s[0], s[0] + len(s))) for s in spans)  # contiguous
        first_noise.append(len(spans[0]))
        first_keep.append(spans[0][0])  # positions before the first span: kept
        lengths.extend(map(len, spans))
    assert batch["attention_mask"].sum(axis=1).tolist() == [1 + L - n + k + 1] * N_ROWS
    for sample, total in ((first_noise, n), (first_keep, L - n)):
        mean, var = composition_moments(total, k)
        assert abs(np.mean(sample) - mean) <= Z * math.sqrt(var / N_ROWS) + 1e-12
    assert np.mean(lengths) == pytest.approx(n / k)
    if k > 1:  # the length pmf, every value, within Z standard errors
        values, counts = np.unique(lengths, return_counts=True)
        freq = dict(zip(values.tolist(), counts / len(lengths)))
        for j in range(1, n - k + 2):
            p = math.comb(n - j - 1, k - 2) / math.comb(n - 1, k - 1)
            se = math.sqrt(p * (1 - p) / N_ROWS)  # the first span alone is N_ROWS draws
            assert abs(freq.get(j, 0.0) - p) <= Z * se + 2.0 / N_ROWS


def composition_moments(total, k):
    """Mean and variance of one part of a uniform random composition of ``total``
    into ``k`` positive parts (1 + a Dirichlet-multinomial(1, ..., 1) count)."""
    m = total - k
    return total / k, (m * (k - 1) * (m + k) / (k * k * (k + 1)) if k > 1 else 0.0)


def test_s_denoiser_fixed_and_random_split():
    """S:0.25 predicts exactly the last round(0.25 L) tokens; S:random splits at a
    point uniform in [1, L - 1] (mean L / 2, variance ((L - 1)^2 - 1) / 12)."""
    for spec in ("S:0.25", "S:random"):
        obj, tok, window = objective("encoder-decoder", 256, denoisers=spec)
        L = obj.lengths(256, "encoder-decoder")[0]
        batch = batch_of(obj, window, N_ROWS, seed=3)
        eos = tok.ids["</s>"]
        ids, targets = batch["ids"], batch["targets"]
        assert (ids[:, 0] == tok.ids["[S]"]).all()
        n_in = (ids[:, 1:] != eos).cumprod(axis=1).sum(axis=1)  # inputs before </s>
        n_out = (targets != eos).cumprod(axis=1).sum(axis=1)
        assert (n_in + n_out == L).all()
        for row in range(0, N_ROWS, 97):  # prefix, then suffix: the window in order
            seq = list(ids[row, 1:1 + n_in[row]]) + list(targets[row, :n_out[row]])
            assert seq == list(range(L))
        if spec == "S:0.25":
            assert (n_out == round(0.25 * L)).all()
        else:
            assert n_in.min() >= 1 and n_in.max() <= L - 1
            sd = math.sqrt(((L - 1) ** 2 - 1) / 12)
            assert abs(n_in.mean() - L / 2) <= Z * sd / math.sqrt(N_ROWS)


def test_mixture_weights_are_the_draw_frequencies():
    weights = [2, 1, 1, 3, 0, 1, 1]
    obj, _, window = objective("encoder-decoder", 64, weights=",".join(map(str, weights)))
    choice = np.concatenate([batch_of(obj, window, 1000, seed=s)["denoiser"]
                             for s in range(7)])
    p = np.array(weights) / sum(weights)
    freq = np.bincount(choice, minlength=7) / len(choice)
    assert freq[4] == 0.0
    assert np.all(np.abs(freq - p) <= Z * np.sqrt(p * (1 - p) / len(choice)))
    default = UL2(Tok(UL2.special_tokens(64)))
    np.testing.assert_allclose(default.p, np.full(7, 1 / 7))


def test_window_lengths_fill_the_block():
    """Each denoiser uses the longest window whose T5 inputs (mode + corrupted + </s>)
    fit block_size: one more token would not fit (T5's random_spans_helper rule)."""
    obj = UL2(None)
    for d, L in zip(obj.specs, obj.lengths(512, "encoder-decoder")):
        need = lambda L: 1 + d.piece_lengths(L)[0] + 1  # noqa: E731
        assert need(L) <= 512 < need(L + 1)
        if d.kind != "S":
            assert d.counts(L) == span_counts(L, d.rate, d.mean_span)
    for d, L in zip(obj.specs, obj.lengths(128, "decoder")):
        assert 1 + d.sequence_length(L) <= 128 < 1 + d.sequence_length(L + 1)


# --------------------------------------------------------------------------- layouts


def test_decoder_rows_are_mode_inputs_then_targets():
    """Decoder form: [mode] inputs targets EOT, shifted by one; the loss only on the
    targets (and the EOT), the prefix (mode + inputs) bidirectional."""
    obj, tok, window = objective("decoder", 96)
    batch = batch_of(obj, window, 400, seed=5)
    ids, targets, prefix = batch["ids"], batch["targets"], batch["prefix_length"]
    assert ids.shape == targets.shape == (400, 96)
    s, eot = sentinel_ids(tok), tok.ids["<|endoftext|>"]
    modes = {tok.ids[m] for m in ("[R]", "[S]", "[X]")}
    for row in range(400):
        d = obj.specs[batch["denoiser"][row]]
        assert ids[row, 0] == tok.ids[f"[{d.kind}]"] and ids[row, 0] in modes
        P = prefix[row]
        predicted = np.flatnonzero(targets[row] != IGNORE)
        assert predicted[0] == P - 1  # the last input token predicts the first target
        assert (np.diff(predicted) == 1).all()  # then every target, in a row
        answer = targets[row, predicted]
        assert answer[-1] == eot
        np.testing.assert_array_equal(ids[row, predicted[1:]], answer[:-1])  # shifted
        inputs = ids[row, 1:P]
        if d.kind == "S":
            assert list(inputs) + list(answer[:-1]) == list(range(len(inputs) + len(answer) - 1))
        else:  # sentinel k in the inputs marks where target span k goes
            window_back = []
            spans, cur = {}, None
            for t in answer[:-1]:
                cur = s[t] if t in s else cur
                if t not in s:
                    spans.setdefault(cur, []).append(t)
            for t in inputs:
                window_back.extend(spans.get(s[t], []) if t in s else [t])
            assert window_back == list(range(len(window_back)))


def test_options_and_errors():
    assert [str(d) for d in parse(PAPER_MIXTURE)] == PAPER_MIXTURE.split(",")
    assert [str(d) for d in parse([["R", 3, 0.15], "S:random"])] == ["R:3:0.15", "S:random"]
    for bad, match in (("R:3", "not R:MEAN_SPAN"), ("Q:3:0.1", "not R:MEAN_SPAN"),
                       ("R:3:1.5", "rate must be"), ("X:0.5:0.5", "mean span"), ("", "list")):
        with pytest.raises(ObjectiveError, match=match):
            UL2(None, denoisers=bad)
    with pytest.raises(ObjectiveError, match="7 non-negative"):
        UL2(None, weights="1,2")
    with pytest.raises(ObjectiveError, match="three tokens"):
        UL2(None, mode_tokens="[R],[S]")
    with pytest.raises(ObjectiveError, match="no option"):
        UL2(None, mean_span=3)
    plain = UL2(Tok(UL2.special_tokens(32, mode_tokens="")), mode_tokens="")
    assert not any(t.startswith("[") for t in UL2.special_tokens(32, mode_tokens=""))
    plain.window_length(32)
    plain.check_model(fake_model("decoder", SPECIAL_BASE + 100))
    batch = plain.make_batch(np.zeros((4, 200), np.int64), np.random.default_rng(0))
    assert (batch["ids"] < SPECIAL_BASE).any()  # rows start with a data token
    no_prefix = types.SimpleNamespace(kind="decoder", config=fake_model(
        "decoder", SPECIAL_BASE + 100).config, forward=lambda ids, targets=None: None)
    with pytest.raises(ObjectiveError, match="prefix_lm = false"):
        plain.check_model(no_prefix)
    with pytest.raises(ObjectiveError, match="trains encoder-decoder or decoder"):
        plain.check_model(fake_model("encoder", SPECIAL_BASE + 100))
    with pytest.raises(ObjectiveError, match="<pad>"):
        UL2(Tok(["<|endoftext|>"]), denoisers="S:0.25", mode_tokens="").check_model(
            fake_model("encoder-decoder", SPECIAL_BASE + 100))


# --------------------------------------------------------------------------- training


def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and the dog ran to see what it was then both went home".split()
    text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(250)) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("family", ["t5", "gpt"])
def test_a_model_trains_with_ul2(tmp_path, family):
    """A tiny T5 (and a GPT-2, prefix-LM form) trained 40 steps with the paper's
    mixture: the loss falls."""
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data=[corpus(tmp_path)],
                      cache_dir=str(tmp_path / "cache"), family=family, objective="ul2",
                      block_size=32, batch_size=8, max_steps=40, lr=1e-2, warmup_steps=5,
                      eval_every=40, eval_iters=2, log_every=1, sample_tokens=0, seed=7,
                      model={"n_layer": 1, "n_head": 2, "d_model": 32})
    result = Trainer(cfg, log=lambda message: None).fit()
    curve = losses(cfg.out_dir)
    first, last = np.mean([curve[s] for s in (1, 2, 3)]), np.mean([curve[s] for s in (38, 39, 40)])
    assert first - last > 0.3, (first, last)
    assert result["val_loss"] < curve[1]


def test_tinylm_train_objective_ul2_from_the_entry_point(tmp_path, monkeypatch):
    """Installed (pip install -e plugins/tinylm-ul2), `tinylm train --objective ul2`."""
    from click.testing import CliRunner

    from tinylm.cli import cli

    monkeypatch.setenv("TINYLM_LOAD_PLUGINS", "ul2")
    plugins.reset()
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--family", "t5", "--objective", "ul2", "--data", corpus(tmp_path),
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "3",
        "--eval-every", "3", "--eval-iters", "1", "--block-size", "24", "--batch-size", "4",
        "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--sample-tokens", "0",
        "--no-progress", "--log-every", "1", "-s", "objective_options.weights=1,1,1,1,1,1,0"],
        prog_name="tinylm")
    assert result.exit_code == 0, result.output
    assert sorted(losses(out)) == [1, 2, 3]
    with open(out / "trainer_state.json", encoding="utf-8") as f:
        assert json.load(f)["config"]["objective_options"] == {"weights": "1,1,1,1,1,1,0"}
    assert plugins.registered_by("objectives")["ul2"] == "ul2"
