"""``tinylm align grpo`` and ``tinylm align rloo``: reinforcement learning on prompts, with
reward functions (registered plugins) or a trained reward model.

    tinylm align grpo -m hf/smollm2 --data math.jsonl --reward exact-match \\
                      --num-generations 8 --max-completion-length 128 --out runs/grpo
    tinylm align rloo -m runs/sft --data prompts.jsonl --reward-model runs/rm --out runs/rloo
    tinylm plot runs/grpo                # loss, reward and KL curves

Prompt records are ``{"prompt": text or messages, ...}``; the other fields (an
"answer") go to the reward functions (``tinylm.align.prompt_data``). The method is
TRL 1.16's GRPOTrainer / RLOOTrainer (``tinylm.align.rl``: DeepSeekMath's GRPO,
arXiv:2402.03300; RLOO, arXiv:2402.14740); its options keep TRL's names and
defaults (but --max-completion-length at most 256, TRL's 512; --batch-size counts prompts,
each sampled --num-generations times). The model and training options are `tinylm finetune`'s: OUT is a run
folder that resumes bit for bit (run the same command again), and at the end holds
the adapter (or with --full the model).
"""

from __future__ import annotations

import sys

import click

from tinylm.commands.finetune import model_options, run_options
from tinylm.commands.options import finite_float

RL_DEFAULTS = {"lr": "1e-6", "batch_size": "4 prompts", "eval_every": "100", "val_fraction": "0"}


def _rl_options(method: str):
    """The options of ``method``'s command, beside the model and training ones."""
    from tinylm.align.rl import LOSS_TYPES, METHOD_DEFAULTS, SCALE_REWARDS

    d = METHOD_DEFAULTS[method]
    options = [
        click.option("--data", multiple=True, required=True,
                     type=click.Path(exists=True, dir_okay=False),
                     help="JSONL prompt records (repeat for several files)."),
        click.option("--reward", "rewards", multiple=True, metavar="NAME",
                     help="A registered reward function (exact-match, think-format, regex, "
                          "or a plugin's); repeat to add several up."),
        click.option("--reward-model", type=click.Path(exists=True, file_okay=False),
                     help="A `tinylm align reward` run folder whose model scores each "
                          "prompt + completion."),
        click.option("--num-generations", type=click.IntRange(min=2),
                     help=f"Completions per prompt (a group) [default: {d['num_generations']}]."),
        click.option("--beta", type=finite_float(min=0),
                     help=f"KL coefficient; 0 runs no reference [default: {d['beta']}]."),
        click.option("--epsilon", type=finite_float(min=0), default=0.2, show_default=True,
                     help="Clip range of the policy ratio."),
        click.option("--epsilon-high", type=finite_float(min=0),
                     help="Upper clip range [default: --epsilon]."),
        click.option("--num-iterations", type=click.IntRange(min=1), default=1,
                     show_default=True, help="Optimisation steps per batch of rollouts."),
        click.option("--max-completion-length", type=click.IntRange(min=1), default=None,
                     help="Longest completion in tokens.  [default: 256, or what the "
                          "model's context leaves after the longest prompt]"),
        click.option("--temperature", type=finite_float(min=0, min_open=True), default=1.0,
                     show_default=True, help="Sampling temperature."),
        click.option("--mask-truncated-completions", is_flag=True,
                     help="No loss on completions cut at --max-completion-length."),
    ]
    if method == "grpo":
        options += [
            click.option("--loss-type", type=click.Choice(LOSS_TYPES), default="dapo",
                         show_default=True, help="How the token losses are averaged (TRL's)."),
            click.option("--scale-rewards", type=click.Choice(SCALE_REWARDS), default="group",
                         show_default=True, help="What the advantages are divided by the std "
                                                 "of (none: Dr. GRPO)."),
            click.option("--bias-correction-kl/--no-bias-correction-kl",
                         "use_bias_correction_kl", default=True, show_default=True,
                         help="Multiply the KL term by the policy ratio (TRL's default)."),
        ]
    else:
        options.append(click.option("--normalize-advantages", is_flag=True,
                                    help="Standardise the advantages over the batch."))

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _run(method: str, model, run, data, rewards, reward_model, **rl_options):
    from tinylm.align.rl import RLConfig
    from tinylm.align.rl_run import run as rl_run

    if not rewards and reward_model is None:
        raise click.UsageError("give a reward: --reward NAME (e.g. exact-match) or "
                               "--reward-model DIR")
    rl = RLConfig(method, **rl_options)
    spec = model.spec()
    result = rl_run(spec, dict(run.settings, data=list(data)), rl, rewards=list(rewards),
                    reward_model=reward_model, epochs=run.epochs, overwrite=run.overwrite,
                    merge=model.merge, log=lambda msg: click.echo(msg, err=True),
                    progress=run.progress)
    if result["interrupted"]:
        sys.exit(128 + (result["signal"] or 2))  # 130 for Ctrl-C, 143 for SIGTERM
    out_dir = run.settings["out_dir"]
    use = (f"tinylm generate --model {out_dir}" if spec.method == "full" else
           f"tinylm generate --model {model.base} --adapter {out_dir}")
    click.echo(f"done: {result['step']} steps; {use}; tinylm plot {out_dir}", err=True)


@click.command(name="grpo")
@model_options
@_rl_options("grpo")
@run_options(RL_DEFAULTS)
def grpo_command(model, run, **options):
    """GRPO (TRL's GRPOTrainer): sample --num-generations completions of each prompt,
    reward them, and push up those better than their group's mean.

    Prints the trainable parameters and a memory estimate, then a progress bar with
    the mean reward and KL. Run it again to resume; Ctrl-C or SIGTERM saves a
    checkpoint and stops.
    """
    _run("grpo", model, run, **options)


@click.command(name="rloo")
@model_options
@_rl_options("rloo")
@run_options(RL_DEFAULTS)
def rloo_command(model, run, **options):
    """RLOO (TRL's RLOOTrainer): sample --num-generations completions of each prompt and
    push up those better than the mean of the others (a leave-one-out baseline), the KL
    to the reference in the reward.

    Run it again to resume; Ctrl-C or SIGTERM saves a checkpoint and stops.
    """
    _run("rloo", model, run, **options)
