"""GRPO and RLOO: the advantages and the losses, as TRL 1.16 computes them.

The formulations followed, and the code they are read from:

- GRPO, Group Relative Policy Optimization: Shao et al. 2024, "DeepSeekMath: Pushing
  the Limits of Mathematical Reasoning in Open Language Models", arXiv:2402.03300
  (section 4.1), as TRL 1.16's ``trl/trainer/grpo_trainer.py`` implements it
  (``_generate_and_score_completions``: the advantages; ``_compute_loss``: the loss)
  with ``GRPOConfig``'s defaults (``trl/trainer/grpo_config.py``).
- RLOO, REINFORCE Leave-One-Out: Ahmadian et al. 2024, "Back to Basics: Revisiting
  REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
  arXiv:2402.14740, as TRL 1.16's ``trl/trainer/rloo_trainer.py`` implements it, with
  ``RLOOConfig``'s defaults (``trl/trainer/rloo_config.py``).

GRPO. Each prompt gets G completions o_1..o_G with rewards r_i (the sum of the reward
functions). Advantages, one per completion (``grpo_advantages``)::

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)     scale_rewards = "group" (default)
          std over the whole generation batch                scale_rewards = "batch"
          r_i - mean(r_group)                                scale_rewards = "none" (Dr. GRPO)

(std with Bessel's correction, TRL's ``nanstd``). Per completion token t, with the
policy's log-probability logp, the log-probability when the completions were sampled
old (the same as logp, detached, when ``num_iterations`` is 1: TRL skips computing it
then) and the reference's ref::

    ratio_t = exp(logp_t - old_t)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                # k3 KL estimate
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A)
              + beta * ratio_t * kl_t

(the KL term times the ratio: TRL 1.16's default ``use_bias_correction_kl``, the
unbiased reverse-KL gradient of DeepSeek-V3.2, arXiv:2512.02556; off: beta * kl_t)

aggregated over the completion mask m as ``loss_type`` says (``LOSS_TYPES``): "dapo"
(TRL's default: the sum over every completion token of the optimizer step's batch,
divided by their number), "bnpo" (the same per micro-batch), "grpo" (each
completion's mean, then the mean over completions: the paper's), "dr_grpo" (the sum
divided by completions x max_completion_length). beta defaults to 0.0 (TRL's default:
no reference model is run).

RLOO. The KL penalty goes into the reward, with the first-order estimate summed over
the completion: r_i <- r_i - beta * sum_t (old_t - ref_t) (beta 0.05 by default, so the
reference runs); the baseline of a completion is the mean reward of the other G - 1 of
its group (``rloo_advantages``), A_i = r_i - baseline_i, normalised over the batch when
``normalize_advantages``. The ratio is per sequence::

    ratio_i = exp(sum_t m_t logp_t - sum_t m_t old_t)
    loss    = mean_i -min(ratio_i * A_i, clip(ratio_i, 1 - epsilon, 1 + epsilon_high) * A_i)

Metrics (the Trainer's metrics hook, into metrics.jsonl, TRL's names): reward,
reward_std, frac_reward_zero_std, rewards/NAME/mean and /std, completions/mean_length
(and min, max, clipped_ratio), kl, entropy, clip_ratio/low_mean, /high_mean,
/region_mean. Where tinylm differs from TRL: ``--batch-size`` counts prompts (each
gives G rows; TRL's per-device batch counts completions); one generation batch is one
optimizer step's micro-batches (TRL's default ``steps_per_generation``), reused for
``num_iterations`` steps and not shuffled (the step's gradient is the same, but for
"bnpo", whose micro-batches divide by their own token counts); the old
and reference log-probabilities are computed in eval mode (TRL: in the model's mode,
so with its dropout; the same without), and RLOO's old ones only when it needs them
(num_iterations > 1, or its KL: otherwise the ratio is 1, as it is in TRL up to
rounding); rewards must be finite numbers (TRL's None, "not scored", is refused).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from tinylm.errors import ConfigError
from tinylm.objectives import Objective, ObjectiveError

METHODS = ("grpo", "rloo")
DEFAULT_COMPLETION_LENGTH = 256  # the most max_completion_length=None picks (TRL: 512,
#                                  long for a CPU)
LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")  # TRL's clipped-ratio losses; dapo default
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
# TRL's defaults that differ between the two trainers
METHOD_DEFAULTS = {"grpo": {"num_generations": 8, "beta": 0.0},
                   "rloo": {"num_generations": 2, "beta": 0.05}}


@dataclass(frozen=True)
class RLConfig:
    """An RL run's settings (TRL's GRPOConfig / RLOOConfig names); None takes the
    method's TRL default (METHOD_DEFAULTS). ``loss_type`` and ``scale_rewards`` are
    GRPO's, ``normalize_advantages`` RLOO's."""

    method: str = "grpo"
    num_generations: int | None = None
    beta: float | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    num_iterations: int = 1
    # None: what fits, min(DEFAULT_COMPLETION_LENGTH, block size - the longest prompt),
    # resolved by ``rl_run.run`` once the prompts are read (a fixed 256 refused every
    # model of a 64-token context)
    max_completion_length: int | None = None
    temperature: float = 1.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    normalize_advantages: bool = False
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"RL method must be one of {', '.join(METHODS)}, got "
                              f"{self.method!r}")
        for name, value in METHOD_DEFAULTS[self.method].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon)
        problems = self._problems()
        if problems:
            raise ConfigError("invalid RL settings: " + "; ".join(problems))

    def _problems(self) -> list:
        p = []
        if self.num_generations < 2:
            p.append(f"num_generations must be >= 2 (a group needs a baseline), got "
                     f"{self.num_generations}")
        for name in ("num_iterations", "max_completion_length"):
            value = getattr(self, name)
            if value is None and name == "max_completion_length":
                continue  # resolved against the prompts (rl_run.run)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                p.append(f"{name} must be an integer >= 1, got {value!r}")
        if not self.temperature > 0:
            p.append(f"temperature must be > 0 (the log-probabilities divide by it), got "
                     f"{self.temperature}")
        for name in ("beta", "epsilon", "epsilon_high"):
            if not getattr(self, name) >= 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss_type not in LOSS_TYPES:
            p.append(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            p.append(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got "
                     f"{self.scale_rewards!r}")
        return p

    def record(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def needs_old_logps(self) -> bool:
        """Whether the policy's log-probabilities are computed when the completions are
        sampled: reused batches need them (num_iterations > 1), and RLOO's KL reward."""
        return self.num_iterations > 1 or (self.method == "rloo" and self.beta != 0)


