"""Training refuses bad input up front, in one line, and loses nothing: every setting
checked before the first step, memory before allocating, data that is not a file or
lies in the run folder, the sample without special tokens, the lines --no-progress
prints, and the handlers fit() installs and restores."""

import json
import os
import re
import signal

import numpy as np
import pytest
from tinylm.errors import ConfigError
from tinylm.models import GPT2Config
from tinylm.objectives import EOT
from tinylm.train import TrainConfig, Trainer, check_memory
from train_helpers import TINY_CLI as TINY, run_cli as run, tiny_config, train_cli
from train_helpers import write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def train(tmp_path, corpus, *args, out="run"):
    return train_cli(tmp_path, corpus, tmp_path / out, *args)


def one_line_error(result, *parts):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: "), line
    for part in parts:
        assert part in line, line
    return line


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("setting, message", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"beta1": 1.0}, "beta1 must be in [0, 1)"),
    ({"beta2": -0.1}, "beta2 must be in [0, 1)"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"min_lr": 0.1}, "min_lr must be in [0, lr = 0.001]"),
    ({"min_lr": -1e-5}, "min_lr must be in [0, lr"),
    ({"warmup_steps": 50, "lr_decay_steps": 10}, "warmup_steps = 50 is more than"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"lr": float("nan")}, "lr must be a finite number, got nan"),
    ({"lr": float("inf")}, "lr must be a finite number, got inf"),
    ({"eps": float("nan")}, "eps must be a finite number"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"grad_clip": float("inf")}, "grad_clip must be a finite number"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
    ({"model": {"dropout": float("nan")}}, "model.dropout must be a finite number"),
    ({"model": {"positional_options": {"base": float("inf")}}},
     "model.positional_options.base must be a finite number"),
    ({"vocab_size": 0}, "vocab_size must be >= 1"),
    ({"lr_decay_steps": -1}, "lr_decay_steps must be >= 0"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"half": True}, "half = true needs device = 'cuda'"),
    ({"text_field": " "}, "text_field must not be empty"),
    ({"data": [3]}, "data must be a list of paths"),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v)))
def test_every_setting_is_checked_when_the_config_is_made(setting, message):
    with pytest.raises(ConfigError, match="invalid training config: .*" + re.escape(message)):
        TrainConfig(**setting)


@pytest.mark.parametrize("setting, message", [
    ("model.norm_eps=-1", "norm_eps must be > 0"),
    ("model.init_std=-1", "init_std must be >= 0"),
    ("model.norm_eps=nan", "norm_eps must be a finite number"),
    ("model.attn_scale=0", "attn_scale must be > 0"),
    ("model.d_ff=0", "d_ff must be positive"),
    ("model.head_dim=-8", "head_dim must be positive"),
    ("model.moe_aux_coef=-1", "moe_aux_coef must be >= 0"),
])
def test_model_fields_are_checked_before_the_first_step(tmp_path, corpus, setting, message):
    one_line_error(train(tmp_path, corpus, "-s", setting), message)
    assert not (tmp_path / "run").exists()  # the folder it made is gone again


@pytest.mark.parametrize("setting", ["temperature=-0.5", "seed=-1", "lr=nan", "beta2=inf",
                                     "min_lr=1"])
def test_bad_settings_fail_before_anything_is_written(tmp_path, corpus, setting):
    line = one_line_error(train(tmp_path, corpus, "-s", setting), "invalid training config")
    assert setting.split("=")[0] in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_the_model_config_train_builds_is_checked_once_more(tmp_path, corpus):
    """Through the Trainer (not the CLI): a bad [model] field fails in setup, before
    any step, and nothing is saved."""
    cfg = tiny_config(tmp_path, corpus, model={"n_layer": 1, "n_head": 2, "d_model": 16,
                                               "norm_eps": -1.0})
    with pytest.raises(ConfigError, match="norm_eps must be > 0"):
        Trainer(cfg).fit()
    assert not (tmp_path / "run").exists()


def test_half_on_the_cpu_is_refused_with_the_reason(tmp_path, corpus):
    one_line_error(train(tmp_path, corpus, "--half"), "needs device = 'cuda'", "float16")


# --------------------------------------------------------------------------- memory


def test_a_model_too_big_for_memory_is_refused_before_it_is_allocated(tmp_path, corpus):
    line = one_line_error(train(tmp_path, corpus, "--d-model", "100000", "--n-layer", "100"),
                          "parameters and needs about", "available")
    assert "TB" in line  # 12e12 parameters x 16 bytes
    assert not (tmp_path / "run").exists()


def test_check_memory_compares_with_what_is_available(monkeypatch):
    import tinylm.models.info as info

    config = GPT2Config(vocab_size=100, d_model=64, n_layer=2, n_head=2, max_positions=16)
    train = TrainConfig(batch_size=2, block_size=16)
    need = info.training_bytes(config, 2, 16)
    assert need > 4 * 4 * info.parameter_counts(config)["total"]  # + activations
    monkeypatch.setattr(info, "available_memory", lambda: need)
    check_memory(config, train)  # just fits
    monkeypatch.setattr(info, "available_memory", lambda: need - 1)
    with pytest.raises(ConfigError, match=f"{info.parameter_counts(config)['total']:,} "
                                          f"parameters and needs about"):
        check_memory(config, train)
    monkeypatch.setattr(info, "available_memory", lambda: None)  # unknown: not refused
    check_memory(config, train)


# --------------------------------------------------------------------------- data and folders


