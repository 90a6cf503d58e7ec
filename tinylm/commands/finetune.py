"""``tinylm finetune``: fine-tune a pretrained model on instruction data (JSONL), with
LoRA (or another PEFT method) or every weight, by the same Trainer as `tinylm train`.

    tinylm finetune --model runs/demo --data train.jsonl --out runs/demo-lora
    tinylm finetune -m hf/gpt2 --data chat.jsonl --peft lora --lora-r 8 --lora-alpha 16 \\
                    --target c_attn --out runs/gpt2-chat --merge
    tinylm finetune -m smollm2.Q4_1.gguf --data chat.jsonl --out runs/qlora   # QLoRA
    tinylm finetune -m hf/gpt2 --qlora nf4 --data chat.jsonl --out runs/qlora-nf4
    tinylm finetune -m runs/demo --data train.jsonl --full --out runs/demo-full
    tinylm generate --model runs/demo --adapter runs/demo-lora --prompt "..."

Records are ``{"prompt", "completion"}`` (loss on the completion), ``{"messages"}``
(chat turns rendered with the model's chat template, loss on the assistant turns) or
``{"text"}`` (loss on everything): see ``tinylm.instruct``. The rest is
``tinylm.finetune``: OUT is a run folder (metrics.jsonl, checkpoints that resume bit
for bit: run the same command again; Ctrl-C or SIGTERM saves one and stops) and, at
the end, the adapter (PEFT's adapter_config.json + adapter_model.safetensors,
pointing at the base), OUT/merged with --merge, or with --full a whole model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import click

from tinylm.commands.options import finite_float, option_group


def _parse_value(text: str):
    from tinylm.commands.train import _parse_value as parse

    return parse(text)


def _peft_options(lora_r, lora_alpha, lora_dropout, target, options) -> dict:
    """The adapter's config fields from --lora-* / --target / --peft-option."""
    out = {}
    for name, value in (("r", lora_r), ("alpha", lora_alpha), ("dropout", lora_dropout)):
        if value is not None:
            out[name] = value
    if target is not None:
        names = [t.strip() for t in target.split(",") if t.strip()]
        if not names:
            raise click.BadParameter("give module names, e.g. q_proj,v_proj",
                                     param_hint="--target")
        out["target_modules"] = "all-linear" if names == ["all-linear"] else names
    for item in options:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}",
                                     param_hint="--peft-option")
        out[key.strip()] = _parse_value(raw.strip())
    return out


# --------------------------------------------------------------------------- shared options
# `tinylm finetune` and the `tinylm align` subcommands take the same model / PEFT options
# (``model_options``: one ModelChoice) and training options (``run_options(...)``: one
# RunOptions), so a new one touches this file only.


@dataclass(frozen=True)
class ModelChoice:
    """What the model options say: the base, the PEFT method ("full" with --full) and
    its options, and how to load and write it."""

    base: str
    method: str
    peft_options: dict = field(default_factory=dict)
    merge: bool = False
    dequantize: bool = False
    chat_template: str | None = None

    def spec(self, memory: "MemoryChoice | None" = None, **data_options):
        """The ``tinylm.finetune.FinetuneSpec`` (``memory``: the memory options;
        ``data_options``: packing, eval_data)."""
        from tinylm.finetune import FinetuneSpec

        more = memory.spec_fields() if memory is not None else {}
        return FinetuneSpec(self.base, self.method, self.peft_options,
                            dequantize=self.dequantize, chat_template=self.chat_template,
                            **more, **data_options)


def _model_choice(base, method, full, peft_option, merge, dequantize, chat_template,
                  **lora) -> ModelChoice:
    """``lora``: lora_r, lora_alpha, lora_dropout and target, as given."""
    from tinylm.finetune import FULL

    if full and (method is not None or merge):
        raise click.UsageError("--full trains every weight: leave out --peft and --merge")
    options = _peft_options(lora["lora_r"], lora["lora_alpha"], lora["lora_dropout"],
                            lora["target"], peft_option)
    if full and options:
        raise click.UsageError("--lora-*, --target and --peft-option go with --peft, not --full")
    return ModelChoice(base, FULL if full else (method or "lora"), options, merge=merge,
                       dequantize=dequantize, chat_template=chat_template)


