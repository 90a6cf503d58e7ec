"""`tinylm train`, `tinylm generate` and `tinylm plot` through Click."""

import json
import os

import pytest
from click.testing import CliRunner

from tinylm.cli import cli
from train_helpers import write_corpus

TINY = ["--block-size", "16", "--batch-size", "4", "--n-layer", "1", "--n-head", "2",
        "--d-model", "16", "--eval-iters", "2", "--log-every", "2", "--no-progress"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="tinylm")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def trained(tmp_path, corpus):
    out = tmp_path / "run"
    result = run("train", "--data", corpus, "--out", out, "--cache-dir", tmp_path / "cache",
                 "--max-steps", 12, "--eval-every", 6, "--sample-tokens", 20, "--lr", 5e-3,
                 *TINY)
    assert result.exit_code == 0, result.output
    return out, result


def test_train_writes_metrics_checkpoint_and_samples(trained):
    out, result = trained
    assert "step 6: val loss" in result.output and "step 12: val loss" in result.output
    assert "perplexity" in result.output and "sample" in result.output
    assert "done: 12 steps" in result.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    for name in ("model.safetensors", "optimizer.safetensors", "config.json", "tokenizer.txt",
                 "trainer_state.json"):
        assert (out / name).exists()


def test_running_again_resumes_and_extends(trained, tmp_path):
    out, _ = trained
    result = run("train", "--out", out, "--max-steps", 14, "--eval-every", 6, *TINY)
    assert result.exit_code == 0, result.output
    assert "resuming from step 12" in result.output and "done: 14 steps" in result.output
    result = run("train", "--out", out, "--max-steps", 16, "--n-layer", 3)
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and "n_layer" in result.output
    assert "--overwrite" in result.output


def test_generate_prints_a_continuation(trained):
    out, _ = trained
    result = run("generate", "--model", out, "--prompt", "the cat", "-n", 30, "--seed", 1)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("the cat") and len(result.output) > 20
    again = run("generate", "--model", out, "--prompt", "the cat", "-n", 30, "--seed", 1)
    assert again.output == result.output  # seeded
    greedy = run("generate", "--model", out, "--prompt", "the", "-n", 5, "-t", 0)
    assert greedy.exit_code == 0


def test_plot_writes_a_png(trained, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = trained
    result = run("plot", out)
    assert result.exit_code == 0, result.output
    png = out / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run("plot", out, out, "-o", tmp_path / "both.png", "--title", "two")
    assert result.exit_code == 0 and (tmp_path / "both.png").exists()


def test_plot_into_a_folder_names_the_file_it_wrote(trained, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = trained
    (tmp_path / "charts").mkdir()
    result = run("plot", out, "-o", tmp_path / "charts")
    assert result.exit_code == 0, result.output
    png = tmp_path / "charts" / "loss.png"
    assert result.output.strip() == f"wrote {png}"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_output_errors_are_one_line(trained, tmp_path):
    out, _ = trained
    result = run("plot", out, "-o", tmp_path / "missing" / "x.png")
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: cannot write {tmp_path / 'missing' / 'x.png'}: "
                                    f"the folder {tmp_path / 'missing'} does not exist")
    result = run("plot", out, "-o", tmp_path / "x.txt")
    assert result.exit_code == 2 and "-o must end in .png" in result.output
    assert not (tmp_path / "x.txt").exists()


def test_train_from_a_toml_config(tmp_path, corpus):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'out_dir = "{tmp_path / "toml-run"}"\ndata = ["corpus.txt"]\n'
                   f'cache_dir = "{tmp_path / "cache"}"\nmax_steps = 3\nblock_size = 16\n'
                   f'batch_size = 4\neval_every = 3\neval_iters = 1\nsample_tokens = 0\n'
                   f'[model]\nn_layer = 1\nn_head = 2\nd_model = 16\n')
    result = run("train", "--config", cfg, "--no-progress", "-s", "lr=2e-3",
                 "-s", "model.norm=rmsnorm")
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "toml-run" / "trainer_state.json").read_text())
    assert state["config"]["lr"] == 2e-3 and state["config"]["model"]["norm"] == "rmsnorm"
    assert state["config"]["data"] == [str(corpus)]


@pytest.mark.parametrize("args, message", [
    (["--family", "bert", "--objective", "causal-lm"],
     "Error: objective 'causal-lm' trains decoder models, but bert is an encoder; "
     "use --objective masked-lm"),
    (["--family", "gpt", "--objective", "span-corruption"],
     "Error: objective 'span-corruption' trains encoder-decoder models, but gpt2 is a decoder"),
    (["--objective", "masked-lm-x"], "Error: unknown objective 'masked-lm-x'"),
    (["--family", "gpt5"], "Error: unknown architecture 'gpt5'"),
    (["--block-size", "40000"], "Error: the train split has"),
    (["--block-size", "4000"], "Error: the validation split has"),
    (["--tokenizer", "nope"], "Error: unknown tokenizer 'nope'"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, corpus, args, message):
    result = run("train", "--data", corpus, "--out", tmp_path / "bad", "--cache-dir",
                 tmp_path / "cache", "--max-steps", 1, *TINY, *args)
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(message), last
    assert "Traceback" not in result.output


def test_usage_errors(tmp_path, corpus):
    assert run("train", "--data", corpus).exit_code == 2  # no --out
    missing = run("train", "--data", tmp_path / "nope.txt", "--out", tmp_path / "x")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad_set = run("train", "--out", tmp_path / "x", "-s", "lr")
    assert bad_set.exit_code == 2 and "KEY=VALUE" in bad_set.output
    unknown = run("train", "--out", tmp_path / "x", "-s", "learning_rate=1")
    assert unknown.exit_code == 2 and "unknown training setting" in unknown.output
    result = run("generate", "--model", tmp_path / "nowhere", "--prompt", "x")
    assert result.exit_code == 2 and result.output.startswith("Error: ")
    assert "is not a directory" in result.output
    (tmp_path / "empty").mkdir()
    result = run("plot", tmp_path / "empty")
    assert result.exit_code == 2 and "has no metrics.jsonl" in result.output
    result = run("plot", tmp_path / "nowhere", "-o", tmp_path / "nowhere" / "x.png")
    assert result.exit_code == 2 and "nowhere has no metrics.jsonl" in result.output


def test_generate_refuses_an_encoder(tmp_path, corpus):
    out = tmp_path / "bert"
    result = run("train", "--data", corpus, "--out", out, "--cache-dir", tmp_path / "cache",
                 "--family", "bert", "--max-steps", 2, *TINY)
    assert result.exit_code == 0, result.output
    result = run("generate", "--model", out, "--prompt", "the")
    assert result.exit_code == 2 and "does not generate text" in result.output


def test_a_damaged_checkpoint_is_reported_by_generate(trained):
    out, _ = trained
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    result = run("generate", "--model", out, "--prompt", "the")
    assert result.exit_code == 2
    assert "model.safetensors is truncated" in result.output
    assert os.path.exists(out / "trainer_state.json")
