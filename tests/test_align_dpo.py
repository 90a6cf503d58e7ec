"""DPO (tinylm.align.dpo, `tinylm align dpo`): each loss against its formula on hand
cases and its gradient by finite differences; the loss, every parameter's gradient and
every metric against TRL 1.16's own DPOTrainer._compute_loss on the same tiny random
GPT-2 (policy and reference, float64 on both sides), batch and options, for each loss
type; the PEFT reference (adapters disabled) against TRL's PEFT path; precomputed
reference log-probs; the CLI end to end with a bit-exact resume; bad input."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import tinylm
from tinylm import Tensor
from tinylm.align.dpo import (
    DPO, AdapterReference, ModelReference, PrecomputedReference, WithReference,
    check_options, completion_metrics, log_sigmoid, pair_losses, reference_logps,
    sequence_logps,
)
from tinylm.errors import ConfigError
from tinylm.objectives import IGNORE
from tinylm.testing import gradcheck

TOL = 1e-5  # the bar, relative; float64 on both sides leaves far less


def logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


# --------------------------------------------------------------------------- the formulas


def test_log_sigmoid_is_exact_far_out_and_its_gradient_is_a_half_at_zero():
    x = Tensor(np.array([-800.0, -30.0, -1.0, 0.0, 1e-12, 2.0, 800.0]), requires_grad=True)
    y = log_sigmoid(x)
    np.testing.assert_allclose(y.data, logsig(x.data), rtol=1e-15, atol=1e-300)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, np.exp(logsig(-x.data)), rtol=1e-12, atol=0)  # s(-x)
    assert x.grad[3] == 0.5
    assert gradcheck(log_sigmoid, np.array([-3.0, -0.4, 0.0, 0.7, 5.0]))


# hand cases: c, r (log-ratios), the completions' lengths, beta, smoothing -> loss per pair
C = np.array([0.0, 1.5, -2.0, 3.0])
R = np.array([0.0, -0.5, 1.0, 2.5])
LC, LR = np.array([3, 4, 1, 2]), np.array([2, 5, 2, 1])


def hand_loss(loss_type, beta, e):
    z = beta * (C - R)
    if loss_type == "sigmoid":
        return -(1 - e) * logsig(z) - e * logsig(-z)
    if loss_type == "hinge":
        return np.maximum(0.0, 1.0 - z)
    if loss_type == "ipo":
        return (C / LC - R / LR - 1.0 / (2.0 * beta)) ** 2
    return (-(1 - e) * logsig(z) + e * logsig(-z)) / (1 - 2 * e)


CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0),
         ("hinge", 0.3, 0.0), ("hinge", 1.5, 0.0), ("robust", 0.1, 0.1), ("robust", 1.0, 0.3)]


@pytest.mark.parametrize("loss_type, beta, e", CASES)
def test_each_loss_equals_its_formula_on_hand_cases(loss_type, beta, e):
    got = pair_losses(Tensor(C), Tensor(R), beta, loss_type, e, LC, LR).data
    np.testing.assert_allclose(got, hand_loss(loss_type, beta, e), rtol=1e-14, atol=1e-15)


def test_hand_values():
    """A few numbers worked out by hand, beside the vectorised formulas."""
    sig = pair_losses(Tensor(np.zeros(1)), Tensor(np.zeros(1)), 0.1).data[0]
    assert sig == pytest.approx(math.log(2), rel=1e-15)  # policy = reference: -log(1/2)
    hinge = pair_losses(Tensor(np.array([2.0])), Tensor(np.array([-3.0])), 0.1, "hinge").data
    assert hinge[0] == pytest.approx(0.5, rel=1e-15)  # 1 - 0.1 * 5
    ipo = pair_losses(Tensor(np.array([2.0])), Tensor(np.array([1.0])), 0.25, "ipo", 0.0,
                      np.array([2]), np.array([4])).data
    assert ipo[0] == pytest.approx((1.0 - 0.25 - 2.0) ** 2, rel=1e-15)  # (2/2 - 1/4 - 1/0.5)^2
    robust = pair_losses(Tensor(np.zeros(1)), Tensor(np.zeros(1)), 0.1, "robust", 0.25).data
    assert robust[0] == pytest.approx(math.log(2), rel=1e-14)  # (0.75 - 0.25) log 2 / 0.5


@pytest.mark.parametrize("loss_type, beta, e", CASES)
def test_each_loss_gradient_by_finite_differences(loss_type, beta, e):
    """Including d = 0 exactly (the first pair): where every run starts."""
    fn = lambda c, r: pair_losses(c, r, beta, loss_type, e, LC, LR)  # noqa: E731
    assert gradcheck(fn, C.copy(), R.copy())


@pytest.mark.parametrize("beta, loss_type, e, fragment", [
    (0.0, "sigmoid", 0.0, "beta must be > 0"),
    (0.1, "kto", 0.0, "unknown DPO loss"),
    (0.1, "hinge", 0.1, "applies to the sigmoid"),
    (0.1, "robust", 0.5, "[0, 0.5)"),
])
def test_bad_options_are_config_errors(beta, loss_type, e, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        check_options(beta, loss_type, e)


# --------------------------------------------------------------------------- TRL, the oracle

TEXT = ("the cat sat on a mat and the dog ran to see what it was, then both went home for "
        "tea. Hello there! How are you? I am fine.\n") * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAIRS = [
    {"prompt": "the cat", "chosen": " sat on a mat.", "rejected": " ran home."},
    {"prompt": "Hello there!", "chosen": " How are you?", "rejected": " tea"},
    {"prompt": "the dog ran", "chosen": " to see what it was", "rejected": " home for tea."},
]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    from tinylm.tokenizers.bpe import BPETokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train([TEXT], 300, special_tokens=SPECIALS).save(path)
    return path


def random_gpt2(vocab: int, seed: int):
    """A tiny GPT-2 drawn with ``seed`` (dropout on: DPO turns it off on both sides)."""
    import torch
    import transformers
    from model_helpers import WIDE_INIT, randomize

    config = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2,
                                     n_positions=64, initializer_range=WIDE_INIT,
                                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    return randomize(model, seed)


class Oracle:
    """TRL 1.16's DPOTrainer built once on float64 GPT-2 policy and reference;
    ``compute(batch, **options)`` runs its own ``_compute_loss`` on a tinylm batch."""

    def __init__(self, tok_file, tmp_path, policy_seed=1, ref_seed=2, peft_config=None):
        import datasets
        import transformers
        import trl

        self.hf_tok = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(tok_file), eos_token="<|endoftext|>")
        vocab = len(self.hf_tok)
        self.policy = random_gpt2(vocab, policy_seed).double()
        self.ref = None if peft_config is not None else random_gpt2(vocab, ref_seed).double()
        args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                             max_length=64, disable_dropout=True, bf16=False, fp16=False)
        self.trainer = trl.DPOTrainer(model=self.policy, ref_model=self.ref, args=args,
                                      processing_class=self.hf_tok, peft_config=peft_config,
                                      train_dataset=datasets.Dataset.from_list(PAIRS))

    def collated(self):
        """TRL's own prepared dataset and collator: its batch of PAIRS."""
        rows = [self.trainer.train_dataset[i] for i in range(len(PAIRS))]
        return self.trainer.data_collator(rows)

    def compute(self, inputs, beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
        t = self.trainer
        t.beta, t.loss_types, t.loss_weights = beta, [loss_type], [1.0]
        t.label_smoothing = label_smoothing
        t._metrics["train"].clear()
        t.model.train()
        t.model.zero_grad()
        loss = t._compute_loss(t.model, inputs, False)
        loss.backward()
        metrics = {k: v[0] for k, v in t._metrics["train"].items() if k != "num_tokens"}
        return float(loss), metrics


def tinylm_batch(inputs) -> dict:
    """TRL's collated batch in tinylm's layout (tinylm.align.preferences): whole rows,
    targets[:, t] = ids[:, t + 1] where that token is a completion token."""
    ids = inputs["input_ids"].numpy()
    completion = inputs["completion_mask"].numpy().astype(bool)
    targets = np.full_like(ids, IGNORE)
    targets[:, :-1] = np.where(completion[:, 1:], ids[:, 1:], IGNORE)
    return {"ids": ids, "targets": targets, "attention_mask": inputs["attention_mask"].numpy()}


@pytest.fixture(scope="module")
def oracle(tok_file, tmp_path_factory):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    pytest.importorskip("trl")
    return Oracle(tok_file, tmp_path_factory.mktemp("trl"))


@pytest.fixture(scope="module")
def tiny_models(oracle, tmp_path_factory):
    """The oracle's policy and reference loaded into tinylm, float64."""
    from model_helpers import load_in_float64

    from tinylm.align.dpo import disable_dropout

    path = tmp_path_factory.mktemp("hf")
    policy = disable_dropout(load_in_float64(oracle.policy, path / "policy").train())
    ref = load_in_float64(oracle.ref, path / "ref")
    return policy, ref


def assert_metrics_match(ours: dict, theirs: dict):
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=TOL, abs=1e-9), name


