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
from dataclasses import dataclass

import click

from tinylm.commands.generate import model_options
from tinylm.commands.options import option_group, writable_file

# --------------------------------------------------------------------------- option groups


@dataclass(frozen=True)
class Encoding:
    """--add-bos, --prefix-token-id, --max-length: how texts become the model's tokens."""

    add_bos: bool | None = None
    prefix_token_id: int | None = None
    max_length: int | None = None

    def check(self, model) -> None:
        """A TinyLMError for --max-length or --prefix-token-id that the model cannot take:
        a window past its positions would be scored at clamped positions (garbage
        numbers, no error), an id past its vocabulary fails deep in the embedding."""
        from tinylm.errors import TinyLMError
        from tinylm.objectives import model_kind

        config = getattr(model, "config", None)
        limit = getattr(config, "max_positions", None)
        if (self.max_length is not None and limit is not None
                and model_kind(model) != "encoder-decoder"  # T5's limit is nominal
                and self.max_length > limit):
            raise TinyLMError(f"--max-length {self.max_length} is more than the model's "
                              f"max_positions ({limit}); give at most {limit}, or leave it out")
        vocab = getattr(config, "vocab_size", None)
        if self.prefix_token_id is not None and vocab is not None and \
                self.prefix_token_id >= vocab:
            raise TinyLMError(f"--prefix-token-id {self.prefix_token_id} is not in the "
                              f"model's vocabulary (ids 0 to {vocab - 1}); give an id in it, "
                              f"or leave it out for BOS (else EOS)")

    def encoder(self, source, model, tokenizer):
        from tinylm.evaluation.encoding import TextEncoder

        self.check(model)
        return TextEncoder.for_model(source.path, model, tokenizer, add_bos=self.add_bos,
                                     prefix_token=self.prefix_token_id)


@dataclass(frozen=True)
class Report:
    """--json, -o/--output, --progress: where the results go."""

    as_json: bool = False
    output: str | None = None
    progress: bool = True

    def emit(self, report: dict, table: str, summary: dict | None = None) -> None:
        """Write the full report to --output, print the table (or --json, the summary)."""
        if self.output:
            from tinylm.atomic import write_atomic

            text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
            write_atomic(self.output, text.encode("utf-8"))
        click.echo(json.dumps(report if summary is None else summary, indent=1)
                   if self.as_json else table)


@dataclass(frozen=True)
class Documents:
    """--shots, --seed, --limit: which documents are asked, with how many examples."""

    shots: int | None = None
    seed: int = 1234
    limit: int | None = None


@dataclass(frozen=True)
class Asking:
    """--generate and its options: ask for the answer instead of scoring the choices."""

    generate: bool = False
    chat_template: str | None = None
    cot: bool = False
    answer_regex: str | None = None
    max_new_tokens: int | None = None


def _asking(generate, chat_template, cot, answer_regex, max_new_tokens) -> Asking:
    given = {"--chat-template": chat_template, "--cot": cot or None,
             "--answer-regex": answer_regex, "--max-new-tokens": max_new_tokens}
    given = [k for k, v in given.items() if v is not None]
    if given and not generate:
        raise click.UsageError(f"{', '.join(given)} go(es) with --generate")
    return Asking(generate, chat_template, cot, answer_regex, max_new_tokens)


encoding_options = option_group(
    "encoding", Encoding,
    click.option("--add-bos/--no-add-bos", default=None,
                 help="Put the BOS token before every text [default: when the tokenizer's "
                      "post-processor (tokenizer.json, GGUF add_bos_token) adds one]."),
    click.option("--prefix-token-id", type=click.IntRange(min=0), default=None,
                 help="The token a document's first token is predicted from [default: "
                      "BOS, else EOS]."),
    click.option("--max-length", type=click.IntRange(min=2), default=None,
                 help="Tokens the model sees at once [default: its max_positions]."))

report_options = option_group(
    "report", Report,
    click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
                 callback=writable_file,
                 help="Write the full report here as JSON."),
    click.option("--progress/--no-progress", default=True, show_default=True))

asking_options = option_group(
    "asking", _asking,
    click.option("--generate", is_flag=True,
                 help="Ask and generate the answer instead of scoring the choices."),
    click.option("--chat-template", default=None,
                 help="--generate: wrap each prompt in this chat template (a built-in name "
                      "or a JSON file)."),
    click.option("--cot", is_flag=True, help="--generate: zero-shot chain of thought."),
    click.option("--answer-regex", default=None,
                 help=r"--generate: the answer in the reply [default: '\b([A-Z])\b']."),
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
                 help="--generate: tokens per answer [default: the task's, else 256]."))


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
@report_options
def perplexity_command(model, data, text_key, method, stride, batch_size, encoding, report):
    """Perplexity of a model on a text: token, word and byte perplexity, bits per byte."""
    from tinylm.evaluation.perplexity import (read_documents, rolling_perplexity,
                                              strided_perplexity)

    docs = read_documents(data, text_key)
    net, tokenizer = model.load()
    enc = encoding.encoder(model, net, tokenizer)
    method = ("strided" if stride is not None else "rolling") if method == "auto" else method
    results, L = [], encoding.max_length
    with model.precision():
        if method in ("rolling", "both"):
            results.append(rolling_perplexity(net, enc, docs, L, batch_size, report.progress))
        if method in ("strided", "both"):
            results.append(strided_perplexity(net, enc, docs, L, stride, batch_size,
                                              report.progress))
    out = {"model": model.path, "data": data, "results": [r.to_dict() for r in results]}
    report.emit(out, perplexity_table(out))


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
@option_group(
    "documents", Documents,
    click.option("--shots", type=click.IntRange(min=0), default=None,
                 help="Few-shot examples per document [default: the task's num_fewshot, "
                      "else 0]."),
    click.option("--seed", type=int, default=1234, show_default=True,
                 help="The few-shot sampler's seed (lm-eval's default)."),
    click.option("--limit", type=click.IntRange(min=1), default=None,
                 help="Only the first N documents."))
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests (choices) per forward; --generate: prompts decoded together.")
@asking_options
@encoding_options
@report_options
def mc_command(model, task_file, fmt, fewshot_file, documents, batch_size, asking, encoding,
               report):
    """Multiple-choice accuracy (acc, acc_norm, acc_bytes) as lm-evaluation-harness scores it."""
    from tinylm.evaluation.harness import MCOptions, evaluate_mc, format_table
    from tinylm.evaluation.tasks import read_task

    task = read_task(task_file, fmt, fewshot_file)
    net, tokenizer = model.load()
    enc = encoding.encoder(model, net, tokenizer)
    with model.precision():
        if asking.generate or task.output_type == "generate_until":
            from tinylm.evaluation.generation import GenOptions, evaluate_generation

            d = documents
            options = GenOptions(d.shots, d.seed, d.limit, asking.cot, asking.chat_template,
                                 model.path, asking.answer_regex, asking.max_new_tokens,
                                 batch_size, report.progress)
            out = evaluate_generation(net, enc, task, options)
        else:
            d = documents
            options = MCOptions(d.shots, d.seed, d.limit, batch_size, report.progress,
                                encoding.max_length)
            out = evaluate_mc(net, enc, task, options)
    out = {"model": model.path, "task_file": task_file, **out}
    report.emit(out, format_table(out), {k: v for k, v in out.items() if k != "samples"})
