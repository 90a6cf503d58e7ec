"""An RL run (GRPO, RLOO) from the command line's parts: the base loaded and adapted as
``tinylm.finetune`` does, the prompts read, the reward functions looked up, the
reference chosen, ``tinylm.align.rl_trainer.RLTrainer`` run, the adapter written.

    spec = FinetuneSpec("hf/gpt2", "lora", {"r": 8})
    result = run(spec, {"out_dir": "runs/grpo", "data": ["prompts.jsonl"]},
                 RLConfig("grpo", num_generations=8), rewards=["exact-match"])

The run record kept with every checkpoint is a fine-tune's (``FinetuneSpec.record``:
`tinylm generate --model BASE --adapter OUT` loads a PEFT run's adapter, even from a
checkpoint) plus "rl" (the RLConfig) and "rewards" (their names, or the reward model's
folder); resuming with other ones is an error naming them.
"""

from __future__ import annotations

import math
import os

import numpy as np

from tinylm.align.rl import GRPO, RLOO, RLConfig
from tinylm.errors import ConfigError

# TrainConfig settings an RL run starts from (TRL's GRPOConfig / RLOOConfig: lr 1e-6, no
# warmup or weight decay; every step logged, no validation split)
DEFAULTS = {"lr": 1e-6, "warmup_steps": 0, "weight_decay": 0.0, "batch_size": 4,
            "log_every": 1, "eval_every": 100, "sample_tokens": 0, "val_fraction": 0.0}
REWARD_MODEL = "reward-model"  # the name a --reward-model scorer's rewards are logged under


def reward_functions(names, reward_model=None, device: str = "cpu") -> dict:
    """{name: callable} of the registered reward functions ``names`` and, with
    ``reward_model`` (a `tinylm align reward` run folder), its scorer."""
    from tinylm import plugins

    found = {}
    for name in names:
        if name in found:
            raise ConfigError(f"--reward {name} is given twice; give each reward once")
        found[name] = plugins.get_reward_function(name)
    if reward_model is not None:
        from tinylm.align.reward_run import load_reward_model

        found[REWARD_MODEL] = load_reward_model(reward_model, device=device)
    if not found:
        raise ConfigError("give a reward: --reward NAME (a registered reward function, e.g. "
                          "exact-match) or --reward-model DIR (a `tinylm align reward` run)")
    return found


def record(spec, model, rl: RLConfig, names, reward_model) -> dict:
    return {**spec.record(model), "rl": rl.record(), "rewards": list(names),
            "reward_model": None if reward_model is None else os.path.abspath(reward_model)}


def check_resume(spec, state: dict, out_dir: str, mine: dict) -> None:
    """A ConfigError unless ``out_dir``'s checkpoint is an RL run of the same base,
    adapter, RL settings and rewards."""
    from tinylm import finetune

    saved = state.get("extra") or {}
    if "rl" not in saved:
        raise ConfigError(f"{out_dir} holds a run that is not an RL run; pick another --out, "
                          f"or pass --overwrite to start over")
    finetune.check_resume(spec, state, out_dir)
    differs = [f"{k} = {mine[k]!r} (the checkpoint has {saved.get(k)!r})"
               for k in ("rl", "rewards", "reward_model") if mine[k] != saved.get(k)]
    if differs:
        raise ConfigError(f"{out_dir} holds an RL run with other settings: {'; '.join(differs)}; "
                          f"resume with the same ones, pick another --out, or pass --overwrite")


def _config(spec, settings: dict, model, rl: RLConfig):
    from tinylm import finetune

    if settings.get("val_fraction"):
        raise ConfigError("an RL run has no validation split (its curve is the training "
                          "reward); leave out --val-fraction")
    config = finetune._config(spec, {**DEFAULTS, "objective": rl.method, **settings}, model)
    if rl.max_completion_length is None:  # resolved against the prompts (resolve_length)
        if config.block_size < 2:
            raise ConfigError(f"--block-size {config.block_size} leaves no room for a prompt "
                              f"and a completion; give at least 2")
        return config
    if config.block_size <= rl.max_completion_length:
        raise ConfigError(f"--block-size {config.block_size} leaves no room for the prompt "
                          f"after --max-completion-length {rl.max_completion_length}; raise "
                          f"the one or lower the other")
    return config


def resolve_length(rl: RLConfig, block_size: int, data) -> RLConfig:
    """``rl`` with max_completion_length None resolved to what fits every prompt of
    ``data`` (a ``PromptData``): min(DEFAULT_COMPLETION_LENGTH, block_size - the longest
    prompt); ``rl`` itself when it has a length."""
    import dataclasses

    from tinylm.align.rl import DEFAULT_COMPLETION_LENGTH

    if rl.max_completion_length is not None:
        return rl
    longest = int(np.diff(data.examples.ids.offsets).max())
    return dataclasses.replace(rl, max_completion_length=min(DEFAULT_COMPLETION_LENGTH,
                                                             block_size - longest))


