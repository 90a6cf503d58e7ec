"""``tinylm align reward``: train a reward model (a scalar head on a decoder) on
preference pairs with the Bradley-Terry loss, as TRL's RewardTrainer does.

    tinylm align reward --model hf/gpt2 --data prefs.jsonl --out runs/rm
    tinylm align reward -m runs/demo --data prefs.jsonl --full --center-rewards 0.01 \\
                        --out runs/rm --export-hf

Records are ``{"prompt", "chosen", "rejected"}`` (texts), the same with lists of chat
messages, or without "prompt" (it is the shared start); an optional "margin" on every
record: see ``tinylm.align.preferences``. OUT is a run folder (metrics.jsonl with
accuracy, margin, min/mean/max_reward; checkpoints that resume bit for bit: run the
same command again); ``tinylm.align.reward_run.load_reward_model(OUT)`` reads the
model back. --export-hf also writes OUT/hf,
a Hugging Face *ForSequenceClassification folder (gpt2, llama).
"""

from __future__ import annotations

import sys

import click

from tinylm.commands.finetune import model_options, run_options
from tinylm.commands.options import finite_float


def preference_data_options(command):
    """--data and --eval-data: the preference pair files of a reward model or DPO run."""
    command = click.option("--eval-data", multiple=True,
                           type=click.Path(exists=True, dir_okay=False),
                           help="JSONL validation pairs [default: --val-fraction of "
                                "--data].")(command)
    return click.option("--data", multiple=True, required=True,
                        type=click.Path(exists=True, dir_okay=False),
                        help="JSONL preference pairs (repeat for several files).")(command)


@click.command(name="reward")
@model_options
@preference_data_options
@click.option("--center-rewards", "center", type=finite_float(min=0), default=None,
              help="TRL's center_rewards_coefficient: add c * mean((r_chosen + "
                   "r_rejected)^2) to the loss (0.01 is usual) [default: off].")
@click.option("--export-hf", "export", is_flag=True,
              help="Also write OUT/hf: a Hugging Face *ForSequenceClassification folder.")
@run_options({"lr": "1e-4"})
def reward_command(model, data, eval_data, center, export, run):
    """Train a reward model on preference pairs (JSONL) into OUT.

    Prints the trainable and total parameters and an estimate of the peak memory
    before training, then a progress bar with the loss, accuracy and margin (or, with
    --no-progress, log lines). Run it again to resume; Ctrl-C or SIGTERM saves a
    checkpoint and stops.
    """
    from tinylm.align.reward_run import run as train_reward

    if model.merge:
        raise click.UsageError("--merge writes a language model; a reward model is "
                               "exported with --export-hf")
    spec = model.spec(eval_data=tuple(eval_data))
    given = dict(run.settings, data=list(data))
    result = train_reward(spec, given, epochs=run.epochs, overwrite=run.overwrite,
                          center=center, export=export,
                          log=lambda msg: click.echo(msg, err=True), progress=run.progress)
    if result["interrupted"]:
        sys.exit(128 + (result["signal"] or 2))  # 130 for Ctrl-C, 143 for SIGTERM
    summary = f"done: {result['step']} steps"
    if result["val_loss"] is not None:
        summary += f", val loss {result['val_loss']:.4f}"
    click.echo(f"{summary}; reward model in {run.settings['out_dir']}", err=True)
