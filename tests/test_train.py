"""The Trainer: learning, gradient accumulation, divergence, checkpoints, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tinylm import checkpoint
from tinylm.errors import CheckpointError
from tinylm.models.config import ConfigError
from tinylm.rundir import MODEL_FILE, STATE_FILE, load_model_dir, read_checkpoint_state
from tinylm.rundir import read_metrics
from tinylm.train import TrainConfig, Trainer, TrainingDiverged
from train_helpers import tiny_config, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if "loss" in r}


def weights(run_dir):
    return checkpoint.load_file(os.path.join(run_dir, MODEL_FILE))


# --------------------------------------------------------------------------- learning


def test_loss_falls_and_the_run_is_saved(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, max_steps=60, eval_every=30, lr=1e-2)
    result = Trainer(cfg).fit()
    curve = losses(cfg.out_dir)
    assert np.mean([curve[s] for s in range(1, 6)]) - np.mean(
        [curve[s] for s in range(56, 61)]) > 0.5
    assert result["step"] == 60 and result["val_loss"] < curve[1]
    assert result["best_val_loss"] == result["val_loss"]
    records = read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"))
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [30, 60]
    assert vals[-1]["val_ppl"] == pytest.approx(np.exp(vals[-1]["val_loss"]))
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    model, tok = load_model_dir(cfg.out_dir)
    assert model.config.vocab_size == tok.vocab_size
    state = read_checkpoint_state(cfg.out_dir)
    assert state["step"] == 60 and state["config"]["max_steps"] == 60


@pytest.mark.parametrize("family, objective", [
    ("llama", "causal-lm"), ("gpt", "prefix-lm"), ("bert", "masked-lm"),
    ("t5", "span-corruption"),
])
def test_every_family_trains_with_its_objective(tmp_path, corpus, family, objective):
    messages = []
    cfg = tiny_config(tmp_path, corpus, family=family, objective=objective, max_steps=30,
                      eval_every=30, sample_tokens=5, lr=1e-2)
    result = Trainer(cfg, log=messages.append).fit()
    curve = losses(cfg.out_dir)
    assert np.mean([curve[s] for s in range(1, 4)]) - np.mean(
        [curve[s] for s in range(28, 31)]) > 0.3  # it learns
    assert result["val_loss"] < curve[1]
    state = read_checkpoint_state(cfg.out_dir)
    assert state["objective"] == objective and state["step"] == 30
    model, _ = load_model_dir(cfg.out_dir)
    assert model.config.architecture == {"gpt": "gpt2"}.get(family, family)
    samples = [m for m in messages if " sample " in m]
    assert len(samples) == (1 if family in ("llama", "gpt") else 0)  # decoders only


def test_packed_sampling_and_bpe_tokenizer(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, sampling="packed", tokenizer="bpe", vocab_size=300,
                      max_steps=3)
    trainer = Trainer(cfg)
    trainer.fit()
    _, tok = load_model_dir(cfg.out_dir)
    assert type(tok).__name__ == "BPETokenizer" and tok.vocab_size <= 300
    assert tok.encode("the cat sat") != list(range(len("the cat sat")))  # merges, not bytes
    position = read_checkpoint_state(cfg.out_dir)["data"]["position"]
    assert position["mode"] == "packed"
    n_windows = trainer.batcher.n_windows  # 3 steps x 4 back-to-back windows, each once
    assert position["epoch"] * n_windows + position["index"] == 3 * cfg.batch_size
    windows = trainer.train_tokens[:n_windows * trainer.window].reshape(n_windows, -1)
    first = Trainer(tiny_config(tmp_path / "again", corpus, sampling="packed", tokenizer="bpe",
                                vocab_size=300, max_steps=3)).setup().batcher.next()
    assert all(any(np.array_equal(row, w) for w in windows) for row in first)


# --------------------------------------------------------------------------- caller-built parts


def test_a_caller_built_model_with_frozen_parameters_trains_and_resumes(tmp_path, corpus):
    """What fine-tuning does: a model loaded from a Hugging Face folder, part frozen,
    handed to the Trainer with its tokenizer and the caller's own token ids."""
    import tinylm
    from tinylm.models import Decoder, GPT2Config
    from tinylm.objectives import EOT
    from tinylm.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train(corpus.read_text(), special_tokens=[EOT])
    tinylm.seed(0)
    Decoder(GPT2Config(vocab_size=tok.vocab_size, d_model=16, n_layer=1, n_head=2,
                       max_positions=16)).save_pretrained(tmp_path / "hf")
    ids = np.asarray(tok.encode(corpus.read_text()), dtype=np.int64)

    def parts():
        model = tinylm.load_pretrained(tmp_path / "hf")
        model.tok_emb.weight.requires_grad = False
        return {"model": model, "tokenizer": tok, "data": ids}

    cfg = dict(max_steps=12, eval_every=6, family="llama")  # the family is the model's
    first = Trainer(tiny_config(tmp_path, corpus, **cfg), **parts())
    step = first.train_step

    def stop_at_6(batches):
        out = step(batches)
        if first.step == 5:
            first.request_stop()
        return out

    first.train_step = stop_at_6
    assert first.fit()["step"] == 6
    frozen = first.model.tok_emb.weight.data.copy()
    resumed = Trainer(tiny_config(tmp_path, corpus, **cfg), **parts())
    ran = []
    resumed.train_step = lambda batches, step=resumed.train_step: ran.append(1) or step(batches)
    result = resumed.fit()
    assert result["step"] == 12 and len(ran) == 6
    assert resumed.objective_name == "causal-lm"
    state = {n: p.data for n, p in resumed.model.named_parameters()}
    original = tinylm.load_pretrained(tmp_path / "hf")
    assert np.array_equal(state["tok_emb.weight"], frozen)  # frozen all along
    assert np.array_equal(frozen, original.tok_emb.weight.data)
    assert not np.array_equal(state["transformer.norm.weight"],
                              original.transformer.norm.weight.data)  # the rest trained
    saved, _ = load_model_dir(tmp_path / "run")
    assert saved.config.architecture == "gpt2"  # the caller's model, not the config's family
    assert losses(tmp_path / "run")[12] < losses(tmp_path / "run")[1]


