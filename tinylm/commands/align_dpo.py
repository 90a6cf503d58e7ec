"""``tinylm align dpo``: Direct Preference Optimisation of a pretrained model on
preference pairs (JSONL), with a PEFT adapter (LoRA by default) or every weight, by
the same Trainer as `tinylm train` and `tinylm finetune`.

    tinylm align dpo --model runs/sft --data prefs.jsonl --out runs/dpo
    tinylm align dpo -m hf/gpt2 --data prefs.jsonl --beta 0.1 --loss ipo --out runs/ipo
    tinylm align dpo -m hf/gpt2 --data prefs.jsonl --full --precompute-ref --out runs/full
    tinylm generate --model runs/sft --adapter runs/dpo --prompt "..."

Records are TRL's preference forms: ``{"prompt", "chosen", "rejected"}`` (texts; the
end-of-sequence token appended to each reply), the same without "prompt" (their
common start is the prompt), or lists of chat messages (rendered with the chat
template): see ``tinylm.align.preferences``. The loss, the reference and the metrics
(TRL's names: rewards/chosen, rewards/margins, logps/chosen ...) are
``tinylm.align.dpo``'s; the run and its outputs ``tinylm.align.dpo_run``'s.
"""

from __future__ import annotations

import click

from tinylm.align.dpo import LOSS_TYPES
from tinylm.commands.align_reward import preference_data_options
from tinylm.commands.finetune import finish, model_options, run_options
from tinylm.commands.options import finite_float, option_group


def _dpo_options(**values):
    from tinylm.align.dpo_run import DPOOptions

    return DPOOptions(**values)


dpo_options = option_group(
    "dpo", _dpo_options,
    click.option("--beta", type=finite_float(min=0, min_open=True), default=0.1,
                 show_default=True,
                 help="How far the model may move from the reference (IPO's tau with --loss "
                      "ipo)."),
    click.option("--loss", "loss_type", type=click.Choice(LOSS_TYPES), default="sigmoid",
                 show_default=True,
                 help="sigmoid: DPO (cDPO with --label-smoothing); ipo; hinge: SLiC; robust: "
                      "rDPO."),
    click.option("--label-smoothing", type=finite_float(0, 0.5, max_open=True), default=0.0,
                 show_default=True,
                 help="The chance a preference is flipped (sigmoid and robust)."),
    click.option("--ref-model", default=None, metavar="MODEL",
                 help="The reference, if not the base (same vocabulary) [default: the base; "
                      "with an adapter, the base with the adapter switched off]."),
    click.option("--precompute-ref", is_flag=True,
                 help="Compute the reference's log-probs once before training (kept in "
                      "OUT/ref_logps.safetensors); no reference model in memory while "
                      "training."),
    click.option("--ref-logps", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="The reference's log-probs from an earlier run's "
                      "ref_logps.safetensors (the same data)."),
    click.option("--truncate", is_flag=True,
                 help="Cut pairs longer than --block-size (as TRL's DPO) instead of refusing "
                      "them."),
)


@click.command(name="dpo")
@model_options
@preference_data_options
@dpo_options
@run_options({"lr": "1e-5; 1e-6 (TRL's) with --full", "batch_size": "8"})
def dpo_command(model, data, eval_data, dpo, run):
    """Align --model to preference pairs (JSONL) by DPO into OUT.

    Prints the trainable parameters and an estimate of the peak memory, then a
    progress bar with the reward accuracy and margin (or, with --no-progress, log
    lines); metrics.jsonl holds TRL's metrics. Dropout is off (as in TRL). Run it again
    to resume; Ctrl-C or SIGTERM saves a checkpoint and stops.
    """
    from tinylm.align.dpo_run import run as run_dpo

    result = run_dpo(model.spec(eval_data=tuple(eval_data)), dpo,
                     dict(run.settings, data=list(data)), epochs=run.epochs,
                     overwrite=run.overwrite, merge=model.merge,
                     log=lambda msg: click.echo(msg, err=True), progress=run.progress)
    finish(result, model, run.settings["out_dir"])
