"""``tinylm eval perplexity`` and ``tinylm eval mc``: lm-evaluation-harness's measurements.

    tinylm eval perplexity -m hf/gpt2 --data wiki.test.txt                   # rolling windows
    tinylm eval perplexity -m hf/gpt2 --data wiki.test.txt --max-length 1024 --stride 512
    tinylm eval mc -m hf/gpt2 --task arc_easy_test.jsonl --shots 2 --limit 200
    tinylm eval mc -m runs/demo --task mmlu/test/anatomy_test.csv --shots 5 -o anatomy.json
    tinylm eval mc -m smollm2.gguf --task my_task.yaml
    tinylm eval mc -m runs/chat --task qa.jsonl --generate --chat-template chatml --cot

perplexity: lm-eval's rolling windows (each document alone; ``--method rolling``) or
Hugging Face's strided sliding window over the whole text (``--stride``, or ``--method
strided``); both report token perplexity, word_perplexity, byte_perplexity and
bits_per_byte with lm-eval's definitions (``tinylm.evaluation.perplexity``). --data: a
text file (one document), or .jsonl / .json with a "text" field per document.

mc: multiple choice by log-likelihood, prompts and metrics as lm-eval 0.4 builds and
scores them (acc, acc_norm, acc_bytes with standard errors;
``tinylm.evaluation.harness``). --task: a simple JSONL, an MMLU CSV, a HellaSwag or ARC
JSONL, or an lm-eval YAML/JSON task on local data (``tinylm.evaluation.tasks``).
``--generate`` asks instead and matches the extracted answer exactly
(``tinylm.evaluation.generation``).

Both print a table (``--json``: the results as JSON) and ``-o FILE`` writes the full
report (with every document's scores for mc) as JSON.
"""

from __future__ import annotations

import json

import click

from tinylm.commands.generate import model_options


def _encoder(source, model, tokenizer, add_bos, prefix_token):
    from tinylm.evaluation.encoding import TextEncoder

    return TextEncoder.for_model(source.path, model, tokenizer, add_bos=add_bos,
                                 prefix_token=prefix_token)


def _write(path, report) -> None:
    from tinylm.atomic import write_atomic

    write_atomic(path, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode())


_encoding_options = [
    click.option("--add-bos/--no-add-bos", default=None,
                 help="Put the BOS token before every text [default: when the tokenizer's "
                      "post-processor (tokenizer.json, GGUF add_bos_token) adds one]."),
    click.option("--prefix-token-id", type=click.IntRange(min=0), default=None,
                 help="The token a document's first token is predicted from [default: "
                      "BOS, else EOS]."),
    click.option("--max-length", type=click.IntRange(min=2), default=None,
                 help="Tokens the model sees at once [default: its max_positions]."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
                 help="Write the full report here as JSON."),
    click.option("--progress/--no-progress", default=True, show_default=True),
]


def encoding_options(command):
    for option in reversed(_encoding_options):
        command = option(command)
    return command


# --------------------------------------------------------------------------- perplexity


@click.command(name="perplexity")
@model_options
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text to score: a text file (one document), or .jsonl / .json documents.")
@click.option("--text-key", default="text", show_default=True,
              help="The field holding a document's text in .jsonl / .json data.")
@click.option("--method", type=click.Choice(["auto", "rolling", "strided", "both"]),
              default="auto", show_default=True,
              help="rolling: lm-eval's windows per document; strided: Hugging Face's "
                   "sliding window; auto: strided when --stride is given.")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Strided: tokens between window starts [default: --max-length].")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Windows per forward.")
@encoding_options
def perplexity_command(model, data, text_key, method, stride, batch_size, add_bos,
                       prefix_token_id, max_length, as_json, output, progress):
    """Perplexity of a model on a text: token, word and byte perplexity, bits per byte."""
    from tinylm.evaluation.perplexity import (read_documents, rolling_perplexity,
                                              strided_perplexity)

    docs = read_documents(data, text_key)
    net, tokenizer = model.load()
    enc = _encoder(model, net, tokenizer, add_bos, prefix_token_id)
    method = ("strided" if stride is not None else "rolling") if method == "auto" else method
    reports = []
    with model.precision():
        if method in ("rolling", "both"):
            reports.append(rolling_perplexity(net, enc, docs, max_length, batch_size, progress))
        if method in ("strided", "both"):
            reports.append(strided_perplexity(net, enc, docs, max_length, stride, batch_size,
                                              progress))
    report = {"model": model.path, "data": data, "results": [r.to_dict() for r in reports]}
    if output:
        _write(output, report)
    click.echo(json.dumps(report, indent=1) if as_json else perplexity_table(report))