def test_trainer_from_config_is_the_plain_constructor(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, max_steps=2)
    trainer = Trainer.from_config(cfg).setup(resume=False)
    assert trainer.model.config.vocab_size == trainer.tokenizer.vocab_size
    assert trainer.objective_name == "causal-lm"


# --------------------------------------------------------------------------- accumulation


def test_grad_accumulation_equals_one_big_batch(tmp_path, corpus):
    big = Trainer(tiny_config(tmp_path / "a", corpus, batch_size=8, grad_clip=0.0)).setup()
    small = Trainer(tiny_config(tmp_path / "b", corpus, batch_size=4, grad_accum=2,
                                grad_clip=0.0)).setup()
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        assert np.array_equal(a.data, b.data)  # same seed, same initial weights
    for _ in range(3):
        windows = big.batcher.next()  # (8, window)
        rng = np.random.default_rng(0)
        loss8, norm8 = big.train_step([big.objective.make_batch(windows, rng)])
        loss4, norm4 = small.train_step([small.objective.make_batch(windows[:4], rng),
                                         small.objective.make_batch(windows[4:], rng)])
        assert loss4 == pytest.approx(loss8, rel=1e-5)
        assert norm4 == pytest.approx(norm8, rel=1e-4)
    for p, q in zip(big.optimizer._all_params(), small.optimizer._all_params()):
        m8, m4 = big.optimizer.state[p]["exp_avg"], small.optimizer.state[q]["exp_avg"]
        np.testing.assert_allclose(m4, m8, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(q.data, p.data, rtol=1e-4, atol=1e-6)


def test_masked_lm_accumulation_weights_micro_batches_by_their_targets(tmp_path, corpus):
    cfg = dict(family="bert", batch_size=8, grad_clip=0.0)
    big = Trainer(tiny_config(tmp_path / "a", corpus, **cfg)).setup()
    small = Trainer(tiny_config(tmp_path / "b", corpus, **{**cfg, "batch_size": 4,
                                                          "grad_accum": 2})).setup()
    batch = big.objective.make_batch(big.batcher.next(), np.random.default_rng(3))
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    assert big.objective.n_targets(halves[0]) != big.objective.n_targets(halves[1])
    loss8, _ = big.train_step([batch])
    loss4, _ = small.train_step(halves)
    assert loss4 == pytest.approx(loss8, rel=1e-5)


# --------------------------------------------------------------------------- divergence


def test_nan_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, max_steps=20, eval_every=5)
    trainer = Trainer(cfg).setup()
    good_loss = trainer.objective.loss

    def poisoned(model, batch):
        loss = good_loss(model, batch)
        return loss * float("nan") if trainer.step >= 12 else loss

    trainer.objective.loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at step 13; the last good "
                                               r"checkpoint \(step 10\) is in .*untouched"):
        trainer.fit()
    state = read_checkpoint_state(cfg.out_dir)  # verifies every file's hash too
    assert state["step"] == 10
    events = [r for r in read_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"))
              if r.get("event") == "diverged"]
    assert events and events[0]["step"] == 13
    before = {k: v.copy() for k, v in weights(cfg.out_dir).items()}
    resumed = Trainer(tiny_config(tmp_path, corpus, max_steps=20, eval_every=5)).setup()
    assert resumed.step == 10
    for name, value in weights(cfg.out_dir).items():
        assert np.array_equal(value, before[name])


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, corpus, family):
    # dropout uses the backend RNG, masked-lm the objective's: both must resume exactly
    settings = dict(family=family, max_steps=24, eval_every=8, lr_decay_steps=24,
                    model={"n_layer": 1, "n_head": 2, "d_model": 16, "dropout": 0.1})
    straight = tiny_config(tmp_path / "straight", corpus, **settings)
    Trainer(straight).fit()

    broken = tiny_config(tmp_path / "broken", corpus, **settings)
    trainer = Trainer(broken).setup()
    step = trainer.train_step

    def ctrl_c_at_13(batches):
        out = step(batches)
        if trainer.step == 12:  # about to become 13: what Ctrl-C does mid-run
            trainer.request_stop()
        return out

    trainer.train_step = ctrl_c_at_13
    result = trainer.fit()
    assert result["interrupted"] and result["step"] == 13
    assert read_checkpoint_state(broken.out_dir)["step"] == 13
    resumed = Trainer(tiny_config(tmp_path / "broken", corpus, **settings))
    ran = []
    resumed.train_step = lambda batches, step=resumed.train_step: ran.append(1) or step(batches)
    result = resumed.fit()
    assert result["step"] == 24 and not result["interrupted"]
    assert len(ran) == 24 - 13  # it went on from step 13, not from 0

    assert losses(broken.out_dir) == losses(straight.out_dir)  # every step, bit for bit
    a, b = weights(straight.out_dir), weights(broken.out_dir)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _cli(args, env=None):
    code = "import sys; from tinylm.cli import main; main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": ROOT, "TINYLM_LOAD_PLUGINS": "",
           "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    return [sys.executable, "-c", code, *args], env


