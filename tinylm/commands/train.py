"""``tinylm train``: train a model on text, with a progress bar, samples and checkpoints.

    tinylm train --out runs/demo                           # Python's pydoc topics, char GPT
    tinylm train --config examples/shakespeare_char.toml   # a run described in TOML
    tinylm train --data corpus/ --family llama --tokenizer bpe --vocab-size 4096 \\
                 --n-layer 6 --d-model 256 --max-steps 5000 --out runs/llama
    tinylm train --family bert --data docs.jsonl --text-field body --out runs/bert
    tinylm train --data web_tokens/:0.7 --data book_tokens/:0.3 --out runs/mix   # shards

Settings come from the defaults (``tinylm.train.TrainConfig``), then ``--config``,
then the options given here. Running the same command again on the same --out
resumes from its last checkpoint (Ctrl-C or SIGTERM saves one and stops; the exit
code is 130 or 143); --overwrite starts over. OUT is opened by ``tinylm.rundir``: a
folder that is neither empty nor a run is refused, and OUT is locked while the run
trains. Metrics go to OUT/metrics.jsonl (``tinylm plot OUT`` draws them).

Several ranks (``tinylm.dist``): ``mpiexec -n N tinylm train ...`` or ``tinylm train
--nproc N ...`` (which runs mpiexec) trains data parallel, --batch-size being the
global batch; --zero 1 shards AdamW's state; --tensor-parallel T splits each model copy
over T ranks (Megatron-LM; N = D x T); rank 0 writes OUT. A rank that fails
prints its error and stops the others.
"""

from __future__ import annotations

import sys

import click

# option name -> TrainConfig field; the model's fields go into the [model] table
_MODEL_OPTIONS = {"n_layer": "n_layer", "n_head": "n_head", "d_model": "d_model",
                  "d_ff": "d_ff", "dropout": "dropout"}


def _parse_value(text: str):
    """A --set value: TOML syntax (1e-3, true, "x", [1, 2]) or else a bare string."""
    from tinylm.config_files import toml_module

    try:
        return toml_module().loads(f"v = {text}")["v"]
    except Exception:
        return text


def _tokenizer_spec(ctx, param, value):
    """--tokenizer: a registered tokenizer name, or a file that exists. A path that does
    not exist (it has a folder or an extension in it) would otherwise be looked up as a
    tokenizer name: "unknown tokenizer 'tok.json'; available: bpe, char, ..."."""
    import os

    from tinylm import plugins

    if value is None or os.path.exists(value):
        return value
    names = sorted(plugins.registry("tokenizers"))
    if value not in names and ("." in value or "/" in value or os.sep in value):
        raise click.BadParameter(f"no tokenizer file {value!r}; give a file that exists, or "
                                 f"a tokenizer to train ({', '.join(names)})",
                                 ctx=ctx, param=param)
    return value


class _DataPath(click.Path):
    """An existing path, or a token-shard folder with a mixture weight: DIR:WEIGHT."""

    def __init__(self):
        super().__init__(exists=True)

    def convert(self, value, param, ctx):
        from tinylm.data_shards import split_weight

        path, _ = split_weight(value)
        super().convert(path, param, ctx)
        return value


@click.command(name="train")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="A TOML file of settings (top level) and a [model] table.")
@click.option("--data", multiple=True, type=_DataPath(),
              help="Text file, JSONL file or folder (repeat for several), or a folder of "
                   "token shards (tinylm data tokenize), DIR:WEIGHT for a mixture "
                   "[default: Python's pydoc topics].")
@click.option("-o", "--out", "out_dir", help="Run directory: checkpoints, metrics, samples.")
@click.option("--family", help="Model family: gpt, llama, bert, t5 (or a plugin's).")
@click.option("--objective", help="causal-lm, prefix-lm, masked-lm, span-corruption "
                                  "[default: the family's].")
@click.option("--tokenizer", callback=_tokenizer_spec,
              help="char, bpe (trained on the data) or a tokenizer file [default: char].")
@click.option("--vocab-size", type=click.IntRange(min=1),
              help="For a trained bpe tokenizer [default: 2048].")
@click.option("--n-layer", type=click.IntRange(min=1), help="Transformer blocks [default: 4].")
@click.option("--n-head", type=click.IntRange(min=1), help="Attention heads [default: 4].")
@click.option("--d-model", "--n-embd", "d_model", type=click.IntRange(min=1),
              help="Width of each token's vector [default: 128].")
