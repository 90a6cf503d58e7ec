"""`tinylm align dpo` end to end on a tiny random GPT-2 saved as a Hugging Face folder:
LoRA (the reference: the base with the adapter off) learning the preferences, TRL's
metrics in metrics.jsonl, a bit-exact resume (LoRA; --full with --precompute-ref),
a frozen copy equal to precomputed log-probs, --ref-logps, and bad input (exit 2,
one line, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from base_helpers import tiny_base, write_jsonl
from cli_helpers import one_error_line, run, run_ok

from tinylm import checkpoint

CHAT = [{"role": "user", "content": "the cat"}]
PAIRS = [
    {"prompt": "the cat", "chosen": " sat on a mat.", "rejected": " ran home."},
    {"prompt": "the dog", "chosen": " ran to see what it was.", "rejected": " sat."},
    {"prompt": "then both", "chosen": " went home for tea.", "rejected": " the mat."},
    {"chosen": CHAT + [{"role": "assistant", "content": "sat on a mat"}],
     "rejected": CHAT + [{"role": "assistant", "content": "went home"}]},
] * 3
FAST = ["--no-progress", "--batch-size", "4", "--log-every", "1", "--eval-every", "3",
        "--chat-template", "chatml", "--seed", "3", "--val-fraction", "0.25"]
TIMING = ("tokens_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base") / "gpt2", dropout=0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "prefs.jsonl", PAIRS)


def dpo(base, data, out, *args):
    return run_ok("align", "dpo", "-m", base, "--data", data, "--out", out, *FAST, *args)


def records(out) -> list:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def losses(out) -> list:
    return [r["loss"] for r in records(out) if "loss" in r]


def test_lora_dpo_learns_the_preferences_with_trls_metrics(base, data, tmp_path):
    out = tmp_path / "lora"
    result = dpo(base, data, out, "--target", "c_attn", "--lr", "3e-2", "--max-steps", "9",
                 "--beta", "0.5")
    assert "data: 12 preference pairs" in result.stderr and "rewards/margins" in result.stderr
    assert f"--adapter {out}" in result.stderr and "perplexity" not in result.stderr
    steps = [r for r in records(out) if "loss" in r]
    evals = [r for r in records(out) if "val_loss" in r]
    assert len(steps) == 9 and [r["step"] for r in evals] == [3, 6, 9]
    names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
             "mean_token_accuracy"}
    assert all(names <= set(r) for r in steps)
    assert all({"eval_" + n for n in names} <= set(r) for r in evals)
    assert steps[0]["loss"] == pytest.approx(np.log(2), rel=1e-6)  # policy = reference
    assert steps[0]["rewards/margins"] == 0.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learned the preferences
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] > 0
    assert (out / "adapter_config.json").exists()
    generated = run("generate", "-m", base, "--adapter", out, "-p", "the cat", "-n", "4")
    assert generated.exit_code == 0, generated.output


@pytest.mark.parametrize("args", [
    ["--target", "c_attn", "--lr", "1e-2", "--loss", "robust", "--label-smoothing", "0.1"],
    ["--full", "--lr", "1e-3", "--precompute-ref", "--loss", "ipo"],
])
def test_an_interrupted_then_resumed_dpo_run_is_bit_identical(base, data, tmp_path, args):
    args = [*args, "--lr-decay-steps", "6"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    dpo(base, data, straight, *args, "--max-steps", "6")
    dpo(base, data, broken, *args, "--max-steps", "3")
    result = dpo(base, data, broken, *args, "--max-steps", "6")
    assert "resuming from step 3" in result.stderr
    assert records(broken) == records(straight) and len(losses(straight)) == 6
    assert (broken / "model.safetensors").read_bytes() == \
        (straight / "model.safetensors").read_bytes()
    if "--precompute-ref" in args:
        assert f"read from {broken}/ref_logps.safetensors" in result.stderr


def test_a_frozen_copy_equals_precomputed_and_given_log_probs(base, data, tmp_path):
    held_out = write_jsonl(tmp_path / "eval.jsonl", PAIRS[:2])
    args = ["--full", "--lr", "1e-3", "--max-steps", "3", "--eval-data", held_out]
    copy, pre, given = tmp_path / "copy", tmp_path / "pre", tmp_path / "given"
    result = dpo(base, data, copy, *args)
    assert "with the reference's weights" in result.stderr  # a second copy, counted
    dpo(base, data, pre, *args, "--precompute-ref")
    np.testing.assert_allclose(losses(pre), losses(copy), rtol=1e-5)
    ref = pre / "ref_logps.safetensors"
    tables = checkpoint.load_file(str(ref))
    assert tables["train"].shape == (12, 2) and tables["validation"].shape == (2, 2)
    np.testing.assert_allclose([r["val_loss"] for r in records(pre) if "val_loss" in r],
                               [r["val_loss"] for r in records(copy) if "val_loss" in r],
                               rtol=1e-5)
    dpo(base, data, given, *args, "--ref-logps", ref)
    assert records(given) == records(pre)


def test_resuming_with_other_dpo_settings_is_refused(base, data, tmp_path):
    out = tmp_path / "run"
    dpo(base, data, out, "--target", "c_attn", "--max-steps", "1")
    result = run("align", "dpo", "-m", base, "--data", data, "--out", out, *FAST,
                 "--target", "c_attn", "--max-steps", "2", "--beta", "0.3")
    one_error_line(result, "other settings", "beta")


@pytest.mark.parametrize("records_, args, fragments", [
    (PAIRS, ["--loss", "hinge", "--label-smoothing", "0.1"], ["applies to the sigmoid"]),
    (PAIRS, ["--label-smoothing", "0.5"], ["--label-smoothing"]),
    ([{"prompt": "the cat", "chosen": " sat.", "rejected": " sat."}], [],
     ["prefs.jsonl:1", "identical"]),
    (PAIRS, ["--ref-logps", "{data}", "--precompute-ref"], ["--ref-logps"]),
    (PAIRS, ["--ref-logps", "{data}"], ["not a file of reference log-probs"]),
    (PAIRS, ["--ref-model", "{other}"], ["vocabulary of 280 ids", "model's tokenizer"]),
    (PAIRS, ["--full", "--target", "c_attn"], ["--full"]),
])
def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, records_, args, fragments):
    data = write_jsonl(tmp_path / "prefs.jsonl", records_)
    if "{other}" in args:
        tiny_base(tmp_path / "other", vocab=280, dropout=0.1)
    args = [a.format(data=data, other=tmp_path / "other") for a in args]
    out = tmp_path / "out"
    result = run("align", "dpo", "-m", base, "--data", data, "--out", out, *FAST, *args)
    one_error_line(result, *fragments)
    assert not out.exists()
