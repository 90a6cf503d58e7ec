"""RL alignment (tinylm.align.rl, rollouts, rl_trainer; `tinylm align grpo|rloo`).

The oracle is TRL 1.16 itself: its GRPOTrainer's and RLOOTrainer's own ``_compute_loss``
run on a Hugging Face GPT-2 with the same weights as the tinylm model, on the same
prompts, completions, advantages and old / reference log-probabilities, for every loss
type; gradients too. The advantages are checked against hand computation, the think
format reward against TRL's. End to end: a tiny random model learns to emit the token a
reward prefers; a run interrupted mid rollout buffer resumes bit for bit; bad input is
one line (a failing reward function leaves a checkpoint to resume from)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import tinylm
from cli_helpers import one_error_line, run, run_ok
from tinylm import checkpoint, hookimpl, plugins
from tinylm.align.rewards import RewardError, exact_match, regex_match, score, think_format
from tinylm.align.rl import GRPO, LOSS_TYPES, RLOO, RLConfig, grpo_advantages, rloo_advantages
from tinylm.align.rl import sequence_kl
from tinylm.align.rollouts import decode, encode, layout, token_logps_array
from tinylm.errors import ConfigError

CHARS = "abcd "
TEXT = "abcd dcba ab cd " * 8


# --------------------------------------------------------------------------- the TRL oracle


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(tinylm model, Hugging Face model, tokenizer folder): one tiny random GPT-2 in
    float64 on both sides, dropout off."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tinylm.tokenizers.bpe import BPETokenizer

    root = tmp_path_factory.mktemp("hf")
    tok = BPETokenizer.train(["the cat sat on a mat and the dog ran home. " * 20], 300,
                             special_tokens=["<|endoftext|>"])
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2,
                                     n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, initializer_range=0.2,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "hf")
    ours = tinylm.load_pretrained(root / "hf").to(dtype="float64").train()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(root / "hf").double()
    return ours, theirs, root


def trl_trainer(kind: str, hf_pair, **config):
    """A GRPOTrainer or RLOOTrainer around the Hugging Face model (nothing trained)."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    _, model, root = hf_pair
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"),
                                               eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")
    Config, Trainer = ((trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo"
                       else (trl.RLOOConfig, trl.RLOOTrainer))
    args = Config(output_dir=str(root / kind), report_to=[], use_cpu=True, bf16=False,
                  per_device_train_batch_size=6, **config)
    trainer = Trainer(model=model, reward_funcs=[lambda prompts, completions, **k: [0.0] * 6],
                      args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * 6),
                      processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def fixed_batch(model, vocab: int, temperature: float, seed: int = 0) -> dict:
    """Two prompts (of one length: TRL's forward numbers left padding, tinylm's does
    not) x three completions of 1..5 tokens, random advantages, old log-probs off the
    policy's (so that some ratios clip) and a reference's."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, vocab, 4))] * 3 + [list(rng.integers(1, vocab, 4))] * 3
    completions = [list(rng.integers(1, vocab, n)) for n in (5, 3, 1, 4, 5, 2)]
    batch = layout(prompts, completions, pad_id=0)
    logp, mask = token_logps_array(model, batch, temperature), batch["completion_mask"]
    batch["old_logps"] = (logp + rng.normal(0, 0.3, logp.shape)) * mask
    batch["ref_logps"] = (logp + rng.normal(0, 0.5, logp.shape)) * mask
    batch["advantages"] = rng.normal(0, 1, len(completions))
    return batch


def trl_inputs(batch: dict, rloo: bool = False) -> dict:
    import torch

    P, mask = batch["prompt_width"], batch["completion_mask"]
    inputs = {"prompt_ids": torch.tensor(batch["ids"][:, :P]),
              "prompt_mask": torch.tensor(batch["attention_mask"][:, :P]),
              "completion_ids": torch.tensor(batch["completion_ids"]),
              "completion_mask": torch.tensor(mask.astype(np.int64)),
              "advantages": torch.tensor(batch["advantages"])}
    if rloo:
        inputs["old_logps"] = torch.tensor((batch["old_logps"] * mask).sum(axis=1))
    else:
        inputs["num_items_in_batch"] = torch.tensor(mask.sum())
        for ours, theirs in (("old_logps", "old_per_token_logps"),
                             ("ref_logps", "ref_per_token_logps")):
            if ours in batch:
                inputs[theirs] = torch.tensor(batch[ours])
    return inputs


def compare_loss_and_grads(objective, trainer, hf_pair, batch, rloo=False):
    from model_helpers import assert_grads_match

    ours, hf, _ = hf_pair
    ours.zero_grad()
    hf.zero_grad()
    loss = objective.loss(ours, batch)
    loss.backward()
    theirs = trainer._compute_loss(trainer.model, trl_inputs(batch, rloo))
    theirs.backward()
    theirs_value = float(theirs.detach())
    assert abs(float(loss.item()) - theirs_value) < 1e-6, (float(loss.item()), theirs_value)
    # TRL's fused log-prob kernel keeps its softmax statistics in float32
    assert_grads_match(ours, hf, tol=1e-4)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for name in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                 "clip_ratio/region_mean", *(() if rloo else ("kl",))):
        assert abs(objective.metrics[name] - logged[name]) < 1e-5, name


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_gradients_and_metrics_equal_trls(hf_pair, loss_type):
    settings = dict(num_generations=3, beta=0.04, epsilon=0.2, epsilon_high=0.28,
                    max_completion_length=5, temperature=0.7, num_iterations=2)
    trainer = trl_trainer("grpo", hf_pair, loss_type=loss_type, **settings)
    batch = fixed_batch(hf_pair[0], hf_pair[1].config.vocab_size, 0.7)
    objective = GRPO(None, RLConfig("grpo", loss_type=loss_type, **settings))
    compare_loss_and_grads(objective, trainer, hf_pair, batch)
    assert 0 < objective.metrics["clip_ratio/region_mean"] < 1  # the clip is exercised


def test_grpo_on_policy_without_kl_equals_trls_defaults(hf_pair):
    """TRL's defaults (beta 0, one iteration: no old log-probs, the ratio is exactly 1)."""
    trainer = trl_trainer("grpo", hf_pair, num_generations=3, max_completion_length=5)
    batch = fixed_batch(hf_pair[0], hf_pair[1].config.vocab_size, 1.0, seed=1)
    del batch["old_logps"], batch["ref_logps"]
    rl = RLConfig("grpo", num_generations=3, max_completion_length=5)
    assert (rl.beta, rl.loss_type, rl.num_iterations) == (0.0, "dapo", 1)
    objective = GRPO(None, rl)
    ours, hf, _ = hf_pair
    ours.zero_grad()
    hf.zero_grad()
    loss = objective.loss(ours, batch)
    loss.backward()
    theirs = trainer._compute_loss(trainer.model, trl_inputs(batch))
    theirs.backward()
    assert abs(float(loss.item()) - float(theirs.detach())) < 1e-6
    from model_helpers import assert_grads_match

    assert_grads_match(ours, hf, tol=1e-4)


def test_rloo_loss_gradients_and_metrics_equal_trls(hf_pair):
    settings = dict(num_generations=3, epsilon=0.2, epsilon_high=0.3, max_completion_length=5,
                    temperature=0.8, num_iterations=2)
    trainer = trl_trainer("rloo", hf_pair, **settings)
    batch = fixed_batch(hf_pair[0], hf_pair[1].config.vocab_size, 0.8, seed=2)
    batch["old_logps"] = batch["old_logps"] * 0.3 + token_logps_array(hf_pair[0], batch, 0.8) * 0.7
    objective = RLOO(None, RLConfig("rloo", **settings))
    compare_loss_and_grads(objective, trainer, hf_pair, batch, rloo=True)


# --------------------------------------------------------------------------- advantages by hand


def test_grpo_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]  # two groups of G = 4
    adv, std = grpo_advantages(rewards, 4)
    s = math.sqrt(4 * 0.25 / 3)  # group 1: mean 0.5, Bessel-corrected std
    np.testing.assert_allclose(adv, [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4),
                                     0.5 / (s + 1e-4), 0, 0, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(std, [s] * 4 + [0] * 4, rtol=1e-12)
    adv, _ = grpo_advantages(rewards, 4, "none")
    np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    adv, std = grpo_advantages(rewards, 4, "batch")
    mean, n = 10 / 8, 8
    b = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (b + 1e-4))
    np.testing.assert_allclose(std, b)