def assert_dpo_matches_trl(model, objective, batch, oracle, inputs, **options):
    from model_helpers import assert_grads_match

    theirs, their_metrics = oracle.compute(inputs, **options)
    model.zero_grad()
    loss = objective.loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(theirs, rel=TOL)
    assert_metrics_match(objective.metrics, their_metrics)
    assert_grads_match(model, oracle.trainer.model, tol=TOL)
    return their_metrics


@pytest.mark.parametrize("loss_type, beta, e", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 2.0, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0),
    ("hinge", 0.1, 0.0), ("hinge", 3.0, 0.0), ("robust", 0.1, 0.2), ("robust", 1.0, 0.0),
])
def test_loss_gradients_and_metrics_equal_trls(oracle, tiny_models, loss_type, beta, e):
    policy, ref = tiny_models
    inputs = oracle.collated()
    objective = DPO(None, ModelReference(ref), beta=beta, loss_type=loss_type,
                    label_smoothing=e)
    metrics = assert_dpo_matches_trl(policy, objective, tinylm_batch(inputs), oracle, inputs,
                                     beta=beta, loss_type=loss_type, label_smoothing=e)
    assert 0 < metrics["rewards/accuracies"] < 1 or loss_type != "sigmoid"  # a real mix
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
                            "rewards/margins", "logps/chosen", "logps/rejected",
                            "logits/chosen", "logits/rejected", "entropy",
                            "mean_token_accuracy"}


