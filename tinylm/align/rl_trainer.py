"""An RL run (GRPO, RLOO): the Trainer with rollouts in place of a data batcher's
batches, and the parts `tinylm align grpo` / `rloo` put together.

    trainer = RLTrainer(config, rl=RLConfig("grpo", num_generations=8),
                        rewards={"exact-match": exact_match}, model=model,
                        tokenizer=tokenizer, data=PromptData.read(...),
                        objective=GRPO(tokenizer, rl), reference=None)
    trainer.fit()

Everything else is ``tinylm.train.Trainer``'s (progress, metrics.jsonl, NaN stop,
Ctrl-C, checkpoints). One optimizer step takes ``grad_accum`` micro-batches of
``batch_size`` prompts from the resumable prompt batcher; the first step of a
generation samples G completions of each (``tinylm.align.rollouts``, drawing from the
Trainer's seeded objective generator), scores them with the reward functions, computes
the advantages over the whole generation batch and, when needed, the old policy's and
the reference's log-probabilities; the next ``num_iterations - 1`` steps reuse that
buffer (TRL's ``_buffered_inputs``).

Resuming is bit for bit, mid-buffer included: a checkpoint holds the Trainer's state
(weights, AdamW, the prompt batcher's position, the generator the rollouts draw
from) and the live rollout buffer itself (its arrays in trainer_state.json, exactly,
``rollouts.encode``), so a resumed run trains its next steps on the very completions
the interrupted one would have. The reference: None runs the policy with its adapters
disabled (a PEFT run: no second copy); a model (a full fine-tune: the base loaded a
second time, frozen) runs itself; beta = 0 runs none.

A reward function that raises or returns a bad value stops the run with a
``RewardError`` naming it, the prompt and the completion; the checkpoint of the last
finished step is saved first (the generator and batcher put back as they were before
the failed rollout), so the same command resumes there once the function is fixed.
"""

from __future__ import annotations

import copy

import numpy as np

from tinylm.align.rewards import RewardError, score
from tinylm.align.rl import RLConfig, grpo_advantages, rloo_advantages, sequence_kl
from tinylm.align.rollouts import (
    decode, encode, layout, mask_truncated, sample_groups, token_logps_array,
)
from tinylm.train import Trainer