def test_sigkill_mid_run_then_resume_gives_the_same_weights(tmp_path, corpus):
    common = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--block-size",
              "16", "--batch-size", "4", "--n-layer", "1", "--n-head", "2", "--d-model", "16",
              "--lr-decay-steps", "300", "--eval-every", "10", "--eval-iters", "1",
              "--checkpoint-every", "10", "--sample-tokens", "0", "--seed", "3",
              "--log-every", "1", "--no-progress"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")

    # a run told to go on for ever, SIGKILLed once it has checkpointed twice (the
    # schedule depends on the step and --lr-decay-steps only, not on --max-steps)
    args, env = _cli(["train", *common, "--max-steps", "1000000", "--out", killed])
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = os.path.join(killed, STATE_FILE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                with open(state_file) as f:
                    if json.load(f)["step"] >= 20:
                        break
            except (OSError, ValueError):
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    saved = read_checkpoint_state(killed)["step"]
    assert saved >= 20
    end = str(saved + 60)  # resume past the kill; the uninterrupted run goes as far

    args, env = _cli(["train", *common, "--max-steps", end, "--out", straight])
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=300)
    args, env = _cli(["train", *common, "--max-steps", end, "--out", killed])
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"resuming from step {saved}" in out.stderr
    steps = [int(line.split()[1].split("/")[0]) for line in out.stderr.splitlines()
             if line.startswith("step ") and ": loss " in line]
    assert steps == list(range(saved + 1, saved + 61))  # exactly the steps after the kill
    a, b = weights(straight), weights(killed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with open(os.path.join(straight, MODEL_FILE), "rb") as f1, \
            open(os.path.join(killed, MODEL_FILE), "rb") as f2:
        assert f1.read() == f2.read()  # the files too, byte for byte
    assert losses(killed) == losses(straight)


# --------------------------------------------------------------------------- checkpoints


def test_truncated_checkpoint_file_is_a_clear_error(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, max_steps=4, eval_every=2)
    Trainer(cfg).fit()
    path = os.path.join(cfg.out_dir, MODEL_FILE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    message = rf"checkpoint file .*{MODEL_FILE} is truncated: {size - 100} bytes, the " \
              rf"checkpoint recorded {size}"
    with pytest.raises(CheckpointError, match=message):
        Trainer(tiny_config(tmp_path, corpus, max_steps=8)).fit()
    with pytest.raises(CheckpointError, match=message):
        load_model_dir(cfg.out_dir)
    with open(path, "r+b") as f:  # the right size but other bytes
        f.truncate(size)
    with pytest.raises(CheckpointError, match="is damaged: its SHA-256 differs"):
        read_checkpoint_state(cfg.out_dir)
    with open(os.path.join(cfg.out_dir, STATE_FILE), "w") as f:
        f.write('{"step": 4, "conf')
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE} is damaged or truncated"):
        read_checkpoint_state(cfg.out_dir)


def test_interrupted_save_keeps_or_completes_a_whole_checkpoint(tmp_path, corpus, monkeypatch):
    import tinylm.train as train_module

    cfg = tiny_config(tmp_path, corpus, max_steps=4, eval_every=2)
    trainer = Trainer(cfg).setup()
    trainer.fit()
    assert read_checkpoint_state(cfg.out_dir)["step"] == 4
    trainer.config.max_steps = 6

    # a crash while writing the set (before the rename): the old checkpoint stays
    real_save = checkpoint.save_file

    def crash(tensors, path, **kw):
        if "optimizer" in str(path):
            raise KeyboardInterrupt
        return real_save(tensors, path, **kw)

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert not [n for n in os.listdir(cfg.out_dir) if n.startswith("ckpt.")]
    assert read_checkpoint_state(cfg.out_dir)["step"] == 4

    # a crash in the middle of moving the complete set into place: rolled forward
    real_replace = os.replace
    moved = []

    def crash_after_first_move(src, dst):
        if os.path.basename(os.path.dirname(src)) == "ckpt.new":
            if moved:
                raise KeyboardInterrupt
            moved.append(dst)
        return real_replace(src, dst)

    trainer.step, trainer.last_saved_step = 5, 4
    monkeypatch.setattr(train_module.os, "replace", crash_after_first_move)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(train_module.os, "replace", real_replace)
    assert os.path.isdir(os.path.join(cfg.out_dir, "ckpt.new"))
    assert read_checkpoint_state(cfg.out_dir)["step"] == 5  # finished, verified
    assert not os.path.exists(os.path.join(cfg.out_dir, "ckpt.new"))


def test_resume_refuses_other_settings_and_overwrite_starts_over(tmp_path, corpus):
    Trainer(tiny_config(tmp_path, corpus, max_steps=2)).fit()
    with pytest.raises(ConfigError, match=r"other settings \(block_size\)"):
        Trainer(tiny_config(tmp_path, corpus, max_steps=4, block_size=8)).fit()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        Trainer(tiny_config(tmp_path, corpus)).fit(resume=False)
    result = Trainer(tiny_config(tmp_path, corpus, max_steps=3, block_size=8)).fit(
        overwrite=True)
    assert result["step"] == 3
    assert min(losses(tmp_path / "run")) == 1


def test_config_from_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data = ["text.txt"]\nmax_steps = 7\nlr = 1\n[model]\nn_layer = 2\n'
                    '[objective_options]\nmask_prob = 0.2\n')
    cfg = TrainConfig.from_toml(path)
    assert cfg.data == [str(tmp_path / "text.txt")] and cfg.max_steps == 7
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.model == {"n_layer": 2} and cfg.objective_options == {"mask_prob": 0.2}
    path.write_text("max_step = 7\n")
    with pytest.raises(ConfigError, match=r"unknown training setting\(s\) \['max_step'\]"):
        TrainConfig.from_toml(path)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lr must be float"):
        TrainConfig(lr="fast")