def _default_length() -> int:
    from tinylm.align.rl import DEFAULT_COMPLETION_LENGTH

    return DEFAULT_COMPLETION_LENGTH


def _with_epochs(config, data, rl: RLConfig, epochs: float):
    """max_steps = the steps ``epochs`` passes over the prompts take: each generation
    batch trains ``num_iterations`` steps (TRL's repeated sampler)."""
    values = config.to_dict()
    per_generation = config.batch_size * config.grad_accum
    values["max_steps"] = max(math.ceil(epochs * len(data) / per_generation), 1) \
        * rl.num_iterations
    return type(config).from_dict(values)


def _reference(spec, rl: RLConfig, model, device: str):
    """The frozen reference of a full fine-tune (the base, loaded again); None for a PEFT
    run (its adapters disabled) or when beta is 0 (none is run)."""
    from tinylm import finetune

    if rl.beta == 0 or spec.method != finetune.FULL:
        return None
    reference = finetune.load_base(spec, device)[0].eval()
    return reference.requires_grad_(False)


def run(spec, settings: dict, rl: RLConfig, *, rewards=(), reward_model=None,
        epochs: float | None = None, overwrite: bool = False, merge: bool = False, log=None,
        progress: bool = False):
    """Train ``spec``'s base with ``rl`` on the prompt files in ``settings["data"]``
    (TrainConfig fields, out_dir among them), rewarded by the registered functions
    ``rewards`` (names) and/or the reward model in ``reward_model``. Every input is
    checked before anything is written; a checkpoint in out_dir resumes unless
    ``overwrite``. Returns the Trainer's summary with "written"."""
    from tinylm import finetune, peft
    from tinylm.align.prompt_data import PromptData
    from tinylm.align.rl_trainer import RLTrainer
    from tinylm.rundir import open_run
    from tinylm.train import TrainConfig

    log = log or (lambda msg: None)
    device = settings.get("device", "cpu")
    scorers = reward_functions(rewards, reward_model, device)
    with open_run(settings["out_dir"], overwrite=overwrite) as folder:
        if overwrite:
            finetune.remove_outputs(folder.path)
        model, tokenizer = finetune.load_base(spec, device)
        config = _config(spec, settings, model, rl)
        finetune.adapt(model, spec, seed=config.seed)
        fmt = finetune.formatting(model, tokenizer, spec, config.block_size, log=log)
        if rl.max_completion_length is None:  # what the longest prompt leaves
            measure = type(fmt)(fmt.tokenizer, fmt.eos_id, config.block_size - 1,
                                fmt.template, fmt.text_field)
            rl = resolve_length(rl, config.block_size,
                                PromptData.read(config.data, measure, seed=config.seed))
            log(f"max completion length: {rl.max_completion_length} tokens (what --block-size "
                f"{config.block_size} leaves after the longest prompt, at most "
                f"{_default_length()}; --max-completion-length sets it)")
        fmt = type(fmt)(fmt.tokenizer, fmt.eos_id, config.block_size - rl.max_completion_length,
                        fmt.template, fmt.text_field)
        data = PromptData.read(config.data, fmt, seed=config.seed)
        mine = record(spec, model, rl, rewards, reward_model)
        if folder.state is not None:
            check_resume(spec, folder.state, folder.path, mine)
        log(f"data: {len(data)} prompts, {rl.num_generations} completions each; rewards: "
            f"{', '.join(scorers)}")
        if "max_steps" not in settings:
            config = _with_epochs(config, data, rl, 1.0 if epochs is None else epochs)
        if folder.state is not None:
            saved = TrainConfig.from_dict(folder.state["config"])
            config = config.for_resume(saved, set(settings) | {"max_steps"})
        log(str(peft.trainable_parameters(model)))
        estimate = finetune.memory_estimate(model, config.batch_size * rl.num_generations,
                                            config.block_size)
        log(finetune.describe_memory(estimate))
        finetune.check_fits(estimate)
        objective = (GRPO if rl.method == "grpo" else RLOO)(tokenizer, rl)
        trainer = RLTrainer(config, rl=rl, rewards=scorers,
                            reference=_reference(spec, rl, model, device), model=model,
                            tokenizer=tokenizer, data=data, objective=objective, log=log,
                            progress=progress, weights=spec.weights, extra_state=mine)
        result = trainer.fit(folder)
        result["written"] = [] if result["interrupted"] else finetune.save_outputs(
            trainer.model, tokenizer, spec, folder.path, merge=merge, template=fmt.template)
    return result
