"""``tinylm finetune``: fine-tune a pretrained model on instruction data (JSONL), with
LoRA (or another PEFT method) or every weight, by the same Trainer as `tinylm train`.

    tinylm finetune --model runs/demo --data train.jsonl --out runs/demo-lora
    tinylm finetune -m hf/gpt2 --data chat.jsonl --peft lora --lora-r 8 --lora-alpha 16 \\
                    --target c_attn --out runs/gpt2-chat --merge
    tinylm finetune -m smollm2.Q4_1.gguf --data chat.jsonl --out runs/qlora   # QLoRA
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

import click

from tinylm.commands.options import finite_float


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


@click.command(name="finetune")
@click.option("-m", "--model", "base", required=True,
              help="The pretrained model: a `tinylm train` run folder, a Hugging Face "
                   "folder, a .gguf file or a `tinylm quantize` folder.")
@click.option("--data", multiple=True, required=True, type=click.Path(exists=True),
              help="JSONL training records (repeat for several files).")
@click.option("--eval-data", multiple=True, type=click.Path(exists=True),
              help="JSONL validation records [default: --val-fraction of --data].")
@click.option("-o", "--out", "out_dir", required=True,
              help="Run folder: checkpoints, metrics, the adapter or model.")
@click.option("--peft", "method", default=None, metavar="METHOD",
              help="A PEFT method (lora, or a plugin's) [default: lora].")
@click.option("--full", is_flag=True, help="Train every weight instead of an adapter.")
@click.option("--lora-r", type=click.IntRange(min=1), help="LoRA rank [default: 8].")
@click.option("--lora-alpha", type=finite_float(), help="LoRA alpha [default: 8].")
@click.option("--lora-dropout", type=finite_float(0, 1, max_open=True),
              help="LoRA dropout [default: 0].")
@click.option("--target", metavar="NAMES",
              help="Modules to adapt, comma-separated, in tinylm's or Hugging Face's names "
                   "(qkv, q_proj,v_proj, c_attn ...; all-linear) [default: PEFT's for the "
                   "family].")
@click.option("--peft-option", "peft_option", multiple=True, metavar="KEY=VALUE",
              help="Any other option of the method, e.g. use_rslora=true, bias=all.")
@click.option("--merge", is_flag=True,
              help="Also write OUT/merged: the model with the adapter folded in.")
@click.option("--dequantize", is_flag=True,
              help="Load a quantized model with float32 weights [default: packed: QLoRA].")
@click.option("--chat-template", default=None, metavar="NAME|FILE",
              help="How 'messages' records are rendered: plain, chatml or a JSON file "
                   "[default: the model's, else plain].")
@click.option("--packing/--no-packing", default=False, show_default=True,
              help="Pack several examples into each row of --block-size tokens.")
@click.option("--block-size", type=click.IntRange(min=2),
              help="Longest example in tokens (longer ones are cut) [default: 1024 or the "
                   "model's context].")
@click.option("--epochs", type=finite_float(min=0, min_open=True),
              help="Passes over the training examples [default: 1].")
@click.option("--max-steps", type=click.IntRange(min=0), help="Steps (instead of --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), help="[default: 4]")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-batches per step.")
@click.option("--lr", type=finite_float(min=0, min_open=True),
              help="Peak learning rate [default: 2e-4; 2e-5 with --full].")
@click.option("--min-lr", type=finite_float(min=0))
@click.option("--warmup-steps", type=click.IntRange(min=0))
@click.option("--lr-decay-steps", type=click.IntRange(min=0), help="[default: max-steps]")
@click.option("--weight-decay", type=finite_float(min=0))
@click.option("--grad-clip", type=finite_float(min=0), help="0 turns clipping off.")
@click.option("--val-fraction", type=finite_float(0, 1, max_open=True),
              help="Share of --data held out for validation [default: 0.1].")
@click.option("--eval-every", type=click.IntRange(min=1), help="[default: 100]")
@click.option("--log-every", type=click.IntRange(min=1))
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="[default: eval-every]")
@click.option("--sample-tokens", type=click.IntRange(min=0),
              help="At each evaluation, continue the first validation prompt this far.")
@click.option("--text-field", help="The field of plain-text records [default: text].")
@click.option("--seed", type=click.IntRange(min=0))
@click.option("--device", type=click.Choice(["cpu", "cuda"]))
@click.option("--half/--no-half", default=None, help="float16 matmuls (needs --device cuda).")
@click.option("--threads", type=click.IntRange(min=0), help="BLAS threads on the CPU.")
@click.option("--overwrite", is_flag=True, help="Start over even if OUT has a checkpoint.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def finetune_command(base, data, eval_data, out_dir, method, full, lora_r, lora_alpha,
                     lora_dropout, target, peft_option, merge, dequantize, chat_template,
                     packing, epochs, overwrite, progress, **settings):
    """Fine-tune --model on instruction data (JSONL) into OUT.

    Prints the trainable and total parameters and an estimate of the peak memory
    before training, then a progress bar (or, with --no-progress, log lines). Run it
    again to resume; Ctrl-C or SIGTERM saves a checkpoint and stops.
    """
    from tinylm.finetune import FULL, FinetuneSpec, run

    if full and (method is not None or merge):
        raise click.UsageError("--full trains every weight: leave out --peft and --merge")
    options = _peft_options(lora_r, lora_alpha, lora_dropout, target, peft_option)
    if full and options:
        raise click.UsageError("--lora-*, --target and --peft-option go with --peft, not --full")
    if epochs is not None and settings.get("max_steps") is not None:
        raise click.UsageError("give --epochs or --max-steps, not both")
    spec = FinetuneSpec(base, FULL if full else (method or "lora"), options,
                        dequantize=dequantize, chat_template=chat_template, packing=packing,
                        eval_data=tuple(eval_data))
    given = {k: v for k, v in settings.items() if v is not None}
    given.update(out_dir=out_dir, data=list(data))
    result = run(spec, given, epochs=epochs, overwrite=overwrite, merge=merge,
                 log=lambda msg: click.echo(msg, err=True), progress=progress)
    if result["interrupted"]:
        sys.exit(128 + (result["signal"] or 2))  # 130 for Ctrl-C, 143 for SIGTERM
    summary = f"done: {result['step']} steps"
    if result["val_loss"] is not None:
        summary += f", val loss {result['val_loss']:.4f}"
    if spec.method == FULL:
        use = f"tinylm generate --model {out_dir}"
    else:
        use = f"tinylm generate --model {base} --adapter {out_dir}"
        if merge:
            use += f", or --model {out_dir}/merged"
    click.echo(f"{summary}; {use}", err=True)