model_options = option_group(
    "model", _model_choice,
    click.option("-m", "--model", "base", required=True,
                 help="The pretrained model: a `tinylm train` run folder, a Hugging Face "
                      "folder, a .gguf file or a `tinylm quantize` folder."),
    click.option("--peft", "method", default=None, metavar="METHOD",
                 help="A PEFT method (lora, or a plugin's) [default: lora]."),
    click.option("--full", is_flag=True, help="Train every weight instead of an adapter."),
    click.option("--lora-r", type=click.IntRange(min=1), help="LoRA rank [default: 8]."),
    click.option("--lora-alpha", type=finite_float(), help="LoRA alpha [default: 8]."),
    click.option("--lora-dropout", type=finite_float(0, 1, max_open=True),
                 help="LoRA dropout [default: 0]."),
    click.option("--target", metavar="NAMES",
                 help="Modules to adapt, comma-separated, in tinylm's or Hugging Face's names "
                      "(qkv, q_proj,v_proj, c_attn ...; all-linear) [default: PEFT's for the "
                      "family]."),
    click.option("--peft-option", "peft_option", multiple=True, metavar="KEY=VALUE",
                 help="Any other option of the method, e.g. use_rslora=true, bias=all."),
    click.option("--merge", is_flag=True,
                 help="Also write OUT/merged: the model with the adapter folded in."),
    click.option("--dequantize", is_flag=True,
                 help="Load a quantized model with float32 weights [default: packed: QLoRA]."),
    click.option("--chat-template", default=None, metavar="NAME|FILE",
                 help="How 'messages' records are rendered: plain, chatml or a JSON file "
                      "[default: the model's, else plain]."),
)


@dataclass(frozen=True)
class MemoryChoice:
    """What the memory options of `tinylm finetune` say: ``gradient_checkpointing``
    (None: on for a quantized base), ``qlora`` (a scheme to quantize a float base to;
    None: as loaded) and ``qlora_embeddings`` (None: the scheme's default)."""

    gradient_checkpointing: bool | None = None
    qlora: str | None = None
    qlora_embeddings: str | None = None

    def spec_fields(self) -> dict:
        return {"gradient_checkpointing": self.gradient_checkpointing, "qlora": self.qlora,
                "qlora_embeddings": self.qlora_embeddings}

    def given(self) -> dict:
        """{option: whether given}, for the commands that take none of them."""
        return {"--gradient-checkpointing/--no-gradient-checkpointing":
                self.gradient_checkpointing is not None, "--qlora": self.qlora is not None,
                "--qlora-embeddings": self.qlora_embeddings is not None}


def _memory_choice(gradient_checkpointing, qlora, qlora_embeddings) -> MemoryChoice:
    return MemoryChoice(gradient_checkpointing, qlora, qlora_embeddings)


memory_options = option_group(
    "memory", _memory_choice,
    click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                 help="Recompute each block in backward instead of keeping its activations "
                      "(less memory, about one more forward per step; same gradients) "
                      "[default: on for a quantized base (QLoRA), else off]."),
    click.option("--qlora", metavar="SCHEME",
                 help="Quantize a float base to SCHEME (nf4, nf4-dq, int8, q4_0 ...) after "
                      "loading it and train LoRA on the packed weights (QLoRA). For the "
                      "lowest peak memory quantize once with `tinylm quantize` instead."),
    click.option("--qlora-embeddings", metavar="bf16|float32|SCHEME",
                 help="With --qlora: how the token embedding (and a head tied to it) is "
                      "stored [default: bf16 for nf4, nf4-dq and int8, as QLoRA with "
                      "torch_dtype=bfloat16 (float32 with --device cuda); else SCHEME "
                      "itself]."),
)


@dataclass(frozen=True)
class RunOptions:
    """What the training options say: ``settings`` (the TrainConfig fields given, out_dir
    among them), ``epochs`` (None: not given), ``overwrite`` and ``progress``."""

    settings: dict
    epochs: float | None = None
    overwrite: bool = False
    progress: bool = True


def _run_options(out_dir, epochs, overwrite, progress, **settings) -> RunOptions:
    if epochs is not None and settings.get("max_steps") is not None:
        raise click.UsageError("give --epochs or --max-steps, not both")
    given = {k: v for k, v in settings.items() if v is not None}
    return RunOptions({**given, "out_dir": out_dir}, epochs, overwrite, progress)


# the defaults --help states (tinylm.finetune.DEFAULTS); a command with others passes its own
FINETUNE_DEFAULTS = {"lr": "2e-4; 2e-5 with --full", "batch_size": "4", "eval_every": "100",
                     "val_fraction": "0.1"}


