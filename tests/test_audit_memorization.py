"""`tinylm audit`: canaries and their exposure (the Secret Sharer), extraction (Carlini et
al. 2022), the skew-normal estimate, the report.

Two small character-level models are trained here with tinylm.train.Trainer: one on
pseudo-English with canaries "my pin is NNNN" inserted 1, 10 and 100 times (by the
CLI), one over-fitted to a short passage repeated six times. Oracles: a brute-force
rank (every secret scored by a plain forward, no cache, no loglik.py), SciPy's
skewnorm and an Owen's T integral in mpmath.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cli_helpers import one_error_line, run
from train_helpers import WORDS, corpus_text

import tinylm
from tinylm.errors import TinyLMError
from tinylm.evaluation import audit_report, skewnorm
from tinylm.evaluation.memorization import (
    ExposureOptions, SecretFormat, canary_exposures, estimated_exposure, extraction,
    extraction_audit, insert_canaries, read_manifest, sample_windows, text_logprobs,
)
from tinylm.loading import load_model
from tinylm.train import TrainConfig, Trainer

PIN = "my pin is {d}{d}{d}{d}"


def _train(tmp, data, steps, d_model, lr, block=32):
    cfg = TrainConfig(out_dir=str(tmp / "run"), data=[str(data)], cache_dir=str(tmp / "cache"),
                      block_size=block, batch_size=16, max_steps=steps, lr=lr,
                      warmup_steps=10, weight_decay=0.0, eval_every=10**6, eval_iters=1,
                      log_every=10**6, sample_tokens=0, seed=0, val_fraction=0.0,
                      model={"n_layer": 2, "n_head": 2, "d_model": d_model})
    Trainer(cfg).fit()
    return tmp / "run"


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    """(run folder, manifest path): canaries put in by `tinylm audit canaries insert`
    (the last line holds every digit, so that every PIN can be encoded)."""
    tmp = tmp_path_factory.mktemp("canaries")
    (tmp / "clean.txt").write_text(corpus_text(3000, seed=0) + "0123456789\n")
    result = run("audit", "canaries", "insert", "--format", PIN, "--repeats", "1,10,100",
                 "--data", tmp / "clean.txt", "--out", tmp / "data.txt", "--seed", 3,
                 "--fraction", 1)
    assert result.exit_code == 0, result.output
    return _train(tmp, tmp / "data.txt", 300, 32, 1e-2), tmp / "data.txt.canaries.json"


@pytest.fixture(scope="module")
def canary_model(canary_run):
    model, tok = load_model(canary_run[0])
    fmt, canaries, context = read_manifest(json.loads(canary_run[1].read_text()))
    return model, tok, fmt, canaries


PASSAGE = corpus_text(25, seed=0)  # about 105 characters of random words


@pytest.fixture(scope="module")
def overfit_model(tmp_path_factory):
    """A model over-fitted to PASSAGE, six times over (and every word once, so that the
    held-out text can be encoded)."""
    tmp = tmp_path_factory.mktemp("overfit")
    (tmp / "train.txt").write_text(PASSAGE * 6 + " ".join(WORDS) + "\n")
    return load_model(_train(tmp, tmp / "train.txt", 250, 64, 5e-3))


# --------------------------------------------------------------------------- formats


def test_a_format_parses_renders_and_reads_back():
    fmt = SecretFormat.parse("key {{{x}}}-{d}{l}!")
    assert fmt.parts == ("key {", "}-", "", "!") and fmt.size == 16 * 10 * 26
    digits = fmt.all_digits()
    assert digits.shape == (fmt.size, 3)
    np.testing.assert_array_equal(fmt.number(digits), np.arange(fmt.size))
    texts = fmt.render(digits[[0, 1, 26, fmt.size - 1]])
    assert texts == ["key {0}-0a!", "key {0}-0b!", "key {0}-1a!", "key {f}-9z!"]
    assert [fmt.number(fmt.digits_of(t))[0] for t in texts] == [0, 1, 26, fmt.size - 1]
    assert fmt.secret("key {c}-4q!") == "c4q"
    assert SecretFormat.parse("{a}" * 20).size == 36 ** 20  # past int64: a Python int
    with pytest.raises(TinyLMError, match="not a canary of the format"):
        fmt.digits_of("key {g}-4q!")


@pytest.mark.parametrize("template, problem", [
    ("my pin is {q}", "'{q}'"), ("no secret here", "no placeholder"), ("a { b {d}", "'{'"),
])
def test_a_bad_format_is_one_clear_error(template, problem):
    with pytest.raises(TinyLMError, match=problem):
        SecretFormat.parse(template)


def test_canaries_go_in_as_their_own_lines_k_times_each():
    text = "".join(f"line {i:03d}\n" for i in range(200))  # equal lengths
    fmt = SecretFormat.parse(PIN)
    out, canaries = insert_canaries(text, fmt, [1, 10, 100], seed=5, fraction=0.5)
    lines = out.splitlines(keepends=True)
    assert [c.repeats for c in canaries] == [1, 10, 100]
    assert len({c.text for c in canaries}) == 3
    for c in canaries:
        assert lines.count(c.text + "\n") == c.repeats and c.secret == c.text[-4:]
    kept = [line for line in lines if not line.startswith("my pin")]
    assert "".join(kept) == text  # the data itself is unchanged and in order
    last = max(i for i, line in enumerate(lines) if line.startswith("my pin"))
    assert last < lines.index("line 100\n")  # all in the first half (fraction=0.5)
    again, _ = insert_canaries(text, fmt, [1, 10, 100], seed=5, fraction=0.5)
    assert again == out
    assert insert_canaries(text, fmt, [1, 10, 100], seed=6, fraction=0.5)[0] != out
    with pytest.raises(TinyLMError, match="do not fit"):
        insert_canaries(text, SecretFormat.parse("{d}"), [1] * 11)


# --------------------------------------------------------------------------- exposure


def test_exposure_grows_with_the_number_of_insertions(canary_model):
    model, tok, fmt, canaries = canary_model
    report = canary_exposures(model, tok, fmt, [c.text for c in canaries],
                              repeats=[c.repeats for c in canaries])
    assert report.method == "exact" and len(report.scores) == 10_000
    once, ten, hundred = report.results
    assert (once.repeats, ten.repeats, hundred.repeats) == (1, 10, 100)
    assert once.exposure + 3 < ten.exposure <= hundred.exposure <= math.log2(10_000)
    assert hundred.rank <= 4 and once.rank > 50
    # the skew-normal estimate from a sample orders them the same way
    sampled = canary_exposures(model, tok, fmt, [c.text for c in canaries],
                               options=ExposureOptions(exact_limit=0, samples=2000, seed=1))
    assert sampled.method == "estimated" and len(sampled.scores) == 2000
    e1, e10, e100 = (r.exposure for r in sampled.results)
    assert all(r.rank is None for r in sampled.results)
    assert e1 + 1.5 < e10 < e100 and e1 + 3 < e100
    assert abs(e1 - once.exposure) < 1.5  # where the fit is good: inside the sample


def _brute_force_bits(model, tok, texts):
    """-log2 p(text | "\\n") of each text by one plain forward each (no KV cache)."""
    out = []
    with tinylm.no_grad():
        for text in texts:
            ids = np.array(tok.encode("\n" + text))
            logits = model(ids[None, :]).logits.numpy()[0].astype(np.float64)  # (T, V)
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            out.append(-logp[np.arange(len(ids) - 1), ids[1:]].sum() / math.log(2))
    return np.array(out)


def test_exposure_equals_a_brute_force_rank(canary_model):
    model, tok, _, _ = canary_model
    fmt = SecretFormat.parse("my pin is {d}{d}")
    every = fmt.render(fmt.all_digits())
    report = canary_exposures(model, tok, fmt, every, options=ExposureOptions(batch_size=16))
    bits = _brute_force_bits(model, tok, every)
    ranks = np.array([(bits <= b).sum() for b in bits])
    assert [r.rank for r in report.results] == ranks.tolist()
    np.testing.assert_allclose([r.exposure for r in report.results],
                               math.log2(100) - np.log2(ranks), atol=1e-12)
    # the same log-perplexities but for the shared "my pin is " (a constant)
    offset = bits - report.scores
    assert offset.std() < 1e-5 and offset.mean() > 0
    assert ranks.min() == 1 and len(set(ranks)) > 50


def test_a_secret_the_tokenizer_cannot_write_has_probability_zero(canary_model):
    model, tok, _, _ = canary_model
    lp = text_logprobs(model, tok, ["my pin is 12", "my pin is Q2", "my pin is 21"])
    assert np.isfinite(lp[[0, 2]]).all() and lp[1] == -np.inf
    with pytest.raises(TinyLMError, match="cannot encode the canary"):
        canary_exposures(model, tok, SecretFormat.parse("my pin is {u}"), ["my pin is Q"])


# --------------------------------------------------------------------------- skew-normal


def test_the_skew_normal_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = np.linspace(-6, 9, 31)
    for alpha in (-6.0, -1.5, 0.0, 0.7, 4.0, 12.0):
        np.testing.assert_allclose(skewnorm.log_pdf(x, 0.5, 1.7, alpha),
                                   stats.skewnorm.logpdf(x, alpha, 0.5, 1.7), atol=1e-9)
        theirs = stats.skewnorm.logcdf(x, alpha, 0.5, 1.7)
        ok = theirs > -20  # SciPy's own CDF loses digits further out (Owen's T cancels)
        np.testing.assert_allclose(skewnorm.logcdf(x, 0.5, 1.7, alpha)[ok], theirs[ok],
                                   rtol=1e-7, atol=1e-10)
    sample = stats.skewnorm.rvs(4.0, loc=10.0, scale=3.0, size=100_000, random_state=1)
    xi, omega, alpha = skewnorm.fit_moments(sample)
    assert xi == pytest.approx(10.0, abs=0.1) and omega == pytest.approx(3.0, rel=0.03)
    assert alpha == pytest.approx(4.0, rel=0.15)


def test_the_skew_normal_tail_is_exact_far_out():
    """log CDF 6 to 30 scales below the mode (down to e^-570), against Phi(z) - 2 T(z,
    alpha) in 260-digit arithmetic (in float64 it cancels to 0)."""
    mp = pytest.importorskip("mpmath")
    for z, alpha in ((-10.0, 3.0), (-6.0, 5.0), (-30.0, 0.5), (-25.0, -3.0)):
        with mp.workdps(260):
            owen = mp.quad(lambda t: mp.exp(-z * z * (1 + t * t) / 2) / (1 + t * t),
                           [0, alpha]) / (2 * mp.pi)
            exact = float(mp.log(mp.ncdf(z) - 2 * owen))
        assert skewnorm.logcdf([z], 0.0, 1.0, alpha)[0] == pytest.approx(exact, rel=1e-11)


def test_the_estimate_counts_unwritable_secrets_and_refuses_a_flat_sample():
    rng = np.random.default_rng(0)
    sample = rng.normal(30.0, 4.0, 4000)
    base, _ = estimated_exposure(sample, [18.0])
    half, _ = estimated_exposure(np.concatenate([sample, np.full(4000, np.inf)]), [18.0])
    assert half[0] == pytest.approx(base[0] + 1.0)  # half the secrets impossible: +1 bit
    with pytest.raises(TinyLMError, match="same log-perplexity"):
        skewnorm.fit_moments(np.full(10, 3.0))


# --------------------------------------------------------------------------- extraction


def test_windows_are_random_non_overlapping_slices():
    ids = np.arange(1000)
    w = sample_windows(ids, 8, 70, seed=2)
    assert w.shape == (8, 70)
    starts = np.sort(w[:, 0])
    assert (np.diff(starts) >= 70).all() and (w == w[:, :1] + np.arange(70)).all()
    np.testing.assert_array_equal(w, sample_windows(ids, 8, 70, seed=2))
    assert len(sample_windows(ids, 100, 70)) == 14  # all that fit
    with pytest.raises(TinyLMError, match="fewer than the 70"):
        sample_windows(ids[:60], 1, 70)


def test_extraction_counts_the_leading_tokens_reproduced(canary_model):
    from tinylm.generate import generate

    model, tok, _, _ = canary_model
    prompts = sample_windows(tok.encode(corpus_text(400, seed=9)), 3, 12, seed=0)
    greedy = generate(model, prompts.tolist(), 20, temperature=0.0, eos_id=()).tokens
    windows = np.concatenate([prompts, np.array(greedy)], axis=1)  # (3, 32)
    windows[1, 12 + 7] = (windows[1, 12 + 7] + 1) % tok.vocab_size  # wrong from suffix[7]
    result = extraction(model, windows, 12, batch_size=2)
    assert result.exact.tolist() == [True, False, True]
    assert result.matched.tolist() == [20, 7, 20] and result.rate == pytest.approx(2 / 3)


def test_an_over_fitted_model_reproduces_its_training_text_not_held_out_text(overfit_model):
    model, tok = overfit_model
    out = extraction_audit(model, tok, PASSAGE * 6, corpus_text(600, seed=1), prefix=20,
                           suffix=50, samples=10, seed=0)
    train, heldout = out["train"], out["heldout"]
    assert len(train.exact) == len(PASSAGE * 6) // 70 and len(heldout.exact) == 10
    assert train.rate >= 0.6 and heldout.rate == 0.0
    assert train.matched.mean() > 40 > 10 > heldout.matched.mean()


# --------------------------------------------------------------------------- the CLI


def test_exposure_cli_prints_and_reports(canary_run, tmp_path):
    run_dir, manifest = canary_run
    result = run("audit", "exposure", "-m", run_dir, "--canaries", manifest, "--exact-limit",
                 0, "--samples", 500, "--json", "--report", tmp_path / "rep", "--no-progress")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "estimated" and data["n_scored"] == 500
    assert [c["repeats"] for c in data["canaries"]] == [1, 10, 100]
    assert data["canaries"][0]["exposure"] < data["canaries"][2]["exposure"]
    saved = json.loads((tmp_path / "rep" / "exposure.json").read_text())
    assert saved["canaries"] == data["canaries"]
    assert "| `my pin is" in (tmp_path / "rep" / "exposure.md").read_text()
    if audit_report._pyplot() is not None:
        assert (tmp_path / "rep" / "exposure.png").read_bytes()[:4] == b"\x89PNG"
    table = run("audit", "exposure", "-m", run_dir, "--canaries", manifest, "--exact-limit",
                0, "--samples", 100, "--no-progress")
    assert table.exit_code == 0 and "log-ppl" in table.stdout and "estimated" in table.stdout


def test_extraction_cli_and_a_report_without_matplotlib(overfit_model, canary_run, tmp_path,
                                                         monkeypatch):
    monkeypatch.setattr(audit_report, "_pyplot", lambda: None)
    (tmp_path / "train.txt").write_text(corpus_text(300, seed=0))
    (tmp_path / "held.txt").write_text(corpus_text(300, seed=1))
    result = run("audit", "extraction", "-m", canary_run[0], "--train", tmp_path / "train.txt",
                 "--heldout", tmp_path / "held.txt", "--prefix", 10, "--suffix", 10,
                 "--samples", 4, "--report", tmp_path / "rep", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "train" in result.stdout and "heldout" in result.stdout
    assert "matplotlib is not installed" in result.stderr
    saved = json.loads((tmp_path / "rep" / "extraction.json").read_text())
    assert saved["results"]["train"]["sequences"] == 4
    assert not (tmp_path / "rep" / "extraction.png").exists()


def test_audit_errors_are_one_line(canary_run, tmp_path):
    (tmp_path / "in.txt").write_text("some text\n")
    one_error_line(run("audit", "canaries", "insert", "--format", "pin {z}", "--data",
                       tmp_path / "in.txt", "--out", tmp_path / "out.txt"), "placeholders")
    one_error_line(run("audit", "canaries", "insert", "--format", "pin {d}", "--repeats",
                       "1,x", "--data", tmp_path / "in.txt", "--out", tmp_path / "o.txt"),
                   "comma-separated")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "pin {d}", "canaries": []}))
    one_error_line(run("audit", "exposure", "-m", canary_run[0], "--canaries",
                       tmp_path / "bad.json"), "lists no 'canaries'")
    (tmp_path / "odd.json").write_text(json.dumps({"format": "pin {d}",
                                                   "canaries": [{"text": "pin x"}]}))
    one_error_line(run("audit", "exposure", "-m", canary_run[0], "--canaries",
                       tmp_path / "odd.json"), "not a canary of the format")
