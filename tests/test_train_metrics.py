"""The Trainer's metrics hook: what an objective's loss() puts in ``self.metrics``."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm.objectives import IGNORE, CausalLM
from tinylm.rundir import read_metrics
from tinylm.train import Trainer

from train_helpers import tiny_config, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt", n_words=800)


class Reporting(CausalLM):
    """Causal LM that reports the mean target id and the batch's row count."""

    name = "reporting"
    progress_metrics = ("a/mean_target",)

    def loss(self, model, batch):
        t = batch["targets"]
        self.metrics = {"a/mean_target": float(t[t != IGNORE].mean()), "rows": len(t)}
        return super().loss(model, batch)


def test_step_metrics_are_the_weighted_mean_of_the_micro_batches(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, batch_size=4, grad_accum=2, max_steps=3,
                      eval_every=3)
    trainer = Trainer(cfg, objective=Reporting())
    trainer.setup(resume=False)
    windows = trainer.batcher.next()
    rng = np.random.default_rng(0)
    a = trainer.objective.make_batch(windows[:3], rng)
    b = trainer.objective.make_batch(windows[3:], rng)
    trainer.train_step([a, b])
    # counts 3 x 16 and 1 x 16 targets: weights 3/4 and 1/4
    want = 0.75 * a["targets"].mean() + 0.25 * b["targets"].mean()
    assert trainer.step_metrics["a/mean_target"] == pytest.approx(want, rel=1e-12)
    assert trainer.step_metrics["rows"] == pytest.approx(0.75 * 3 + 0.25 * 1)


def test_metrics_reach_metrics_jsonl_and_evaluation_gets_the_eval_prefix(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, max_steps=3, eval_every=3)
    lines = []
    Trainer(cfg, objective=Reporting(), log=lines.append).fit(resume=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["rows"] == 4 for r in steps)
    assert all(0 <= r["a/mean_target"] < 1e6 for r in steps)
    assert len(evals) == 1 and "eval_a/mean_target" in evals[0] and "eval_rows" in evals[0]
    assert any("a/mean_target" in line and "rows" not in line for line in lines
               if line.startswith("step 3/3"))


def test_an_objective_without_metrics_adds_none(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, max_steps=2, eval_every=2)
    Trainer(cfg).fit(resume=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert not any(k.startswith("eval_") for r in records for k in r)


class NoPerplexity(Reporting):
    name = "no-perplexity"
    perplexity = False


def test_an_objective_without_perplexity_reports_none(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, max_steps=2, eval_every=2)
    lines = []
    Trainer(cfg, objective=NoPerplexity(), log=lines.append).fit(resume=False)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert evals and all("val_ppl" not in r and "eval_rows" in r for r in evals)
    assert not [line for line in lines if ", perplexity" in line]