@pytest.mark.parametrize("e", [0.1, 0.3])
def test_cdpo_label_smoothing_equals_trls_aot_on_one_pair(oracle, tiny_models, e):
    """TRL 1.16's sigmoid ignores label_smoothing; its "aot" loss on a single pair (the
    sort is then the identity) is cDPO's -(1-e) log s(b d) - e log s(-b d)."""
    policy, ref = tiny_models
    full = oracle.collated()
    B = len(PAIRS)
    inputs = {k: v[[1, 1 + B]] for k, v in full.items()}  # pair 1: its chosen, its rejected
    objective = DPO(None, ModelReference(ref), beta=0.7, loss_type="sigmoid", label_smoothing=e)
    assert_dpo_matches_trl(policy, objective, tinylm_batch(inputs), oracle, inputs,
                           beta=0.7, loss_type="aot", label_smoothing=e)


@pytest.fixture(scope="module")
def prefs(tok_file, tmp_path_factory):
    """PAIRS read by tinylm.align.preferences with the oracle's tokenizer."""
    from tinylm.align.preferences import read_preferences
    from tinylm.instruct import Formatting
    from tinylm.tokenizers import from_file

    tok = from_file(tok_file)
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    return read_preferences([path], Formatting(tok, tok.token_to_id("<|endoftext|>"), 64))


def test_pairs_read_from_records_are_trls_batch_and_give_its_loss(oracle, tiny_models, prefs):
    """The same records through tinylm.align.preferences and through TRL's dataset
    preparation and collator: the same rows, completion masks, padding, and loss."""
    ours = prefs.examples.batch(np.arange(len(PAIRS)), prefs.pad_id)
    inputs = oracle.collated()
    theirs = tinylm_batch(inputs)
    for key in ("ids", "targets", "attention_mask"):
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    policy, ref = tiny_models
    objective = DPO(prefs.formatting.tokenizer, ModelReference(ref))
    assert_dpo_matches_trl(policy, objective, ours, oracle, inputs)


