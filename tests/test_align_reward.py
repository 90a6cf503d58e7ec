"""Reward models (tinylm.align.reward, reward_run, `tinylm align reward`): loss, gradients
and metrics equal TRL 1.16's RewardTrainer.compute_loss on the same random
GPT2ForSequenceClassification / LlamaForSequenceClassification and batch (margins,
centering, chats); the loss against its formula and finite differences; training a tiny
reward model through the CLI learns a separable preference; bit-exact resume; the run
folder read back, exported to transformers and read back again; bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from base_helpers import tiny_base
from chat_helpers import SPECIALS, TEXT, tok, tok_file  # noqa: F401 (fixtures)
from cli_helpers import one_error_line, run, run_ok
from test_align_preferences import CHATS, TEXTS, chat_jinja, fmt_for, write_jsonl

from tinylm import checkpoint
from tinylm.align.preferences import read_preferences
from tinylm.align.reward import (
    RewardModel, RewardObjective, bradley_terry, log_sigmoid, reward_metrics,
)
from tinylm.prompts import ChatTemplate
from tinylm.tensor import Tensor
from tinylm.testing import gradcheck

MARGINS = [0.5, 1.0, -0.25]
CHAT_PAIRS = [CHATS[0], {"prompt": CHATS[1]["chosen"][:3], "chosen": CHATS[1]["chosen"][3:],
                         "rejected": CHATS[1]["rejected"][3:]}]  # TRL: the same fields


# --------------------------------------------------------------------------- TRL as the oracle


def hf_reward_model(family: str, vocab: int, pad: int, eos: int):
    """A random tiny *ForSequenceClassification (num_labels 1), dropout off."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0,
            embd_pdrop=0, attn_pdrop=0, num_labels=1, pad_token_id=pad, eos_token_id=eos,
            bos_token_id=eos)
        return transformers.GPT2ForSequenceClassification(config)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, num_labels=1, pad_token_id=pad, eos_token_id=eos,
        bos_token_id=eos)
    return transformers.LlamaForSequenceClassification(config)


def trl_step(tok_file, hf_model, records, tmp_path, pad_token, center=None):
    """TRL's RewardTrainer on ``records`` (one batch of them all): the collated batch,
    compute_loss's loss and metrics, and the gradients of the score and embedding."""
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_file),
                                              eos_token="<|endoftext|>", pad_token=pad_token)
    hf.chat_template = chat_jinja(ChatTemplate.builtin("chatml"))
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                            center_rewards_coefficient=center)
    trainer = trl.RewardTrainer(model=hf_model, args=args, processing_class=hf,
                                train_dataset=datasets.Dataset.from_list(records))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    hf_model.train()
    loss = trainer.compute_loss(hf_model, dict(inputs))
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    emb = hf_model.get_input_embeddings().weight.grad.numpy()
    return inputs, float(loss.item()), metrics, {"score": hf_model.score.weight.grad.numpy(),
                                                 "emb": emb}


def tinylm_twin(hf_model, tmp_path, pad: int) -> RewardModel:
    """The same weights in tinylm: the HF folder read by load_hf_reward_model."""
    from tinylm.align.reward_run import load_hf_reward_model

    hf_model.save_pretrained(tmp_path / "hf")
    return load_hf_reward_model(tmp_path / "hf").train()