def test_rloo_advantages_by_hand():
    # G = 3: each baseline is the mean of the two others
    adv = rloo_advantages([1.0, 2.0, 3.0, 5.0, 5.0, 8.0], 3)
    np.testing.assert_allclose(adv, [1 - 2.5, 2 - 2, 3 - 1.5, 5 - 6.5, 5 - 6.5, 8 - 5])
    norm = rloo_advantages([1.0, 2.0, 3.0, 5.0, 5.0, 8.0], 3, normalize=True)
    raw = np.array([-1.5, 0, 1.5, -1.5, -1.5, 3])
    np.testing.assert_allclose(norm, (raw - raw.mean()) / (raw.std(ddof=1) + 1e-4))
    mask = np.array([[1, 1, 0], [1, 0, 0]], float)
    kl = sequence_kl([[-1.0, -2.0, -9.0], [-1.0, -5.0, -5.0]],
                     [[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]], mask)
    np.testing.assert_allclose(kl, [0.5 - 1.0, -0.5])  # first order, may be negative


def test_rl_settings_follow_trls_defaults_and_refuse_bad_values():
    g, r = RLConfig("grpo"), RLConfig("rloo")
    assert (g.num_generations, g.beta, g.loss_type, g.scale_rewards, g.epsilon_high) == \
        (8, 0.0, "dapo", "group", 0.2)
    assert (r.num_generations, r.beta) == (2, 0.05) and g.use_bias_correction_kl
    for bad in ({"num_generations": 1}, {"temperature": 0.0}, {"loss_type": "ppo"},
                {"beta": -1.0}, {"method": "ppo"}):
        with pytest.raises(ConfigError):
            RLConfig(**{"method": "grpo", **bad})


