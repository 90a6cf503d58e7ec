"""Direct Preference Optimisation (DPO) and its variants, computed as TRL 1.16's
``DPOTrainer._compute_loss`` computes them (trl/trainer/dpo_trainer.py), trained by
the one ``tinylm.train.Trainer``.

    reference = AdapterReference()                      # PEFT: the base, adapters off
    objective = DPO(tokenizer, reference, beta=0.1, loss_type="sigmoid")
    loss = objective.loss(model, batch)                 # batch: tinylm.align.preferences
    objective.metrics                                   # {"rewards/chosen": ..., ...}

For pair i (prompt x, chosen y_w, rejected y_l), log pi(y|x) is the sum of the
log-probabilities of the completion's tokens (prompt and padding masked, eos appended
as TRL does: ``tinylm.align.preferences``), under the policy pi and the frozen
reference pi_ref:

    c = log pi(y_w|x) - log pi_ref(y_w|x)       chosen log-ratio
    r = log pi(y_l|x) - log pi_ref(y_l|x)       rejected log-ratio
    d = c - r

    sigmoid  -(1-e) log s(b d) - e log s(-b d)         DPO (Rafailov et al. 2023, eq. 7);
                                                       e > 0: conservative DPO (cDPO)
    ipo      (c / |y_w| - r / |y_l| - 1 / (2 b))^2     IPO (Azar et al. 2023, eq. 17) with
                                                       TRL's per-token averages
    hinge    max(0, 1 - b d)                           SLiC-HF (Zhao et al. 2023)
    robust   (-(1-e) log s(b d) + e log s(-b d)) / (1 - 2e)   rDPO (Chowdhury et al. 2024)

with b = beta, e = label smoothing, s the logistic sigmoid, |y| the completion's
token count; the loss is the mean over the pairs. TRL 1.16 reads ``label_smoothing``
only in robust (and exo_pair, aot): its sigmoid loss ignores it. tinylm's sigmoid
applies it as cDPO, as TRL's sigmoid did before 1.0 (at e = 0 the two agree; TRL
1.16's "aot" on a single pair is the same formula, which the tests use).

Metrics, with TRL's names (the Trainer's metrics hook writes them to metrics.jsonl):
rewards/chosen and rewards/rejected (the mean b c and b r), rewards/accuracies (the
share of pairs with b c > b r), rewards/margins (the mean b (c - r)), logps/chosen and
logps/rejected (the mean summed log-probs), logits/chosen and logits/rejected (the
mean over the completion tokens of the mean logit over the vocabulary), entropy (of
the next-token distribution, over every completion token) and mean_token_accuracy
(the share of chosen completion tokens that are the policy's most likely token).

The reference: ``AdapterReference`` (the policy with its PEFT adapters switched off,
``tinylm.peft.disable_adapters``: no second copy), ``ModelReference`` (a frozen
model: a copy of the base for a full fine-tune, or another model with the same
vocabulary), or ``PrecomputedReference`` (log-probs computed once before training,
``reference_logps``, carried by the batches: ``WithReference``).
"""

from __future__ import annotations

import numpy as np

from tinylm import ops
from tinylm.autograd import no_grad
from tinylm.backend import get_array_module, to_numpy
from tinylm.errors import ConfigError
from tinylm.objectives import IGNORE, Objective, ObjectiveError
from tinylm.ops import log_sigmoid
from tinylm.tensor import Tensor

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
SMOOTHED = ("sigmoid", "robust")  # the losses label smoothing applies to


# --------------------------------------------------------------------------- the losses


def pair_losses(chosen_logratios, rejected_logratios, beta: float, loss_type: str = "sigmoid",
                label_smoothing: float = 0.0, chosen_lengths=None, rejected_lengths=None):
    """Per-pair losses (B,) from the log-ratios c and r (B,) Tensors (the module
    docstring's formulas); ``chosen_lengths`` / ``rejected_lengths`` (B,): the
    completions' token counts, which IPO averages over (at least 1, as TRL)."""
    e = float(label_smoothing)
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ObjectiveError("the ipo loss needs the completions' token counts")
        xp = chosen_logratios.xp
        lc = xp.maximum(xp.asarray(chosen_lengths), 1).astype(chosen_logratios.dtype)
        lr = xp.maximum(xp.asarray(rejected_lengths), 1).astype(chosen_logratios.dtype)
        delta = chosen_logratios / Tensor(lc) - rejected_logratios / Tensor(lr)
        return (delta - 1.0 / (2.0 * beta)) ** 2
    z = (chosen_logratios - rejected_logratios) * beta  # (B,) b d
    if loss_type == "sigmoid":
        if not e:
            return -log_sigmoid(z)  # TRL 1.16's sigmoid, term for term
        return -log_sigmoid(z) * (1.0 - e) - log_sigmoid(-z) * e
    if loss_type == "hinge":
        return (1.0 - z).relu()
    if loss_type == "robust":
        return (-log_sigmoid(z) * (1.0 - e) + log_sigmoid(-z) * e) / (1.0 - 2.0 * e)
    raise ObjectiveError(f"unknown DPO loss {loss_type!r}; pick one of {', '.join(LOSS_TYPES)}")