def test_example_config_is_the_nanogpt_recipe():
    cfg = TrainConfig.from_toml(os.path.join(ROOT, "examples", "shakespeare_char.toml"))
    assert (cfg.block_size, cfg.batch_size, cfg.max_steps, cfg.warmup_steps) == (64, 12, 2000,
                                                                                  100)
    assert (cfg.lr, cfg.final_lr, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (
        1e-3, 1e-4, 0.99, 0.1, 1.0)
    assert cfg.model["n_layer"] == 4 and cfg.model["d_model"] == 128
    assert cfg.data[0].endswith("tinyshakespeare.txt")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus, signum, code):
    out = str(tmp_path / "run")
    args, env = _cli(["train", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                      "--block-size", "16", "--batch-size", "4", "--n-layer", "1",
                      "--n-head", "2", "--d-model", "16", "--max-steps", "1000000",
                      "--checkpoint-every", "5", "--eval-every", "1000000", "--no-progress",
                      "--out", out])
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(os.path.join(out, STATE_FILE)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    step = read_checkpoint_state(out)["step"]
    name = signal.Signals(signum).name
    assert f"interrupted ({name}) at step {step}: checkpoint saved in {out}" in err


def test_trains_and_samples_on_each_device(tmp_path, corpus, device):
    cfg = tiny_config(tmp_path, corpus, device=device, max_steps=4, eval_every=2,
                      sample_tokens=5)
    result = Trainer(cfg).fit()
    assert np.isfinite(result["val_loss"])
    model, _ = load_model_dir(cfg.out_dir, device)
    assert next(iter(model.parameters())).device == device
    resumed = Trainer(tiny_config(tmp_path, corpus, device=device, max_steps=6,
                                  eval_every=2)).fit()
    assert resumed["step"] == 6


def test_resume_options_go_with_a_folder_the_trainer_opens(tmp_path, corpus):
    from tinylm.rundir import open_run

    cfg = tiny_config(tmp_path, corpus, max_steps=1)
    with open_run(cfg.out_dir) as run:
        with pytest.raises(ConfigError, match="pass them to open_run"):
            Trainer(cfg).setup(run, resume=False)
    Trainer(cfg).fit(resume=False)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        Trainer(cfg).setup(resume=False)