# --------------------------------------------------------------------------- advantages


def _std(x, axis=None):
    """Standard deviation with Bessel's correction (TRL's nanstd, no NaN here)."""
    return np.std(x, axis=axis, ddof=1)


def grpo_advantages(rewards, num_generations: int, scale_rewards: str = "group") -> tuple:
    """(advantages (N,), the std each was scaled by (N,)) of N = B*G rewards, each
    prompt's G completions consecutive (TRL's GRPO, ``multi_objective_aggregation``
    "sum_then_normalize": the rewards are the sums of the functions')."""
    r = np.asarray(rewards, dtype=np.float64)
    grouped = r.reshape(-1, num_generations)  # (B, G)
    mean = np.repeat(grouped.mean(axis=1), num_generations)  # (N,)
    if scale_rewards == "batch":
        std = np.full_like(r, _std(r)) if r.size > 1 else np.zeros_like(r)
    else:  # "group", and "none" (which keeps it for frac_reward_zero_std only)
        std = np.repeat(_std(grouped, axis=1), num_generations)
    advantages = r - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return advantages, std


def sequence_kl(old_logps, ref_logps, mask) -> np.ndarray:
    """(N,) RLOO's KL of each completion, the first-order estimate summed over its
    tokens: sum_t m_t (old_t - ref_t) (TRL's RLOO; it may be negative). The reward is
    r - beta * this."""
    return ((np.asarray(old_logps) - np.asarray(ref_logps)) * mask).sum(axis=1)