@pytest.mark.parametrize("family, kind, margin, center", [
    ("gpt2", "text", True, None), ("gpt2", "text", False, 0.01), ("gpt2", "chat", False, None),
    ("llama", "text", True, 0.01),
])
def test_loss_gradients_and_metrics_equal_trls(tok, tok_file, tmp_path, family, kind, margin,
                                               center):
    records = [dict(r) for r in (TEXTS[:3] if kind == "text" else CHAT_PAIRS)]
    if margin:
        for r, m in zip(records, MARGINS):
            r["margin"] = m
    eos = tok.token_to_id("<|endoftext|>")
    # GPT-2 pads with its eos (TRL's fallback: the eos is not the scored token); the
    # Llama has a pad token of its own (its eos is scored)
    pad_token = None if family == "gpt2" else "<pad>"
    pad = eos if pad_token is None else tok.token_to_id(pad_token)
    hf_model = hf_reward_model(family, tok.vocab_size, pad, eos)
    mine = tinylm_twin(hf_model, tmp_path, pad)
    inputs, loss, metrics, grads = trl_step(tok_file, hf_model, records, tmp_path, pad_token,
                                            center)

    data = read_preferences([write_jsonl(tmp_path / "p.jsonl", records)], fmt_for(tok),
                            pad_id=mine.pad_id)
    batch = data.examples.batch(np.arange(len(records)), data.pad_id)
    assert batch["ids"].tolist() == inputs["input_ids"].tolist()  # the same batch
    assert batch["attention_mask"].tolist() == inputs["attention_mask"].tolist()
    objective = RewardObjective(tok, center_rewards_coefficient=center)
    ours = objective.loss(mine, batch)
    ours.backward()
    assert abs(ours.item() - loss) < 1e-5
    assert set(objective.metrics) == set(metrics)  # accuracy, margin, min/mean/max_reward
    for name, value in metrics.items():
        assert abs(objective.metrics[name] - value) < 1e-5, name
    np.testing.assert_allclose(mine.score.weight.grad, grads["score"], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(mine.tok_emb.weight.grad, grads["emb"], atol=1e-5, rtol=1e-4)
    assert np.abs(grads["emb"]).max() > 1e-4  # the gradients reach the decoder


# --------------------------------------------------------------------------- the formula


def test_the_loss_is_its_formula_by_hand():
    r = np.array([1.5, -0.5, 0.25, 0.0, 0.5, 0.25])  # chosen 3, then rejected 3
    margin = np.array([0.5, 0.0, -1.0])
    d = r[:3] - r[3:] - margin
    want = np.mean(np.log1p(np.exp(-d))) + 0.1 * np.mean((r[:3] + r[3:]) ** 2)
    got = bradley_terry(Tensor(r), margin, 0.1).item()
    assert got == pytest.approx(want, rel=1e-12)
    assert bradley_terry(Tensor(np.array([2.0, 0.0]))).item() == \
        pytest.approx(np.log1p(np.exp(-2.0)), rel=1e-12)
    m = reward_metrics(r)
    assert m == pytest.approx({"accuracy": 1 / 3, "margin": np.mean(r[:3] - r[3:]),  # a tie loses
                               "min_reward": -0.5, "mean_reward": np.mean(r),
                               "max_reward": 1.5})
    extreme = log_sigmoid(Tensor(np.array([-800.0, 0.0, 800.0])))
    assert extreme.numpy().tolist() == pytest.approx([-800.0, -np.log(2.0), 0.0])


def test_the_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    r = rng.normal(size=8)
    margin = rng.normal(size=4)
    assert gradcheck(lambda x: bradley_terry(x, margin, 0.05), r)
    assert gradcheck(lambda x: log_sigmoid(x), np.array([-3.0, -1e-3, 0.0, 2.0]))


# --------------------------------------------------------------------------- end to end

GOOD = [" the cat sat on a mat.", " the cat went home.", " a cat sat.", " the cat ran to tea."]
BAD = [" the dog ran.", " a dog sat on a mat.", " the dog went home for tea.", " dog."]
PROMPTS = ["Hello there!", "then both", "what it was,"]
PAIRS = [{"prompt": p, "chosen": g, "rejected": b} for p in PROMPTS for g in GOOD for b in BAD]
FAST = ["--no-progress", "--batch-size", "4", "--log-every", "1", "--seed", "3",
        "--chat-template", "chatml"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base") / "gpt2")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "prefs.jsonl", PAIRS)


def align_reward(base, prefs, out, *args):
    return run_ok("align", "reward", "-m", base, "--data", prefs, "--out", out, *FAST, *args)


def records(out, key):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if key in r]


def test_training_learns_a_separable_preference(base, prefs, tmp_path):
    from tinylm.align.reward_run import load_reward_model

    args = ["--full", "--lr", "3e-3", "--val-fraction", "0.25", "--eval-every", "10"]
    align_reward(base, prefs, tmp_path / "before", *args, "--max-steps", "0")
    before = records(tmp_path / "before", "eval_accuracy")[-1]["eval_accuracy"]
    result = align_reward(base, prefs, tmp_path / "rm", *args, "--max-steps", "40")
    assert "trainable%: 100.0000" in result.stderr and "accuracy" in result.stderr
    evals = records(tmp_path / "rm", "eval_accuracy")
    assert before < 0.9 and evals[-1]["eval_accuracy"] == 1.0  # it learned
    assert evals[-1]["eval_margin"] > evals[0]["eval_margin"] > 0
    steps = records(tmp_path / "rm", "accuracy")
    assert len(steps) == 40 and {"margin", "min_reward", "mean_reward", "max_reward"} <= \
        set(steps[0])
    rm = load_reward_model(tmp_path / "rm")  # read back: a reward function
    got = rm(["Hello there!"] * 2, [" the cat sat.", " the dog sat."])
    assert got[0] > got[1]
    texts = rm.rewards(["Hello there! the cat sat.", "Hello there! the dog sat."])
    assert texts.tolist() == pytest.approx(got, abs=1e-6)
    called = rm(prompts=["Hello there!"] * 2, completions=[" the cat sat.", " the dog sat."],
                completion_ids=[[1], [2]], answer=["x", "y"])  # as tinylm align grpo calls it
    assert called == got
    chat = rm([[{"role": "user", "content": "Hello there!"}]] * 2, ["the cat sat.", "the dog"])
    assert chat[0] > chat[1]  # a conversation, rendered with the run's template


def test_a_resumed_run_is_bit_identical_and_the_export_loads_in_transformers(base, prefs,
                                                                            tmp_path):
    from tinylm.align.reward_run import load_hf_reward_model, load_reward_model

    args = ["--target", "c_attn", "--lora-r", "4", "--lora-dropout", "0.1", "--lr", "1e-2",
            "--lr-decay-steps", "6", "--eval-every", "3", "--center-rewards", "0.01"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    align_reward(base, prefs, straight, *args, "--max-steps", "6", "--export-hf")
    align_reward(base, prefs, broken, *args, "--max-steps", "3")
    result = align_reward(base, prefs, broken, *args, "--max-steps", "6")
    assert "resuming from step 3" in result.stderr
    keys = ("loss", "grad_norm", "accuracy", "margin", "mean_reward")
    trace = lambda out: [[r[k] for k in keys] for r in records(out, "loss")]  # noqa: E731
    assert trace(broken) == trace(straight) and len(trace(straight)) == 6
    assert (broken / "model.safetensors").read_bytes() == \
        (straight / "model.safetensors").read_bytes()
    saved = checkpoint.load_file(str(straight / "model.safetensors"))
    assert "score.weight" in saved and all(".peft." in k for k in saved if k != "score.weight")

    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    ours = load_reward_model(straight).score_ids(rows)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(straight / "hf")
    with torch.no_grad():
        theirs = [hf(torch.tensor([r])).logits[0, 0].item() for r in rows]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(load_hf_reward_model(straight / "hf").score_ids(rows), ours,
                               atol=1e-6)


def test_bad_input_is_one_line_and_writes_nothing(base, prefs, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", PAIRS[:2] + [dict(PAIRS[0], rejected=GOOD[0])])
    out = tmp_path / "out"
    one_error_line(run("align", "reward", "-m", base, "--data", bad, "--out", out, *FAST),
                   "bad.jsonl:3", "identical")
    assert not out.exists()
    one_error_line(run("align", "reward", "-m", base, "--data", prefs, "--out", out, "--merge"),
                   "--export-hf")
    assert not out.exists()
    align_reward(base, prefs, out, "--target", "c_attn", "--max-steps", "1")
    one_error_line(run("align", "reward", "-m", base, "--data", prefs, "--out", out, *FAST,
                       "--target", "c_attn", "--max-steps", "2", "--center-rewards", "0.1"),
                   "center_rewards_coefficient")