def perplexity_table(report) -> str:
    names = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
             "perplexity")
    lines = []
    for r in report["results"]:
        how = f"window {r['max_length']}" + (f", stride {r['stride']}" if r["stride"] else "")
        lines.append(f"{r['method']} ({how}): {r['documents']} documents, {r['tokens']} "
                     f"tokens, {r['words']} words, {r['bytes']} bytes")
        lines += [f"  {n:<17} {r[n]:.6g}" for n in names if r.get(n) is not None]
    return "\n".join(lines)


# --------------------------------------------------------------------------- mc


@click.command(name="mc")
@model_options
@click.option("--task", "task_file", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="The task: simple JSONL, MMLU CSV, HellaSwag / ARC JSONL, or an lm-eval "
                   "YAML / JSON task file.")
@click.option("--format", "fmt", type=click.Choice(["auto", "simple", "mmlu", "hellaswag",
                                                    "arc", "lm-eval"]),
              default="auto", show_default=True)
@click.option("--fewshot", "fewshot_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Few-shot examples from this file (same format) [default: "
                                 "the task's rule, else the other documents].")
@click.option("--shots", type=click.IntRange(min=0), default=None,
              help="Few-shot examples per document [default: the task's num_fewshot, else 0].")
@click.option("--seed", type=int, default=1234, show_default=True,
              help="The few-shot sampler's seed (lm-eval's default).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N documents.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests (choices) per forward.")
@click.option("--generate", "generate_mode", is_flag=True,
              help="Ask and generate the answer instead of scoring the choices.")
@click.option("--chat-template", default=None,
              help="--generate: wrap each prompt in this chat template (a built-in name "
                   "or a JSON file).")
@click.option("--cot", is_flag=True, help="--generate: zero-shot chain of thought.")
@click.option("--answer-regex", default=None,
              help=r"--generate: the answer in the reply [default: '\b([A-Z])\b'].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="--generate: tokens per answer [default: the task's, else 256].")
@encoding_options
def mc_command(model, task_file, fmt, fewshot_file, shots, seed, limit, batch_size,
               generate_mode, chat_template, cot, answer_regex, max_new_tokens, add_bos,
               prefix_token_id, max_length, as_json, output, progress):
    """Multiple-choice accuracy (acc, acc_norm, acc_bytes) as lm-evaluation-harness scores it."""
    from tinylm.evaluation.harness import MCOptions, evaluate_mc, format_table
    from tinylm.evaluation.tasks import read_task

    gen_only = {"--chat-template": chat_template, "--cot": cot or None,
                "--answer-regex": answer_regex, "--max-new-tokens": max_new_tokens}
    given = [k for k, v in gen_only.items() if v is not None]
    if given and not generate_mode:
        raise click.UsageError(f"{', '.join(given)} go(es) with --generate")
    task = read_task(task_file, fmt, fewshot_file)
    net, tokenizer = model.load()
    enc = _encoder(model, net, tokenizer, add_bos, prefix_token_id)
    with model.precision():
        if generate_mode or task.output_type == "generate_until":
            from tinylm.evaluation.generation import GenOptions, evaluate_generation

            options = GenOptions(shots, seed, limit, cot, chat_template, model.path,
                                 answer_regex, max_new_tokens, batch_size, progress)
            report = evaluate_generation(net, enc, task, options)
        else:
            options = MCOptions(shots, seed, limit, batch_size, progress, max_length)
            report = evaluate_mc(net, enc, task, options)
    report = {"model": model.path, "task_file": task_file, **report}
    if output:
        _write(output, report)
    summary = {k: v for k, v in report.items() if k != "samples"}
    click.echo(json.dumps(summary, indent=1) if as_json else format_table(report))