def test_sequence_logps_sum_the_completion_tokens_only(tiny_models, oracle):
    policy, _ = tiny_models
    batch = tinylm_batch(oracle.collated())
    with tinylm.no_grad():
        logps, logits = sequence_logps(policy, batch)
    logp = logits.data - np.logaddexp.reduce(logits.data, axis=-1, keepdims=True)
    t = batch["targets"]
    by_hand = np.where(t != IGNORE, np.take_along_axis(logp, np.maximum(t, 0)[..., None],
                                                       -1)[..., 0], 0.0).sum(axis=1)
    np.testing.assert_allclose(logps.data, by_hand, rtol=1e-12)
    m = completion_metrics(logits.data, t, len(PAIRS))
    chosen = (t != IGNORE) & (np.arange(len(t)) < len(PAIRS))[:, None]
    assert m["logits/chosen"] == pytest.approx(logits.data.mean(-1)[chosen].mean(), rel=1e-12)


def test_precomputed_reference_equals_the_model_reference(tiny_models, prefs):
    policy, ref = tiny_models
    pairs = prefs.examples
    table = reference_logps(ModelReference(ref), policy, pairs, 2, prefs.pad_id)  # 2 + 1
    assert policy.training and table.shape == (len(PAIRS), 2)
    with_ref = WithReference(pairs, table).take([2, 0])  # taken as the pairs are
    batch = pairs.take([2, 0]).batch(np.arange(2), prefs.pad_id)
    direct, pre = DPO(None, ModelReference(ref)), DPO(None, PrecomputedReference())
    a = direct.loss(policy, batch).item()
    b = pre.loss(policy, with_ref.batch(np.arange(2), prefs.pad_id)).item()
    assert b == pytest.approx(a, rel=1e-12)
    assert pre.metrics == pytest.approx(direct.metrics, rel=1e-12)
    with pytest.raises(ConfigError, match="2 reference log-probs for 3 pairs"):
        WithReference(pairs, table[:2])


# --------------------------------------------------------------------------- PEFT: TRL's path


def adapter_grads(model, folder) -> dict:
    """The adapter's gradients in PEFT's names and layout: save_adapter's mapping is
    linear, so exporting the gradients in place of the weights maps them."""
    from tinylm import checkpoint, peft

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.grad
        peft.save_adapter(model, folder)
    finally:
        for p, data in zip(params, saved):
            p.data = data
    return checkpoint.load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_peft_reference_is_the_base_with_adapters_disabled_as_in_trl(tok_file, tmp_path):
    """A new LoRA adapter (drawn nonzero, so the policy differs from its base): TRL's
    reference is the PeftModel with the adapter disabled (no ref_model), tinylm's
    AdapterReference the same; loss, metrics and the adapter's gradients agree."""
    pytest.importorskip("torch")
    datasets = pytest.importorskip("datasets")
    hf_peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from model_helpers import load_in_float64

    from tinylm import peft
    from tinylm.align.dpo import disable_dropout

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_file),
                                                  eos_token="<|endoftext|>")
    hf = random_gpt2(len(hf_tok), 3)
    model = disable_dropout(load_in_float64(hf, tmp_path).train())  # hf is float64 now
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                         max_length=64, bf16=False, fp16=False, beta=0.5)
    config = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                init_lora_weights=False, fan_in_fan_out=True,
                                task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=hf, args=args, processing_class=hf_tok, peft_config=config,
                             train_dataset=datasets.Dataset.from_list(PAIRS))
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    trainer.model.save_pretrained(tmp_path / "adapter")
    peft.load_adapter(model, tmp_path / "adapter")
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    inputs = trainer.data_collator(rows)
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs, False)
    loss.backward()
    theirs = {k: v[0] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}

    objective = DPO(None, AdapterReference(), beta=0.5)
    ours = objective.loss(model, tinylm_batch(inputs))
    ours.backward()
    assert ours.item() == pytest.approx(float(loss), rel=TOL)
    assert_metrics_match(objective.metrics, theirs)
    assert abs(theirs["rewards/margins"]) > 1e-3  # the adapter moved the policy
    grads = adapter_grads(model, tmp_path / "grads")
    torch_grads = {n.replace(".default", ""): p.grad.numpy()
                   for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert set(grads) == set(torch_grads), sorted(set(grads) ^ set(torch_grads))
    for name, g in torch_grads.items():
        err = np.abs(grads[name] - g).max() / np.abs(g).max()
        assert err < TOL, (name, err)