# --------------------------------------------------------------------------- reward functions


def test_reward_functions_and_their_errors():
    trl_rewards = pytest.importorskip("trl.rewards")
    texts = ["<think>\nhm.\n</think>\nYes.", "<think>no end", "x <think>a</think>",
             "<think>a</think><think>b</think>"]
    assert think_format(["p"] * 4, texts) == trl_rewards.think_format_reward(
        [[{"content": t}] for t in texts])
    got = exact_match(["q"] * 5, ["so #### 1,000", "The answer is 12.", r"\boxed{\frac{1}{2}}",
                                  "it is 7", [{"role": "assistant", "content": "Answer: Paris"}]],
                      answer=["1000", "12", r"\frac{1}{2}", "8", "paris"])
    assert got == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert regex_match(["p"] * 2, [" 42 ", "4x"], pattern=[r"\d+", r"\d+"]) == [1.0, 0.0]
    assert plugins.get_reward_function("exact-match") is exact_match
    with pytest.raises(RewardError, match="'answer'"):
        exact_match(["p"], ["c"])

    def bad(prompts, completions, **fields):
        if any("c" in p for p in prompts):
            raise KeyError("oops")
        return [float("nan")] * len(prompts)

    with pytest.raises(RewardError, match=r"'bad' raised KeyError.*prompt 'abc'"):
        score({"bad": bad}, ["ab", "abc"], ["x", "y"], [[1], [2]], {})
    with pytest.raises(RewardError, match=r"'bad' returned nan for the prompt 'ab'"):
        score({"bad": bad}, ["ab"], ["x"], [[1]], {})
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        score({"short": lambda prompts, completions, **k: [1.0]}, ["a", "b"], ["x", "y"],
              [[1], [2]], {})


def test_a_rollout_buffer_survives_json_exactly():
    batch = {"a": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
             "i": np.arange(6).reshape(2, 3), "n": 5, "stats": {"reward": 0.1 + 0.2}}
    back = decode(json.loads(json.dumps(encode(batch))))
    assert back["a"].dtype == np.float32 and (back["a"] == batch["a"]).all()
    assert (back["i"] == batch["i"]).all() and back["n"] == 5
    assert back["stats"]["reward"] == 0.1 + 0.2


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def char_base(tmp_path_factory):
    """A tiny random GPT-2 run folder with a 6-token character vocabulary."""
    from tinylm.models import GPT2Config
    from tinylm.models.decoder import Decoder
    from tinylm.tokenizers.char import CharTokenizer

    path = tmp_path_factory.mktemp("base") / "char"
    path.mkdir()
    tok = CharTokenizer.train(TEXT, special_tokens=["<|endoftext|>"])
    tinylm.seed(0)
    model = Decoder(GPT2Config(vocab_size=len(tok), d_model=16, n_layer=1, n_head=2,
                               max_positions=32, eos_token_id=tok.token_to_id("<|endoftext|>")))
    model.config.save(path / "config.json")
    tok.save(path / "tokenizer.txt")
    checkpoint.save_file({k: np.asarray(v) for k, v in model.state_dict().items()},
                         str(path / "model.safetensors"), metadata={"format": "np"})
    return path


