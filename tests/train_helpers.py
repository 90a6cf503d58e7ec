"""Small corpora and configs for the data, objective and training tests."""

from __future__ import annotations

import numpy as np

from tinylm.train import TrainConfig

WORDS = ("the cat sat on a mat and the dog ran to see what it was , then both went "
         "home for tea while rain fell over the quiet town .").split()


def corpus_text(n_words: int = 3000, seed: int = 0) -> str:
    """Pseudo-English with real structure to learn (word spellings, spaces)."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, n_words)
    lines = [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


def write_corpus(path, n_words: int = 3000, seed: int = 0):
    path.write_text(corpus_text(n_words, seed), encoding="utf-8")
    return path


def tiny_config(tmp_path, corpus, **overrides) -> TrainConfig:
    """A model small enough that a step takes a few milliseconds."""
    settings = dict(
        out_dir=str(tmp_path / "run"), data=[str(corpus)], cache_dir=str(tmp_path / "cache"),
        block_size=16, batch_size=4, max_steps=20, lr=3e-3, warmup_steps=5, eval_every=10,
        eval_iters=2, log_every=1, sample_tokens=0, seed=7,
        model={"n_layer": 1, "n_head": 2, "d_model": 16},
    )
    settings.update(overrides)
    return TrainConfig(**settings)


# options of a `tinylm train` command line for a model as small as tiny_config's
TINY_CLI = ["--block-size", "16", "--batch-size", "4", "--n-layer", "1", "--n-head", "2",
            "--d-model", "16", "--eval-iters", "1", "--sample-tokens", "0", "--no-progress"]


def run_cli(*args):
    """``tinylm ARGS`` through Click's test runner (paths may be Path objects)."""
    from click.testing import CliRunner

    from tinylm.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="tinylm")


def train_cli(tmp_path, corpus, out, *args):
    """A 2-step ``tinylm train`` of ``corpus`` into ``out`` (cache under tmp_path)."""
    return run_cli("train", "--data", corpus, "--out", out, "--cache-dir", tmp_path / "cache",
                   "--max-steps", 2, "--eval-every", 2, *TINY_CLI, *args)
