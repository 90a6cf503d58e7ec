"""``tinylm finetune --task classify``: fine-tune a sequence classifier on GLUE-style
TSV files (``tinylm.classify_run``), with the model / PEFT and training options of
`tinylm finetune`.

    tinylm finetune --task classify -m hf/bert-base-uncased --full \\
                    --data SST-2/train.tsv --eval-data SST-2/dev.tsv --out runs/sst2
    tinylm finetune --task classify --glue-task mrpc -m hf/gpt2 --peft lora \\
                    --data MRPC/train.tsv --out runs/mrpc
    tinylm eval glue --model runs/sst2 --task sst2 --data SST-2/dev.tsv
"""

from __future__ import annotations

import sys

import click


def finetune_classify(model, data, eval_data, glue_task, run, refused: dict) -> None:
    """The command's work for --task classify: ``model`` (ModelChoice) and ``run``
    (RunOptions) as `tinylm finetune` builds them; ``refused``: {option: given} for
    the options of instruction data, which are an error here."""
    from tinylm.classify_run import run as train_classifier

    given = [name for name, value in refused.items() if value]
    if given:
        raise click.UsageError(f"{', '.join(given)}: an option of instruction data (--task "
                               f"sft); --task classify reads TSV rows, leave it out")
    spec = model.spec(eval_data=tuple(eval_data))
    result = train_classifier(spec, dict(run.settings, data=list(data)), task=glue_task,
                              epochs=run.epochs, overwrite=run.overwrite,
                              log=lambda msg: click.echo(msg, err=True), progress=run.progress)
    if result["interrupted"]:  # 130 after Ctrl-C, 143 after SIGTERM
        sys.exit(128 + (result["signal"] or 2))
    summary = f"done: {result['step']} steps"
    if result["val_loss"] is not None:
        summary += f", val loss {result['val_loss']:.4f}"
    out = run.settings["out_dir"]
    click.echo(f"{summary}; tinylm eval glue --model {out} --task {result['task']} "
               f"--data DEV.tsv", err=True)