def _fraction_of(char: str):
    def reward(prompts, completions, completion_ids, **fields):
        return [c.count(char) / max(len(ids), 1) for c, ids in zip(completions, completion_ids)]
    return reward


class Rewards:
    """The test's reward plugin; ``broken``: "picky" fails on the prompt "cb"."""

    broken = False

    @staticmethod
    @hookimpl
    def register_reward_functions(register):
        likes_a = _fraction_of("a")
        register("likes-a", likes_a)

        def picky(prompts, completions, **fields):
            if Rewards.broken and "cb" in prompts:
                raise ValueError("no cb please")
            return likes_a(prompts, completions, **fields)

        register("picky", picky)
        register("nan", lambda prompts, completions, **k: [float("nan")] * len(prompts))

        def spy(prompts, completions, completion_ids, **fields):
            Rewards.calls.append((prompts, completions, completion_ids, fields))
            return [0.0] * len(prompts)

        register("spy", spy)

    calls: list = []


@pytest.fixture
def prompts(tmp_path):
    plugins.register_plugin(Rewards, name="test-rewards")
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": "a"}) + "\n"
                            for p in ["b", "dc", "bd", "cb"]), encoding="utf-8")
    return path


FAST = ["--no-progress", "--full", "--batch-size", "2", "--block-size", "16",
        "--max-completion-length", "4", "--seed", "3"]


def align(method, base, data, out, *args):
    return run_ok("align", method, "-m", base, "--data", data, "--out", out, *FAST, *args)


def records(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]


def timeless(recs):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")}
            for r in recs]


def plot_height(out) -> int:
    """The pixel height of `tinylm plot OUT`'s PNG: 120 dpi x (5 + 2.5 per panel below
    the loss)."""
    import struct

    pytest.importorskip("matplotlib")
    result = run("plot", out)
    assert result.exit_code == 0, result.output
    return struct.unpack(">II", (out / "loss.png").read_bytes()[16:24])[1]


def test_grpo_teaches_a_tiny_model_the_rewarded_token(char_base, prompts, tmp_path):
    out = tmp_path / "grpo"
    result = align("grpo", char_base, prompts, out, "--reward", "likes-a", "--max-steps", "30",
                   "--num-generations", "8", "--lr", "3e-2", "--temperature", "1.0")
    assert "done: 30 steps" in result.stderr
    rewards = [r["reward"] for r in records(out)]
    assert np.mean(rewards[:3]) < 0.4 and np.mean(rewards[-3:]) > 0.8, rewards
    first = records(out)[0]
    for name in ("rewards/likes-a/mean", "frac_reward_zero_std", "completions/mean_length",
                 "entropy", "clip_ratio/region_mean"):
        assert name in first
    assert plot_height(out) == 120 * (5 + 2.5)  # loss, reward (no KL: beta is 0)


def test_rloo_learns_too_with_the_kl_to_a_frozen_copy(char_base, prompts, tmp_path):
    out = tmp_path / "rloo"
    align("rloo", char_base, prompts, out, "--reward", "likes-a", "--max-steps", "30",
          "--num-generations", "4", "--lr", "3e-2", "--beta", "0.01")
    recs = records(out)
    assert np.mean([r["reward"] for r in recs[-3:]]) > 0.8
    assert recs[0]["kl"] == 0 and recs[-1]["kl"] > 0  # the frozen base falls behind
    assert plot_height(out) == 120 * (5 + 2 * 2.5)  # loss, reward, KL