def check_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    """A ConfigError for options no loss takes."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"unknown DPO loss {loss_type!r}; pick one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    e = label_smoothing
    if e and loss_type not in SMOOTHED:
        raise ConfigError(f"label smoothing applies to the sigmoid (cDPO) and robust losses, "
                          f"not {loss_type}; leave out --label-smoothing")
    if not 0 <= e < 0.5:
        raise ConfigError(f"label smoothing is the chance a preference is flipped and must be "
                          f"in [0, 0.5), got {e}")


# --------------------------------------------------------------------------- log-probs


def sequence_logps(model, batch: dict) -> tuple:
    """(log-probs (2B,) Tensor, logits (2B, T, V) Tensor): each row's log-probability
    of its completion, the sum over the positions whose target is not IGNORE.

    No attention mask is passed: the rows are right-padded, and a causal model's real
    positions never attend to the padding after them (TRL passes the mask; the
    log-probs are the same)."""
    logits = model(batch["ids"]).logits  # (2B, T, V)
    targets = logits.xp.asarray(batch["targets"])
    nll = ops.cross_entropy(logits, targets, reduction="none")  # (2B, T), 0 where ignored
    return -nll.sum(axis=1), logits


def completion_metrics(logits, targets, n_pairs: int) -> dict:
    """TRL's token metrics of a batch (no gradient): logits/chosen, logits/rejected,
    entropy and mean_token_accuracy, over the completion tokens (targets != IGNORE) of
    ``logits`` (2B, T, V) with the chosen rows first."""
    xp = get_array_module(logits)
    targets = xp.asarray(targets)
    mask = targets != IGNORE  # (2B, T)
    z = logits[mask].astype(xp.float64)  # (N, V): the completion positions only
    chosen = xp.nonzero(mask)[0] < n_pairs  # (N,)
    top = z.max(axis=-1, keepdims=True)
    e = xp.exp(z - top)
    total = e.sum(axis=-1)
    entropy = top[:, 0] + xp.log(total) - (e * z).sum(axis=-1) / total  # (N,)
    mean_logit = z.mean(axis=-1)  # (N,)
    hit = z.argmax(axis=-1) == targets[mask]

    def share(values, where):
        n = int(where.sum())
        return float(values[where].sum()) / n if n else 0.0

    return {"logits/chosen": share(mean_logit, chosen),
            "logits/rejected": share(mean_logit, ~chosen),
            "entropy": share(entropy, xp.ones_like(chosen)),
            "mean_token_accuracy": share(hit.astype(xp.float64), chosen)}


# --------------------------------------------------------------------------- references


class AdapterReference:
    """The policy's own base, with its PEFT adapters switched off for the reference
    forward (``tinylm.peft.disable_adapters``): no second copy in memory."""

    kind = "adapters disabled"

    def logps(self, policy, batch: dict):
        from tinylm import peft

        with no_grad(), peft.disable_adapters(policy):
            return sequence_logps(policy, batch)[0].data


class ModelReference:
    """A frozen model (a copy of the base, or another model with the same vocabulary),
    in eval mode; ``name``: where it came from."""

    kind = "model"

    def __init__(self, model, name: str = "the reference"):
        self.model, self.name = model.eval(), name
        model.requires_grad_(False)

    def logps(self, policy, batch: dict):
        with no_grad():
            return sequence_logps(self.model, batch)[0].data


class PrecomputedReference:
    """Reference log-probs computed before training, read from the batch
    (``WithReference`` puts them there)."""

    kind = "precomputed"

    def logps(self, policy, batch: dict):
        if "ref_chosen_logps" not in batch:
            raise ObjectiveError("the batch carries no precomputed reference log-probs; "
                                 "wrap the pairs in WithReference")
        return np.concatenate([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])


def check_same_vocabulary(policy, reference, name: str) -> None:
    """A ConfigError when ``reference`` scores another vocabulary than ``policy``."""
    a, b = reference.config.vocab_size, policy.config.vocab_size
    if a != b:
        raise ConfigError(f"the reference model {name} has a vocabulary of {a} ids, the model "
                          f"{b}: DPO compares the two models' log-probabilities of the same "
                          f"tokens; give a reference with the model's tokenizer")


def disable_dropout(model):
    """Every dropout in ``model`` set to 0, as TRL's DPOTrainer does by default
    (``disable_dropout=True``): the policy's log-probs must be those the reference
    comparison assumes. Dropout layers, attention dropout and adapters' dropout."""
    from tinylm.nn.layers import Dropout

    for module in model.modules():
        if isinstance(module, Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    return model


# --------------------------------------------------------------------------- precomputed


class WithReference:
    """Preference pairs (``tinylm.align.preferences.Pairs``) with the reference's
    log-probs of each pair, ``ref`` (n, 2): chosen, rejected. Taken and batched as the
    pairs are; each batch gains ``ref_chosen_logps`` and ``ref_rejected_logps`` (B,)."""

    packed = False

    def __init__(self, pairs, ref):
        ref = np.asarray(ref, dtype=np.float64)
        if ref.shape != (len(pairs), 2):
            raise ConfigError(f"{ref.shape[0] if ref.ndim else 0} reference log-probs for "
                              f"{len(pairs)} pairs; compute them for this data")
        self.pairs, self.ref = pairs, ref

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def margins(self):
        return self.pairs.margins

    def take(self, index) -> "WithReference":
        index = np.asarray(index, dtype=np.int64)
        return WithReference(self.pairs.take(index), self.ref[index])

    def batch(self, index, pad_id: int) -> dict:
        batch = self.pairs.batch(index, pad_id)
        ref = self.ref[np.asarray(index, dtype=np.int64)]  # (B, 2)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        return batch

    def prompt(self, i: int) -> list:
        return self.pairs.prompt(i)


def reference_logps(reference, policy, pairs, batch_size: int, pad_id: int) -> np.ndarray:
    """(n, 2) float64: the reference's log-probs of every pair's chosen and rejected
    completion, in order (TRL's ``precompute_ref_log_probs``)."""
    from tinylm.instruct import in_order

    out = np.empty((len(pairs), 2), dtype=np.float64)
    start = 0
    was_training = policy.training
    policy.eval()
    try:
        for batch in in_order(pairs, batch_size, pad_id):
            logps = to_numpy(reference.logps(policy, batch)).astype(np.float64)  # (2B,)
            B = len(logps) // 2
            out[start:start + B] = logps.reshape(2, B).T
            start += B
    finally:
        policy.train(was_training)
    return out


# --------------------------------------------------------------------------- the objective


class DPO(Objective):
    """The DPO objective over preference batches (``tinylm.align.preferences``: ids,
    targets (2B, T), chosen rows first). ``reference``: one of the reference classes
    above. Options: ``beta``, ``loss_type`` (LOSS_TYPES), ``label_smoothing``. The
    Trainer weights micro-batches by their pairs (``n_targets``), as the loss is a
    mean over pairs."""

    name = "dpo"
    kinds = ("decoder",)
    examples = True
    options = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0}
    progress_metrics = ("rewards/accuracies", "rewards/margins")
    perplexity = False  # the loss is no cross-entropy (the Trainer reports no val_ppl)

    def __init__(self, tokenizer=None, reference=None, **options):
        super().__init__(tokenizer, **options)
        check_options(self.beta, self.loss_type, self.label_smoothing)
        self.reference = reference if reference is not None else AdapterReference()
        self.metrics = {}

    def make_batch(self, rows, rng) -> dict:
        if not isinstance(rows, dict) or "targets" not in rows or len(rows["ids"]) % 2:
            raise ObjectiveError("objective 'dpo' trains on preference pairs (prompt, chosen, "
                                 "rejected): use `tinylm align dpo --data FILE.jsonl`")
        return rows

    def n_targets(self, batch: dict) -> int:
        return len(batch["ids"]) // 2

    def loss(self, model, batch: dict):
        logps, logits = sequence_logps(model, batch)  # (2B,)
        ref = logps.xp.asarray(self.reference.logps(model, batch), dtype=logps.dtype)
        B = len(ref) // 2
        chosen = logps[:B] - Tensor(ref[:B])  # (B,) log-ratios
        rejected = logps[B:] - Tensor(ref[B:])
        counts = to_numpy((np.asarray(batch["targets"]) != IGNORE).sum(axis=1))  # (2B,)
        losses = pair_losses(chosen, rejected, self.beta, self.loss_type,
                             self.label_smoothing, counts[:B], counts[B:])
        self.metrics = {**self._reward_metrics(chosen.data, rejected.data, logps.data, B),
                        **completion_metrics(logits.data, batch["targets"], B)}
        return losses.mean()

    def _reward_metrics(self, chosen, rejected, logps, B: int) -> dict:
        """TRL's rewards/* and logps/* of one batch."""
        cr, rr = self.beta * chosen, self.beta * rejected  # (B,) implicit rewards
        return {"rewards/chosen": float(cr.mean()), "rewards/rejected": float(rr.mean()),
                "rewards/accuracies": float((cr > rr).mean()),
                "rewards/margins": float((cr - rr).mean()),
                "logps/chosen": float(logps[:B].mean()), "logps/rejected": float(logps[B:].mean())}