@click.option("--d-ff", type=click.IntRange(min=1),
              help="Width of the MLP's hidden layer [default: the family's, from d-model].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), help="[default: 0]")
@click.option("--block-size", type=click.IntRange(min=1),
              help="Context length in tokens [default: 64].")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Sequences per micro-batch [default: 12].")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-batches per step.")
@click.option("--max-steps", type=click.IntRange(min=0), help="Optimizer steps [default: 1000].")
@click.option("--lr", type=float, help="Peak learning rate [default: 0.001].")
@click.option("--min-lr", type=float, help="Final learning rate [default: lr/10].")
@click.option("--warmup-steps", type=click.IntRange(min=0),
              help="Steps of linear warm-up to --lr [default: 100].")
@click.option("--lr-decay-steps", type=click.IntRange(min=0), help="[default: max-steps]")
@click.option("--weight-decay", type=click.FloatRange(min=0),
              help="AdamW's weight decay [default: 0.1].")
@click.option("--beta1", type=float, help="AdamW's beta1 [default: 0.9].")
@click.option("--beta2", type=float, help="AdamW's beta2 [default: 0.99].")
@click.option("--grad-clip", type=click.FloatRange(min=0),
              help="Gradient norm clip; 0 turns clipping off [default: 1.0].")
@click.option("--eval-every", type=click.IntRange(min=1),
              help="Steps between evaluations [default: 250].")
@click.option("--eval-iters", type=click.IntRange(min=1),
              help="Batches per evaluation [default: 20].")
@click.option("--log-every", type=click.IntRange(min=1),
              help="Steps between log lines [default: 10].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="[default: eval-every]")
@click.option("--sample-tokens", type=click.IntRange(min=0),
              help="Length of the sample printed at each eval (0: none) [default: 200].")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True),
              help="Share of the data held out for validation [default: 0.1].")
@click.option("--sampling", type=click.Choice(["random", "packed"]),
              help="Random windows (nanoGPT) or packed documents [default: random].")
@click.option("--text-field", help="The text field of JSONL records [default: text].")
@click.option("--cache-dir", help="Where tokenized data is cached [default: ~/.cache/tinylm].")
@click.option("--seed", type=click.IntRange(min=0), help="[default: 1337]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cpu]")
@click.option("--half/--no-half", default=None,
              help="float16 matmuls + loss scaling (needs --device cuda).")
@click.option("--threads", type=click.IntRange(min=0),
              help="BLAS threads on the CPU (0: as configured) [default: 1 for models "
                   "under 20M parameters].")
@click.option("-s", "--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any other setting, e.g. -s temperature=1.0 -s model.norm=rmsnorm.")
@click.option("--overwrite", is_flag=True,
              help="Start over even if OUT has a checkpoint (removes only a run's files).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show the progress bar (on stderr); without it, print the log lines.")
@click.option("--nproc", type=click.IntRange(min=1),
              help="Train on N data-parallel ranks: runs this command under mpiexec "
                   "(needs the dist extra). Under mpiexec already: leave it out.")
@click.option("--zero", type=click.Choice(["0", "1"]),
              help="1: shard AdamW's state over the ranks (ZeRO-1) [default: 0].")
@click.option("--reduce-order", type=click.Choice(["native", "fixed"]),
              help="fixed: sum over ranks in rank order (bit-reproducible) [default: native].")
@click.option("--tensor-parallel", type=click.IntRange(min=1),
              help="Split each model copy over T ranks (Megatron-LM tensor parallel; the "
                   "N ranks are N/T data-parallel copies) [default: 1].")