def test_conversational_prompts_and_their_fields_reach_the_reward_as_in_trl(
        char_base, prompts, tmp_path, monkeypatch):
    monkeypatch.setattr(Rewards, "calls", [])
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"version": 1, "name": "t", "user_prefix": "b ",
                                    "user_suffix": " ",
                                    "assistant_prefix": "d "}), encoding="utf-8")
    data = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "cb"}]
    data.write_text(json.dumps({"prompt": chat, "answer": "a", "n": 7}) + "\n", encoding="utf-8")
    align("grpo", char_base, data, tmp_path / "out", "--reward", "spy", "--chat-template",
          template, "--num-generations", "3", "--max-steps", "1", "--batch-size", "1")
    (given, completions, ids, fields), = Rewards.calls
    assert given == [chat] * 3 and fields == {"answer": ["a"] * 3, "n": [7] * 3}
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
               for c in completions)
    assert len(ids) == 3 and all(1 <= len(i) <= 4 for i in ids)


def test_prompt_records_become_ids_with_the_generation_prompt(char_base, tmp_path):
    from tinylm.align.prompt_data import PromptData, PromptError
    from tinylm.instruct import Formatting
    from tinylm.prompts import ChatTemplate
    from tinylm.tokenizers import from_file

    tok = from_file(char_base / "tokenizer.txt")
    template = ChatTemplate(user_prefix="b ", user_suffix=" ", assistant_prefix="d ")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ab c", "k": 1}) + "\n" + json.dumps(
        {"prompt": [{"role": "user", "content": "cb"}], "k": 2}) + "\n", encoding="utf-8")
    data = PromptData.read([path], Formatting(tok, 0, 12, template))
    batch = data.examples.batch([1, 0], data.pad_id)
    assert batch["prompt_ids"] == [tok.encode("b cb d "), tok.encode("ab c")]
    assert batch["fields"] == [{"k": 2}, {"k": 1}] and batch["n_tokens"] == 11
    assert len(data.split(0.5)[1]) == 1  # split and batched as fine-tuning examples are
    for bad, fragment in (([], "'prompt' must be a non-empty list"),
                          ([{"role": "robot", "content": "x"}], "message 0 of 'prompt'")):
        path.write_text(json.dumps({"prompt": bad}) + "\n", encoding="utf-8")
        with pytest.raises(PromptError, match=f"{path}:1: {fragment}"):
            PromptData.read([path], Formatting(tok, 0, 12, template))


def test_a_reward_model_scores_beside_a_reward_function(char_base, prompts, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": "aa", "rejected": "dd"}) + "\n"
                             for p in ("b", "dc", "cb")), encoding="utf-8")
    run_ok("align", "reward", "-m", char_base, "--data", prefs, "--out", tmp_path / "rm",
           "--full", "--no-progress", "--max-steps", "1", "--val-fraction", "0")
    out = tmp_path / "grpo"
    align("grpo", char_base, prompts, out, "--reward", "likes-a", "--reward-model",
          tmp_path / "rm", "--num-generations", "2", "--max-steps", "2")
    for r in records(out):  # the reward is the sum of the two
        both = r["rewards/likes-a/mean"] + r["rewards/reward-model/mean"]
        assert r["rewards/reward-model/std"] > 0 and abs(r["reward"] - both) < 1e-9


@pytest.mark.parametrize("method, args, stop", [
    ("grpo", ["--num-iterations", "2", "--beta", "0.05"], 3),
    ("rloo", ["--num-iterations", "3"], 4),
])
def test_a_run_stopped_mid_buffer_resumes_bit_for_bit(char_base, prompts, tmp_path, method,
                                                      args, stop):
    """LoRA with dropout (the backend generator), the reference by disabled adapters,
    several optimisation steps per rollout buffer; ``stop`` is mid buffer."""
    common = [*FAST[:1], "--target", "qkv", "--lora-dropout", "0.1", *FAST[2:], "--reward",
              "likes-a", "--num-generations", "3", "--lr", "1e-2", "--lr-decay-steps", "6",
              *args]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for out, steps in ((straight, 6), (broken, stop), (broken, 6)):
        result = run_ok("align", method, "-m", char_base, "--data", prompts, "--out", out,
                        *common, "--max-steps", steps)
        if out == broken and steps == stop:  # stopped mid buffer: the checkpoint holds the live rollouts
            saved = json.loads((out / "trainer_state.json").read_text())["rollouts"]
            assert saved["uses"] == stop % int(args[1]) > 0
    assert f"resuming from step {stop}" in result.stderr
    assert timeless(records(broken)) == timeless(records(straight))
    assert len(records(straight)) == 6
    state = json.loads((tmp_path / "broken" / "trainer_state.json").read_text())
    assert state["rollouts"] is None  # 6 steps: the last buffer was used up
    for name in ("model.safetensors", "adapter_model.safetensors"):
        assert (broken / name).read_bytes() == (straight / name).read_bytes()
    result = run("generate", "-m", char_base, "--adapter", broken, "-p", "ab", "-n", "3")
    assert result.exit_code == 0, result.output