@pytest.mark.parametrize("make, message", [
    (lambda p: os.devnull, "is a character device, not a regular file"),
    (lambda p: (os.mkfifo(p / "fifo"), p / "fifo")[1], "is a FIFO, not a regular file"),
    (lambda p: ((p / "d").mkdir(), (p / "d" / "a.txt").write_text("x" * 999),
                os.symlink(p / "nowhere", p / "d" / "z.txt"), p / "d")[3],
     "is a broken symbolic link"),
], ids=["dev-null", "fifo", "broken-link"])
def test_data_that_is_not_a_regular_file(tmp_path, make, message):
    if message.startswith("is a FIFO") and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    one_line_error(train(tmp_path, make(tmp_path)), message)
    assert not (tmp_path / "run").exists()


def test_data_inside_the_run_folder_is_refused(tmp_path, corpus):
    assert train(tmp_path, corpus).exit_code == 0
    one_line_error(train(tmp_path, tmp_path / "run"), "is inside the run folder")
    one_line_error(train(tmp_path, tmp_path / "run" / "metrics.jsonl"), "inside the run folder")


def test_a_run_folder_inside_the_data_folder_is_not_read_as_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_corpus(data / "corpus.txt")
    out = "data/run"
    first = train(tmp_path, data, out=out)
    assert first.exit_code == 0, first.output
    again = run("train", "--data", data, "--out", tmp_path / out, "--max-steps", 4, *TINY,
                "--cache-dir", tmp_path / "cache")
    assert again.exit_code == 0, again.output
    assert "resuming from step 2" in again.output
    assert "data: " in first.output and "changed" not in again.output


def test_a_cache_dir_that_is_a_file(tmp_path, corpus):
    (tmp_path / "file").write_text("x")
    result = run("train", "--data", corpus, "--out", tmp_path / "run", "--cache-dir",
                 tmp_path / "file", *TINY)
    one_line_error(result, "cannot create the cache folder", "Not a directory")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- what it prints


def test_no_progress_prints_the_log_lines(tmp_path, corpus):
    result = train(tmp_path, corpus, "--max-steps", 4, "--log-every", 2)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if ": loss " in line]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("tokens/s" in line and "lr " in line for line in lines)


def test_the_sample_shows_no_special_tokens_and_stops_at_the_end_of_text(tmp_path, monkeypatch):
    import tinylm.generate as generate

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):  # several documents: the sample starts after an end-of-text
        write_corpus(docs / f"{i}.txt", n_words=1500, seed=i)
    trainer = Trainer(tiny_config(tmp_path, docs, max_steps=1)).setup()
    eot = trainer.tokenizer.token_to_id(EOT)
    calls = []
    real = generate.sample

    def spy(model, ids, n, **kw):
        calls.append((list(ids), kw.get("eos_id")))
        return [trainer.tokenizer.encode("the cat")[0], eot, *real(model, ids, n, **kw)]

    monkeypatch.setattr(generate, "sample", spy)
    text = trainer.sample_text(40)
    assert calls == [([eot], eot)]  # asked to stop at the end of the text
    assert EOT not in text and text.startswith("t")
    monkeypatch.setattr(generate, "sample", real)
    for _ in range(3):
        assert EOT not in trainer.sample_text(60)


def test_fit_restores_the_signal_handlers_it_installed(tmp_path, corpus):
    def mine(signum, frame):
        pass

    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        seen = {}
        trainer = Trainer(tiny_config(tmp_path, corpus, max_steps=2))
        step = trainer.train_step

        def spy(batches):
            seen.update({s: signal.getsignal(s) for s in before})
            return step(batches)

        trainer.train_step = spy
        trainer.fit()
        assert all(h is not mine for h in seen.values())  # both were replaced while training
        assert all(signal.getsignal(s) is mine for s in before)  # and put back
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------- resume


def test_resume_hashes_each_checkpoint_file_once(tmp_path, corpus, monkeypatch):
    import tinylm.rundir as rundir

    assert train(tmp_path, corpus).exit_code == 0
    hashed = []
    real = rundir.sha256_file
    monkeypatch.setattr(rundir, "sha256_file", lambda p: hashed.append(os.path.basename(p))
                        or real(p))
    result = train(tmp_path, corpus, "--max-steps", 3)
    assert result.exit_code == 0 and "resuming from step 2" in result.output
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    files = sorted(state["files"])
    assert sorted(hashed[:len(files)]) == files  # checked before training on, each once,
    assert sorted(hashed[len(files):]) == files  # then hashed by the save at step 3 only


def test_info_reports_the_model_train_builds(tmp_path, corpus):
    path = tmp_path / "run.toml"
    path.write_text(f'out_dir = "{tmp_path / "run"}"\ndata = ["corpus.txt"]\n'
                    f'cache_dir = "{tmp_path / "cache"}"\ntokenizer = "char"\nblock_size = 16\n'
                    f'batch_size = 4\nmax_steps = 1\neval_every = 1\neval_iters = 1\n'
                    f'sample_tokens = 0\n[model]\narchitecture = "gpt2"\nn_layer = 2\n'
                    f'n_head = 2\nd_model = 32\n')
    info = run("info", path, "--json")
    assert info.exit_code == 0, info.output
    record = json.loads(info.stdout)
    assert run("train", "--config", path, "--no-progress").exit_code == 0
    from tinylm.rundir import load_model_dir

    model, tok = load_model_dir(tmp_path / "run")
    assert record["config"] == model.config.to_dict()
    assert record["parameters"]["total"] == model.num_parameters()
    assert record["config"]["vocab_size"] == tok.vocab_size < 50  # the data's characters
    assert (record["batch_size"], record["seq_len"]) == (4, 16)
    assert np.isfinite(record["activation_bytes"]["total"])