def rloo_advantages(rewards, num_generations: int, normalize: bool = False) -> np.ndarray:
    """Advantages (N,) of N = B*G rewards against the leave-one-out baseline: the mean
    of the other G - 1 rewards of the group (TRL's RLOO); with ``normalize``,
    standardised over the whole batch ((A - mean) / (std + 1e-4))."""
    r = np.asarray(rewards, dtype=np.float64)
    grouped = r.reshape(-1, num_generations)  # (B, G)
    baselines = (grouped.sum(axis=1, keepdims=True) - grouped) / (num_generations - 1)
    advantages = r - baselines.reshape(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (_std(advantages) + STD_EPS)
    return advantages


# --------------------------------------------------------------------------- the losses


def _on(array, like):
    """``array`` (NumPy) on ``like``'s device, in its dtype (floats) or as it is (bools)."""
    a = np.asarray(array)
    return like.xp.asarray(a, dtype=None if a.dtype == bool else like.data.dtype)


def _clipped_objective(ratio, advantages, low: float, high: float):
    """-min(ratio * A, clip(ratio, 1 - low, 1 + high) * A) elementwise (a Tensor), and
    the ratio values (NumPy); ``advantages`` an array on ratio's device. The clipped
    term carries no gradient where the clip is active and equals the unclipped one
    where it is not, so choosing between the two by value gives torch.min's gradient."""
    from tinylm import backend, ops

    xp = ratio.xp
    unclipped = ratio * advantages
    clipped = xp.clip(ratio.data, 1 - low, 1 + high) * advantages
    return -ops.where(unclipped.data <= clipped, unclipped, clipped), \
        backend.to_numpy(ratio.data)


def _masked_mean(x, mask) -> float:
    return float((x * mask).sum() / max(float(mask.sum()), 1.0))


class PolicyGradient(Objective):
    """The part GRPO and RLOO share: batches are rollouts (``tinylm.align.rollouts``,
    built by ``tinylm.align.rl_trainer``), the loss reads their log-probabilities,
    advantages and masks. ``rl``: an RLConfig."""

    kinds = ("decoder",)
    examples = True
    progress_metrics = ("reward", "kl")

    def __init__(self, tokenizer=None, rl: RLConfig | None = None):
        super().__init__(tokenizer)
        self.rl = rl if rl is not None else RLConfig(method=self.name)
        if self.rl.method != self.name:
            raise ObjectiveError(f"objective {self.name!r} was given {self.rl.method!r} "
                                 f"settings")
        self.metrics = {}

    def make_batch(self, rows, rng) -> dict:
        if not isinstance(rows, dict) or "advantages" not in rows:
            raise ObjectiveError(f"objective {self.name!r} trains on rollouts: use `tinylm "
                                 f"align {self.name} --data PROMPTS.jsonl`")
        return rows

    def n_targets(self, batch: dict) -> int:
        """The micro-batch's weight in the step: its completions (the losses that
        average per micro-batch), or its completion tokens ("dapo")."""
        if self.name == "grpo" and self.rl.loss_type == "dapo":
            return int(batch["completion_mask"].sum())
        return int(batch["completion_mask"].shape[0])

    def _logps(self, model, batch):
        from tinylm.align.rollouts import completion_logits, entropy, token_logps

        logits = completion_logits(model, batch, self.rl.temperature)
        logp = token_logps(model, batch, logits=logits)  # (R, C)
        return logp, entropy(logits)

    def _clip_metrics(self, r, advantages, weights) -> dict:
        low = (r < 1 - self.rl.epsilon) & (advantages < 0)
        high = (r > 1 + self.rl.epsilon_high) & (advantages > 0)
        return {"clip_ratio/low_mean": _masked_mean(low, weights),
                "clip_ratio/high_mean": _masked_mean(high, weights),
                "clip_ratio/region_mean": _masked_mean(low | high, weights)}


class GRPO(PolicyGradient):
    """GRPO's loss on a rollout batch (the module docstring's formula)."""

    name = "grpo"

    def loss(self, model, batch):
        from tinylm import backend

        rl, mask = self.rl, batch["completion_mask"]  # (R, C) NumPy
        logp, ent = self._logps(model, batch)
        old = batch.get("old_logps")  # None: on policy, the ratio is exactly 1
        old = logp.data.copy() if old is None else _on(old, logp)
        adv = _on(batch["advantages"][:, None], logp)  # (R, 1)
        ratio = (logp - old).exp()  # (R, C)
        per_token, r = _clipped_objective(ratio, adv, rl.epsilon, rl.epsilon_high)
        metrics = {}
        if rl.beta != 0:
            d = -(logp - _on(batch["ref_logps"], logp))  # ref - logp
            kl = d.exp() - d - 1
            if rl.use_bias_correction_kl:
                kl = kl * ratio
            per_token = per_token + kl * rl.beta
            metrics["kl"] = _masked_mean(backend.to_numpy(kl.data), mask)
        m = _on(mask, logp)
        if rl.loss_type == "grpo":
            lengths = logp.xp.maximum(m.sum(axis=-1), 1)  # (R,)
            loss = ((per_token * m).sum(axis=-1) * (1.0 / lengths)).mean()
        elif rl.loss_type == "dr_grpo":
            loss = (per_token * m).sum() * (1.0 / (m.shape[0] * rl.max_completion_length))
        else:  # "bnpo", and "dapo" whose micro-batches the Trainer weights by their tokens
            loss = (per_token * m).sum() * (1.0 / max(float(mask.sum()), 1.0))
        advantages = np.broadcast_to(batch["advantages"][:, None], r.shape)
        self.metrics = {**batch.get("stats", {}), **metrics, "entropy": _masked_mean(ent, mask),
                        **self._clip_metrics(r, advantages, mask)}
        return loss


class RLOO(PolicyGradient):
    """RLOO's loss on a rollout batch (the module docstring's formula)."""

    name = "rloo"

    def loss(self, model, batch):
        rl, mask = self.rl, batch["completion_mask"]  # (R, C) NumPy
        logp, ent = self._logps(model, batch)
        seq = (logp * _on(mask, logp)).sum(axis=-1)  # (R,)
        old = batch.get("old_logps")  # None: on policy, the ratio is exactly 1
        old = seq.data.copy() if old is None else _on((old * mask).sum(axis=-1), seq)
        adv = _on(batch["advantages"], seq)  # (R,)
        per_seq, r = _clipped_objective((seq - old).exp(), adv, rl.epsilon, rl.epsilon_high)
        self.metrics = {**batch.get("stats", {}), "entropy": _masked_mean(ent, mask),
                        **self._clip_metrics(r, batch["advantages"], np.ones(len(r)))}
        return per_seq.mean()