def test_epochs_count_prompts_and_iterations(char_base, prompts, tmp_path):
    """4 prompts, 2 a step: an epoch is 2 generation batches, each trained on twice."""
    result = align("grpo", char_base, prompts, tmp_path / "o", "--reward", "likes-a",
                   "--num-generations", "2", "--epochs", "1", "--num-iterations", "2")
    assert "done: 4 steps" in result.stderr and len(records(tmp_path / "o")) == 4


# --------------------------------------------------------------------------- bad input


def test_a_failing_reward_stops_with_a_checkpoint_and_the_fixed_run_resumes(
        char_base, prompts, tmp_path, monkeypatch):
    """The checkpoint is the last finished step's, the prompt batcher and the sampling
    generator put back as before the failed rollout: once the function is fixed, the
    same command resumes and ends as a run that never failed."""
    args = ["--reward", "picky", "--num-generations", "2", "--max-steps", "4"]
    straight, out = tmp_path / "straight", tmp_path / "o"
    align("grpo", char_base, prompts, straight, *args)
    monkeypatch.setattr(Rewards, "broken", True)
    result = run("align", "grpo", "-m", char_base, "--data", prompts, "--out", out, *FAST, *args)
    line = one_error_line(result, "'picky' raised ValueError: no cb please", "the prompt 'cb'",
                          "run the same command again")
    step = int(line.split("checkpoint of step ")[1].split()[0])
    assert json.loads((out / "trainer_state.json").read_text())["step"] == step < 4
    monkeypatch.setattr(Rewards, "broken", False)
    result = align("grpo", char_base, prompts, out, *args)
    assert f"resuming from step {step}" in result.stderr
    assert timeless(records(out)) == timeless(records(straight))
    result = run("align", "grpo", "-m", char_base, "--data", prompts, "--out", tmp_path / "n",
                 *FAST, "--reward", "nan", "--num-generations", "2", "--max-steps", "2")
    one_error_line(result, "'nan' returned nan for the prompt", "checkpoint of step 0")
    assert (tmp_path / "n" / "trainer_state.json").exists()
    result = run("align", "grpo", "-m", char_base, "--data", prompts, "--out", out, *FAST,
                 "--reward", "likes-a", "--num-generations", "2", "--max-steps", "4")
    one_error_line(result, "other settings", "rewards")  # the rewards are the run's


@pytest.mark.parametrize("lines, args, fragments", [
    ([{"text": "ab"}], [], ["prompts.jsonl:1", "'prompt'"]),
    ([{"prompt": ""}], [], ["prompts.jsonl:1", "empty"]),
    ([{"prompt": "abcd " * 4}], [], ["prompts.jsonl:1", "20 tokens", "the 12 left"]),
    ([{"prompt": 3}], [], ["prompts.jsonl:1", "text or a list of messages"]),
    ([{"prompt": "ab", "answer": "a"}, {"prompt": "b"}], [], ["same fields"]),
    ([{"prompt": "ab"}], ["--reward", "no-such"], ["unknown reward function 'no-such'",
                                                   "exact-match"]),
    ([{"prompt": "ab"}], ["--reward", "exact-match"], ["'answer'", "checkpoint of step 0"]),
    ([{"prompt": "ab"}], ["--reward", "likes-a", "--max-completion-length", "16"],
     ["--block-size 16", "no room"]),
    ([{"prompt": "ab"}], ["--reward", "likes-a", "--val-fraction", "0.2"], ["--val-fraction"]),
    ([{"prompt": "ab"}], [], ["give a reward"]),
    ([{"prompt": "ab"}], ["--reward", "likes-a", "--num-generations", "1"],
     ["--num-generations"]),
])
def test_bad_input_is_one_line(char_base, prompts, tmp_path, lines, args, fragments):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    if not any(a == "--reward" for a in args) and "give a reward" not in fragments:
        args = [*args, "--reward", "likes-a"]
    result = run("align", "grpo", "-m", char_base, "--data", data, "--out", tmp_path / "out",
                 *FAST, "--max-steps", "1", *args)
    one_error_line(result, *fragments)
