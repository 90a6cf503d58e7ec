"""The run folder: refusing folders that are not runs, the lock, cleaning up after a
failed start, file permissions, and readers during a commit."""

import json
import os
import subprocess
import sys
import time

import pytest
from tinylm.errors import CheckpointError
from tinylm.rundir import (
    LOCK_FILE, NEW_DIR, RUN_FILES, STATE_FILE, RunInUse, RunLock, open_run, read_checkpoint_state,
    settle,
)
from tinylm.train import Trainer
from train_helpers import tiny_config, train_cli as train, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def hf_folder(path):
    """What a Hugging Face checkpoint folder looks like to tinylm."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16}))
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (path / "tokenizer.json").write_text("{}")
    (path / "README.md").write_text("my model\n")
    return {p.name: p.read_bytes() for p in path.iterdir()}


# --------------------------------------------------------------------------- not a run


def test_a_hugging_face_folder_is_refused_and_kept_even_with_overwrite(tmp_path, corpus):
    out = tmp_path / "hf"
    before = hf_folder(out)
    result = train(tmp_path, corpus, out)
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {out} is not empty (README.md, config.json, "
                                    f"model.safetensors, tokenizer.json)")
    assert "no checkpoint to resume" in result.output and "--overwrite" in result.output
    result = train(tmp_path, corpus, out, "--overwrite")
    assert result.exit_code == 2
    assert "config.json, model.safetensors, which tinylm did not write" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_a_run_without_its_trainer_state_is_refused(tmp_path, corpus):
    out = tmp_path / "run"
    assert train(tmp_path, corpus, out).exit_code == 0
    os.remove(out / STATE_FILE)
    weights = (out / "model.safetensors").read_bytes()
    result = train(tmp_path, corpus, out)
    assert result.exit_code == 2 and "holds no checkpoint to resume" in result.output
    assert "model.safetensors" in result.output
    assert (out / "model.safetensors").read_bytes() == weights


def test_overwrite_removes_only_the_files_a_run_writes(tmp_path, corpus):
    out = tmp_path / "run"
    assert train(tmp_path, corpus, out).exit_code == 0
    os.remove(out / STATE_FILE)  # a run tinylm wrote, its state lost
    (out / "notes.txt").write_text("keep me")
    (out / "loss.png").write_bytes(b"png")
    result = train(tmp_path, corpus, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "keep me" and (out / "loss.png").exists()
    assert read_checkpoint_state(out)["step"] == 2


def test_a_failed_runs_metrics_alone_do_not_block_a_new_run(tmp_path, corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "event": "diverged"}\n')
    result = train(tmp_path, corpus, out)
    assert result.exit_code == 0, result.output
    assert "diverged" not in (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "is a file, not a folder"),
    (lambda p: None, "cannot create the run folder"),
], ids=["file", "under-a-file"])
def test_out_that_is_a_file_or_under_one_is_one_line(tmp_path, corpus, make, message):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if message.startswith("is a") else tmp_path / "f" / "run"
    result = train(tmp_path, corpus, out)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root may write anywhere")
def test_an_unwritable_out_is_one_line(tmp_path, corpus):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = train(tmp_path, corpus, out)
    finally:
        out.chmod(0o700)
    assert result.exit_code == 2 and "cannot write in the run folder" in result.output


def test_a_failed_start_removes_the_folder_it_made(tmp_path, corpus):
    out = tmp_path / "new" / "run"
    result = train(tmp_path, corpus, out, "--block-size", "40000")  # fails after the lock
    assert result.exit_code == 2 and "the train split has" in result.output
    assert not (tmp_path / "new").exists()
    (tmp_path / "there").mkdir()
    train(tmp_path, corpus, tmp_path / "there", "--block-size", "40000")
    assert (tmp_path / "there").is_dir() and not os.listdir(tmp_path / "there")  # kept


def test_saved_files_get_the_usual_permissions(tmp_path, corpus):
    mask = os.umask(0o022)
    os.umask(mask)
    out = tmp_path / "run"
    assert train(tmp_path, corpus, out).exit_code == 0
    for name in RUN_FILES:
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


# --------------------------------------------------------------------------- the lock


def _hold_lock(folder):
    """A process that takes the run's lock and waits (killed by the test)."""
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from tinylm.rundir import RunLock;"
            f" RunLock({str(folder)!r}).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_the_same_folder_fails_naming_the_holder(tmp_path, corpus):
    out = tmp_path / "run"
    out.mkdir()
    proc = _hold_lock(out)
    try:
        result = train(tmp_path, corpus, out)
        assert result.exit_code == 2
        assert f"is in use: pid {proc.pid} on" in result.output
        with pytest.raises(RunInUse, match=f"pid {proc.pid}"):
            Trainer(tiny_config(tmp_path, corpus, out_dir=str(out))).fit()
        assert not (out / STATE_FILE).exists()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    result = train(tmp_path, corpus, out)  # the lock died with its process
    assert result.exit_code == 0, result.output
    assert not (out / LOCK_FILE).exists()  # and a finished run leaves none


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    lock = RunLock(tmp_path)
    with lock:
        with RunLock(tmp_path):
            assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
        assert lock.held
    assert not lock.held and not (tmp_path / LOCK_FILE).exists()


def test_open_run_refuses_by_resume_mode(tmp_path, corpus):
    with pytest.raises(CheckpointError, match="has no checkpoint to resume"):
        with open_run(tmp_path / "a", resume=True):
            pass
    assert not (tmp_path / "a").exists()
    Trainer(tiny_config(tmp_path, corpus, max_steps=1)).fit()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        with open_run(tmp_path / "run", resume=False):
            pass
    with open_run(tmp_path / "run") as run:
        assert run.state["step"] == 1 and not run.created


def test_a_reader_waits_for_a_commit_in_progress(tmp_path, corpus):
    Trainer(tiny_config(tmp_path, corpus, max_steps=1)).fit()
    out = tmp_path / "run"
    (out / NEW_DIR).mkdir()
    proc = _hold_lock(out)  # a trainer in the middle of its commit
    try:
        start = time.monotonic()
        settle(out, wait_s=0.3)  # does not touch the set while its writer lives
        assert time.monotonic() - start >= 0.3 and (out / NEW_DIR).is_dir()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    os.rmdir(out / NEW_DIR)
    assert read_checkpoint_state(out)["step"] == 1