def run_options(defaults: dict = FINETUNE_DEFAULTS):
    """The training options (--out, --epochs/--max-steps, --batch-size, --lr ... --progress)
    as one RunOptions argument ``run``; ``defaults``: the defaults --help states."""
    d = {**FINETUNE_DEFAULTS, **defaults}
    return option_group(
        "run", _run_options,
        click.option("-o", "--out", "out_dir", required=True,
                     help="Run folder: checkpoints, metrics, the adapter or model."),
        click.option("--block-size", type=click.IntRange(min=2),
                     help="Longest example in tokens (longer ones are cut) [default: 1024 or "
                          "the model's context]."),
        click.option("--epochs", type=finite_float(min=0, min_open=True),
                     help="Passes over the training examples [default: 1]."),
        click.option("--max-steps", type=click.IntRange(min=0),
                     help="Steps (instead of --epochs)."),
        click.option("--batch-size", type=click.IntRange(min=1),
                     help=f"[default: {d['batch_size']}]"),
        click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-batches per step."),
        click.option("--lr", type=finite_float(min=0, min_open=True),
                     help=f"Peak learning rate [default: {d['lr']}]."),
        click.option("--min-lr", type=finite_float(min=0)),
        click.option("--warmup-steps", type=click.IntRange(min=0)),
        click.option("--lr-decay-steps", type=click.IntRange(min=0),
                     help="[default: max-steps]"),
        click.option("--weight-decay", type=finite_float(min=0)),
        click.option("--grad-clip", type=finite_float(min=0), help="0 turns clipping off."),
        click.option("--val-fraction", type=finite_float(0, 1, max_open=True),
                     help=f"Share of --data held out for validation [default: "
                          f"{d['val_fraction']}]."),
        click.option("--eval-every", type=click.IntRange(min=1),
                     help=f"[default: {d['eval_every']}]"),
        click.option("--log-every", type=click.IntRange(min=1)),
        click.option("--checkpoint-every", type=click.IntRange(min=1),
                     help="[default: eval-every]"),
        click.option("--seed", type=click.IntRange(min=0)),
        click.option("--device", type=click.Choice(["cpu", "cuda"])),
        click.option("--half/--no-half", default=None,
                     help="float16 matmuls (needs --device cuda)."),
        click.option("--threads", type=click.IntRange(min=0),
                     help="BLAS threads on the CPU (0: as configured) [default: 1 for models "
                          "under 20M parameters]."),
        click.option("--overwrite", is_flag=True,
                     help="Start over even if OUT has a checkpoint."),
        click.option("--progress/--no-progress", default=True, show_default=True),
    )


def finish(result: dict, model: ModelChoice, out_dir: str) -> None:
    """After a run: exit 130 (Ctrl-C) or 143 (SIGTERM) if a signal stopped it, else say
    what it did and how to use what it wrote."""
    from tinylm.finetune import FULL

    if result["interrupted"]:
        sys.exit(128 + (result["signal"] or 2))
    summary = f"done: {result['step']} steps"
    if result["val_loss"] is not None:
        summary += f", val loss {result['val_loss']:.4f}"
    if model.method == FULL:
        use = f"tinylm generate --model {out_dir}"
    else:
        use = f"tinylm generate --model {model.base} --adapter {out_dir}"
        if model.merge:
            use += f", or --model {out_dir}/merged"
    click.echo(f"{summary}; {use}", err=True)


# --------------------------------------------------------------------------- the command


@click.command(name="finetune")
@model_options
@click.option("--task", type=click.Choice(["sft", "classify"]), default="sft", show_default=True,
              help="sft: instruction data (JSONL); classify: sequence classification of "
                   "GLUE-style TSV rows (BERT by its [CLS], decoders by their last token).")
@click.option("--glue-task", metavar="NAME",
              help="With --task classify: the layout and labels of --data (cola, sst2, mrpc, "
                   "qqp, stsb, mnli, qnli, rte, wnli or tsv) [default: from its header].")
@click.option("--data", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="JSONL training records, or TSV rows with --task classify (repeat for "
                   "several files).")
@click.option("--eval-data", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Validation records or rows [default: --val-fraction of --data].")
@click.option("--packing/--no-packing", default=False, show_default=True,
              help="Pack several examples into each row of --block-size tokens.")
@click.option("--sample-tokens", type=click.IntRange(min=0),
              help="At each evaluation, continue the first validation prompt this far.")
@click.option("--text-field", help="The field of plain-text records [default: text].")
@memory_options
@run_options()
def finetune_command(model, task, glue_task, data, eval_data, packing, sample_tokens,
                     text_field, memory, run):
    """Fine-tune --model on instruction data (JSONL) into OUT, or with --task classify
    a sequence classifier on GLUE-style TSV rows (then: tinylm eval glue).

    Prints the trainable and total parameters and an estimate of the peak memory
    before training, then a progress bar (or, with --no-progress, log lines). Run it
    again to resume; Ctrl-C or SIGTERM saves a checkpoint and stops.
    """
    from tinylm.finetune import run as finetune

    if task == "classify":
        from tinylm.commands.finetune_classify import finetune_classify

        return finetune_classify(model, data, eval_data, glue_task, run, {
            "--packing": packing, "--sample-tokens": sample_tokens is not None,
            "--text-field": text_field is not None, "--merge": model.merge,
            "--chat-template": model.chat_template is not None, **memory.given()})
    if glue_task is not None:
        raise click.UsageError("--glue-task goes with --task classify")
    spec = model.spec(memory, packing=packing, eval_data=tuple(eval_data))
    given = dict(run.settings, data=list(data))
    given.update({k: v for k, v in (("sample_tokens", sample_tokens),
                                    ("text_field", text_field)) if v is not None})
    result = finetune(spec, given, epochs=run.epochs, overwrite=run.overwrite,
                      merge=model.merge, log=lambda msg: click.echo(msg, err=True),
                      progress=run.progress)
    finish(result, model, run.settings["out_dir"])
