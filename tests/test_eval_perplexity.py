"""`tinylm eval perplexity`: lm-eval's rolling windows and Hugging Face's strided recipe.

Oracles: lm-eval 0.4 (``simple_evaluate`` on a local ``loglikelihood_rolling`` task in
its YAML format: word_perplexity, byte_perplexity, bits_per_byte; HFLM's per-document
rolling log-likelihoods) and the strided sliding-window code of the transformers
"Perplexity of fixed-length models" page run with torch, on the same random GPT-2 and
Llama (BOS-adding) folders, with a window small enough that every document needs
several.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cli_helpers import one_error_line, run
from eval_helpers import (hf_model, hflm, offline_lm_eval, tiny_gpt2, tiny_llama,
                          write_jsonl)

from corpora import SLICE
from tinylm.evaluation.encoding import TextEncoder
from tinylm.evaluation.loglik import rolling_windows
from tinylm.evaluation.perplexity import (read_documents, rolling_perplexity,
                                          strided_perplexity, strided_windows)
from tinylm.loading import load_model

DATA = __import__("pathlib").Path(__file__).parent / "data" / "eval"
TEXT = SLICE.read_text(encoding="utf-8")
DOCS = [TEXT[:500], TEXT[500:560], "  spaced\t\tout  words \n\n end ", TEXT[900:1300]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl_models")
    return {"gpt2": tiny_gpt2(root / "gpt2", max_positions=32),
            "llama": tiny_llama(root / "llama", max_positions=32)}


@pytest.fixture(scope="module")
def hf(folders):
    return {name: hf_model(path) for name, path in folders.items()}


@pytest.fixture(scope="module")
def loaded(folders):
    out = {}
    for name, path in folders.items():
        model, tok = load_model(path)
        out[name] = (model, TextEncoder.for_model(path, model, tok))
    return out


ROLLING_TASK = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_rolling_equals_lm_eval(hf, loaded, tmp_path, monkeypatch, name):
    lm_eval = offline_lm_eval(monkeypatch, tmp_path / "hf_cache")
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    (tmp_path / "tiny_ppl.yaml").write_text(ROLLING_TASK.format(data=data))
    lm = hflm(hf[name], batch_size=3)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_ppl"], bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tmp_path),
                                                           include_defaults=False))
    theirs = out["results"]["tiny_ppl"]
    model, enc = loaded[name]
    mine = rolling_perplexity(model, enc, DOCS, batch_size=3)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert getattr(mine, metric) == pytest.approx(theirs[f"{metric},none"], rel=1e-6)
    # per document: HFLM's rolling log-likelihoods (the windows cut every document)
    per_doc = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (d,), 0) for d in DOCS], disable_tqdm=True)
    each = [rolling_perplexity(model, enc, [d]).loglikelihood for d in DOCS]
    np.testing.assert_allclose(each, per_doc, rtol=1e-6, atol=1e-4)
    assert mine.loglikelihood == pytest.approx(sum(per_doc), rel=1e-6)
    assert mine.words == sum(len(re.split(r"\s+", d)) for d in DOCS)
    assert mine.bytes == sum(len(d.encode("utf-8")) for d in DOCS)
    assert mine.token_perplexity == pytest.approx(math.exp(-mine.loglikelihood / mine.tokens))


def _hf_strided(hf_model, input_ids, max_length, stride):
    """The transformers docs' recipe, as written there."""
    import torch

    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = hf_model(ids, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return torch.exp(nll_sum / n_tokens).item()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_strided_equals_the_transformers_recipe(hf, loaded, name):
    torch = pytest.importorskip("torch")
    hf_net, tok = hf[name]
    model, enc = loaded[name]
    docs = [TEXT[:200], TEXT[500:560]]  # ~100 tokens: windows of 32 every 32, 16, 7
    input_ids = tok("\n\n".join(docs), return_tensors="pt").input_ids
    assert input_ids[0].tolist() == enc.encode("\n\n".join(docs))
    for stride in (32, 16, 7):
        mine = strided_perplexity(model, enc, docs, max_length=32, stride=stride, batch_size=3)
        assert mine.perplexity == pytest.approx(_hf_strided(hf_net, input_ids, 32, stride),
                                                rel=1e-5)
    assert torch.is_tensor(input_ids)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 60), L=st.integers(1, 12))
def test_rolling_windows_are_lm_eval_windows(n, L):
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(100, 100 + n))
    ref = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
        tokens, prefix_token=7, max_seq_len=L, context_len=1)]
    got = rolling_windows(tokens, 7, L)
    assert [(list(a), list(b)) for a, b in ref] == got
    assert sum((b for _, b in got), []) == tokens  # the continuations tile the text


def test_strided_windows_tile_the_text():
    windows = strided_windows(65, 32, 32)
    assert windows == [(0, 32, 32), (32, 64, 32), (64, 65, 1)]
    windows = strided_windows(50, 32, 16)
    assert windows == [(0, 32, 32), (16, 48, 16), (32, 50, 2)]


def test_read_documents(tmp_path):
    assert len(read_documents(DATA / "documents.jsonl")) == 3
    (tmp_path / "a.json").write_text(json.dumps(["one", {"text": "two"}]))
    assert read_documents(tmp_path / "a.json") == ["one", "two"]
    (tmp_path / "b.txt").write_text("all of it\n\nis one")
    assert read_documents(tmp_path / "b.txt") == ["all of it\n\nis one"]
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    assert read_documents(tmp_path / "c.jsonl", text_key="body") == ["x"]


def test_cli_perplexity(folders, tmp_path):
    out = tmp_path / "ppl.json"
    result = run("eval", "perplexity", "-m", folders["gpt2"], "--data",
                 DATA / "documents.jsonl", "--method", "both", "--stride", "16",
                 "--no-progress", "-o", out)
    assert result.exit_code == 0, result.output
    assert "rolling (window 32)" in result.output and "bits_per_byte" in result.output
    report = json.loads(out.read_text())
    rolling, strided = report["results"]
    assert rolling["method"] == "rolling" and strided["stride"] == 16
    assert rolling["bits_per_byte"] == pytest.approx(
        -rolling["loglikelihood"] / rolling["bytes"] / math.log(2))
    result = run("eval", "perplexity", "-m", folders["gpt2"], "--data",
                 DATA / "documents.jsonl", "--json", "--no-progress", "--max-length", "16")
    assert json.loads(result.output)["results"][0]["max_length"] == 16


def test_cli_perplexity_errors(folders, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    one_error_line(run("eval", "perplexity", "-m", folders["gpt2"], "--data",
                       tmp_path / "bad.jsonl"), "bad.jsonl:2", "--text-key")
    one_error_line(run("eval", "perplexity", "-m", folders["gpt2"], "--data",
                       DATA / "documents.jsonl", "--stride", "99"), "--stride")
    (tmp_path / "empty.txt").write_text("")
    one_error_line(run("eval", "perplexity", "-m", folders["gpt2"], "--data",
                       tmp_path / "empty.txt"), "no text")