def train_command(config_path, data, out_dir, settings, overwrite, progress, nproc,
                  **options):
    """Train a language model on text files (default: Python's pydoc topics).

    Prints a progress bar with the loss, tokens/s and the time left (with
    --no-progress: a line every --log-every steps), and at each evaluation the
    validation loss and perplexity and, for decoders, a sample. Writes
    OUT/model.safetensors, config.json, tokenizer.txt (what `tinylm generate --model
    OUT` loads), the optimizer and trainer state, and OUT/metrics.jsonl. Run it again
    to resume; Ctrl-C or SIGTERM saves a checkpoint and stops. OUT must be new, empty
    or a run to resume (--overwrite removes only the files a run writes).
    """
    from tinylm import backend, dist

    backend.keep_freed_memory()  # large activations stop page-faulting every step
    if options["zero"] is not None:
        options["zero"] = int(options["zero"])
    given = _given_settings(config_path, data, out_dir, settings, options)
    if "out_dir" not in given:
        raise click.UsageError("say where the run goes: --out DIR (or out_dir in --config)")
    if nproc is not None and nproc > 1 and dist.launched_size() == 1:
        from tinylm.dist.launch import launch
        from tinylm.train import TrainConfig

        # a bad setting or model config: one line here, before any rank starts
        check_model_settings(TrainConfig.from_dict(given))
        sys.exit(launch(nproc))
    comm = dist.world()
    try:
        result, config = _train(given, overwrite, progress, comm)
    except (Exception, KeyboardInterrupt) as e:
        dist.report_and_abort(e, comm)  # several ranks: say it, stop the others
        raise
    if not comm.is_main:
        sys.exit(128 + (result["signal"] or 2) if result["interrupted"] else 0)
    if result["interrupted"]:
        sys.exit(128 + (result["signal"] or 2))  # 130 for Ctrl-C, 143 for SIGTERM
    summary = f"done: {result['step']} steps"
    if result["val_loss"] is not None:
        summary += f", val loss {result['val_loss']:.4f}"
    click.echo(f"{summary}; model in {config.out_dir} "
               f"(tinylm generate --model {config.out_dir} --prompt ...)", err=True)


def _train(given: dict, overwrite: bool, progress: bool, comm) -> tuple:
    """Train the run ``given`` describes on the ranks of ``comm``: (result, config)."""
    from tinylm.dist.grid import parallel_from_config
    from tinylm.train import TrainConfig, Trainer

    config = TrainConfig.from_dict(given)
    dp = parallel_from_config(config, comm)
    with dp.open_run(config.out_dir, overwrite=overwrite) as run:  # locked until the end
        if run.state is not None:  # resuming: the checkpoint's settings, with what may change
            config = config.for_resume(TrainConfig.from_dict(run.state["config"]), set(given))
            dp = parallel_from_config(config, comm)
        trainer = Trainer(config, log=lambda msg: click.echo(msg, err=True), progress=progress,
                          dist=dp)
        return trainer.fit(run), config


def check_model_settings(config) -> None:
    """A ConfigError now for a run whose family, objective or [model] table the ranks
    would refuse, checked as ``tinylm.train.build_model_config`` builds the model config
    (the family's small defaults, then [model], max_positions = block_size), but without
    the tokenizer (no data read, nothing trained) and without allocating the model: the
    vocabulary is [model]'s or the family's default, token ids are left unset. What only
    the tokenizer can tell (a vocab_size below its ids) is still found by the ranks."""
    import dataclasses

    from tinylm import plugins
    from tinylm.errors import ConfigError
    from tinylm.models.config import config_from_dict
    from tinylm.train import SMALL_MODEL, resolve_objective

    resolve_objective(config)  # an unknown family or objective, or one not for the family
    arch = plugins.get_architecture(config.architecture)
    fields = {f.name for f in dataclasses.fields(arch.config)}
    data = {k: v for k, v in SMALL_MODEL.items() if k in fields}
    data.update({k: v for k, v in config.model.items() if k != "architecture"})
    data.setdefault("max_positions", config.block_size)
    model_config = config_from_dict({"architecture": config.architecture, **data})
    if model_config.positional == "learned" and model_config.max_positions < config.block_size:
        raise ConfigError(f"[model] max_positions = {model_config.max_positions} is below "
                          f"block_size = {config.block_size}; learned positions stop there")


def _given_settings(config_path, data, out_dir, settings, options) -> dict:
    """The settings this command line (and --config) sets explicitly."""
    from tinylm.train import TrainConfig, read_toml

    given = {}
    if config_path:
        given.update(TrainConfig.from_toml(config_path).to_dict())
        given = {k: v for k, v in given.items() if k in read_toml(config_path)}
    model = dict(given.get("model", {}))
    for name, value in options.items():
        if value is None:
            continue
        if name in _MODEL_OPTIONS:
            model[_MODEL_OPTIONS[name]] = value
        else:
            given[name] = value
    if data:
        given["data"] = list(data)
    if out_dir:
        given["out_dir"] = out_dir
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        key, value = key.strip(), _parse_value(raw.strip())
        if key.startswith("model."):
            model[key[len("model."):]] = value
        elif key.startswith("objective_options."):
            given.setdefault("objective_options", {})[key.split(".", 1)[1]] = value
        else:
            given[key] = value
    if model:
        given["model"] = model
    return given