class RLTrainer(Trainer):
    """``Trainer`` with rollouts (the module docstring). ``rl``: the RLConfig;
    ``rewards``: {name: reward function} (summed); ``reference``: as the module
    docstring says; ``eos_ids``: the ids that end a completion (None: the model's)."""

    def __init__(self, config, *, rl: RLConfig, rewards: dict, reference=None, eos_ids=None,
                 **options):
        super().__init__(config, **options)
        if not rewards:
            raise RewardError("an RL run needs a reward: --reward NAME or --reward-model DIR")
        self.rl, self.rewards, self.reference = rl, dict(rewards), reference
        self.eos_ids = eos_ids
        self.buffer, self.buffer_uses = None, 0

    # ------------------------------------------------------------------ batches

    def next_batches(self) -> list:
        """This step's micro-batches: the buffered rollouts, or new ones."""
        if self.buffer is None or self.buffer_uses >= self.rl.num_iterations:
            self.buffer, self.buffer_uses = None, 0
            self.buffer = self._generate_safely()
        self.buffer_uses += 1
        return self.buffer

    def _generate_safely(self) -> list:
        rng_state = copy.deepcopy(self.objective_rng.bit_generator.state)
        position = copy.deepcopy(self.batcher.state_dict())
        try:
            return self.generate_rollouts()
        except RewardError as e:
            self.objective_rng.bit_generator.state = rng_state
            self.batcher.load_state_dict(position)
            if self.last_saved_step != self.step:
                self.save()
            raise RewardError(f"{e}. The run stopped; the checkpoint of step {self.step} is "
                              f"in {self.config.out_dir}: run the same command again to "
                              f"resume") from None

    def generate_rollouts(self) -> list:
        """One generation batch: ``grad_accum`` micro-batches of rollouts, their
        advantages computed over all of them."""
        from tinylm.generate import default_eos_ids

        eos = self.eos_ids if self.eos_ids is not None else \
            default_eos_ids(self.model, self.tokenizer)
        parts = [self._rollout(self.batcher.next(), eos) for _ in range(self.config.grad_accum)]
        rewards = np.concatenate([p.pop("rewards_per_function") for p in parts])  # (N, F)
        total = rewards.sum(axis=1)  # (N,)
        if self.rl.method == "rloo" and self.rl.beta != 0:
            kl = np.concatenate([sequence_kl(p["old_logps"], p["ref_logps"],
                                             p["completion_mask"]) for p in parts])
            total = total - self.rl.beta * kl
        G = self.rl.num_generations
        if self.rl.method == "grpo":
            advantages, std = grpo_advantages(total, G, self.rl.scale_rewards)
        else:
            advantages = rloo_advantages(total, G, self.rl.normalize_advantages)
            std = np.repeat(np.std(total.reshape(-1, G), axis=1, ddof=1), G)
        stats = self._stats(parts, rewards, std)
        start = 0
        for p in parts:
            n = len(p["completion_ids"])
            p["advantages"], p["stats"] = advantages[start:start + n], stats
            start += n
        return parts

    def _rollout(self, prompts: dict, eos) -> dict:
        """G completions of each prompt of a micro-batch, laid out, scored, with the
        old policy's and the reference's log-probabilities if the loss needs them."""
        G, rl, pad = self.rl.num_generations, self.rl, self.data.pad_id
        completions = sample_groups(self.model, prompts["prompt_ids"], G,
                                    max_new_tokens=rl.max_completion_length,
                                    temperature=rl.temperature, eos_ids=eos,
                                    rng=self.objective_rng)
        rows = [p for p in prompts["prompt_ids"] for _ in range(G)]
        batch = layout(rows, completions, pad)
        batch["lengths"] = np.array([len(c) for c in completions], dtype=np.int64)
        batch["truncated"] = np.array([c[-1] not in eos for c in completions])
        if rl.mask_truncated_completions:
            mask_truncated(batch, eos, pad)
        batch["rewards_per_function"] = self._score(prompts, completions)
        if rl.needs_old_logps:
            batch["old_logps"] = token_logps_array(self.model, batch, rl.temperature)
        if rl.beta != 0:
            batch["ref_logps"] = self._reference_logps(batch)
        return batch

    def _score(self, prompts: dict, completions: list) -> np.ndarray:
        G = self.rl.num_generations
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        given = [p for p in prompts["prompts"] for _ in range(G)]
        if given and not isinstance(given[0], str):  # conversational: TRL's message form
            texts = [[{"role": "assistant", "content": t}] for t in texts]
        fields = {k: [f[k] for f in prompts["fields"] for _ in range(G)]
                  for k in (prompts["fields"][0] if prompts["fields"] else {})}
        return score(self.rewards, given, texts, completions, fields)

    def _reference_logps(self, batch: dict) -> np.ndarray:
        if self.reference is not None:
            return token_logps_array(self.reference, batch, self.rl.temperature)
        from tinylm import peft

        with peft.disable_adapters(self.model):
            return token_logps_array(self.model, batch, self.rl.temperature)

    def _stats(self, parts: list, rewards: np.ndarray, std: np.ndarray) -> dict:
        """The generation batch's metrics, TRL's names."""
        total = rewards.sum(axis=1)
        lengths = np.concatenate([p["lengths"] for p in parts])  # (N,) tokens
        truncated = np.concatenate([p["truncated"] for p in parts])
        stats = {"reward": float(total.mean()), "reward_std": float(np.std(total, ddof=1)),
                 "frac_reward_zero_std": float(np.isclose(std, 0).mean()),
                 "completions/mean_length": float(lengths.mean()),
                 "completions/min_length": float(lengths.min()),
                 "completions/max_length": float(lengths.max()),
                 "completions/clipped_ratio": float(truncated.mean())}
        for j, name in enumerate(self.rewards):
            stats[f"rewards/{name}/mean"] = float(rewards[:, j].mean())
            stats[f"rewards/{name}/std"] = float(np.std(rewards[:, j], ddof=1))
        if self.rl.method == "rloo" and self.rl.beta != 0:
            kl = sum(float(((p["old_logps"] - p["ref_logps"]) * p["completion_mask"]).sum())
                     for p in parts)
            stats["kl"] = kl / max(sum(float(p["completion_mask"].sum()) for p in parts), 1.0)
        return stats

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict:
        state = super()._state()
        live = self.buffer is not None and self.buffer_uses < self.rl.num_iterations
        state["rollouts"] = ({"uses": self.buffer_uses,
                              "batches": [encode(b) for b in self.buffer]} if live else None)
        return state

    def _restore(self, run) -> None:
        super()._restore(run)
        saved = run.state.get("rollouts")
        if saved:
            self.buffer = [decode(b) for b in saved["batches"]]
            self.buffer_uses = int(saved["uses"])
