"""``tinylm eval glue``: score a sequence classifier on a GLUE-style TSV file.

    tinylm eval glue --model runs/sst2 --task sst2 --data glue_data/SST-2/dev.tsv
    tinylm eval glue -m runs/mrpc --task mrpc --data MRPC/dev.tsv --output mrpc.json
    tinylm eval glue -m runs/sst2 --task sst2 --data SST-2/test.tsv --predictions SST-2.tsv

--model: the --out folder of `tinylm finetune --task classify`, or a Hugging Face
*ForSequenceClassification folder (BERT, GPT-2, Llama). The file is read as the task
lays it out (``tinylm.evaluation.glue``); a test split (no labels) gets predictions
only, written in GLUE's submission format by --predictions. The metrics print as a
table on stdout (--json: as JSON), and --output writes the JSON to a file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import click

from tinylm.commands.options import option_group, writable_file

TASK_NAMES = "cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli or tsv"


def results_json(result: dict, model: str) -> dict:
    """The JSON-ready results (NaN metrics as null)."""
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v)
               for k, v in result["metrics"].items()}
    return {"task": result["task"], "model": model, "data": result["data"],
            "examples": result["examples"], "metrics": metrics}


def results_table(result: dict) -> str:
    """The metrics as a two-column table under a line naming task, file and size."""
    lines = [f"{result['task']} on {result['data']}: {result['examples']} examples"]
    if not result["metrics"]:
        return lines[0] + " (no labels: predictions only)"
    width = max(len(k) for k in result["metrics"])
    lines.append(f"{'metric':<{width}}  value")
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in result["metrics"].items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """Where the results go: ``predictions`` (a TSV path), ``output`` (a JSON path),
    ``as_json`` (stdout as JSON instead of a table)."""

    predictions: str | None = None
    output: str | None = None
    as_json: bool = False


@click.command(name="glue")
@click.option("-m", "--model", "model_path", required=True,
              help="A classifier: the --out folder of `tinylm finetune --task classify`, or "
                   "a Hugging Face *ForSequenceClassification folder.")
@click.option("--task", required=True, metavar="NAME", help=f"The task: {TASK_NAMES}.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The task's TSV file (dev.tsv; test.tsv gives predictions only).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-length", type=click.IntRange(min=4),
              help="Tokens per example (longer ones are cut) [default: the classifier's "
                   "--block-size].")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows.")
@option_group(
    "report", Report,
    click.option("--predictions", type=click.Path(dir_okay=False), callback=writable_file,
                 help="Write each row's prediction here (GLUE's index<TAB>prediction TSV)."),
    click.option("-o", "--output", type=click.Path(dir_okay=False), callback=writable_file,
                 help="Write the results here as JSON."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def glue_command(model_path, task, data, batch_size, max_length, limit, report, device,
                 progress):
    """Score a classifier on a GLUE-style TSV file (accuracy, F1, Matthews
    correlation, Pearson / Spearman, as the task is scored)."""
    from tinylm.atomic import write_atomic
    from tinylm.classify_run import load_classifier
    from tinylm.evaluation import glue

    task = glue.resolve_task(task, data)  # bad input fails before the model loads
    if glue.read_tsv(data, task).labels is None and report.predictions is None:
        raise click.UsageError(f"{data} has no labels (a test split): nothing to score; "
                               f"pass --predictions FILE to write the predictions")
    model, tokenizer, info = load_classifier(model_path, device)
    result = glue.evaluate(model, tokenizer, info, task, data, batch_size=batch_size,
                           max_length=max_length, limit=limit, progress=progress)
    if report.predictions is not None:
        glue.write_predictions(report.predictions, result)
        click.echo(f"predictions: {report.predictions}", err=True)
    summary = results_json(result, model_path)
    if report.output is not None:
        write_atomic(report.output, json.dumps(summary, indent=1) + "\n")
    click.echo(json.dumps(summary, indent=1) if report.as_json else results_table(result))
