"""``tinylm info CONFIG_OR_DIR``: parameter count and training-memory estimate.

    tinylm info llama                      # a family's default config (Llama-2 7B)
    tinylm info my-model.toml -b 8 -t 512  # a tinylm model config file
    tinylm info examples/shakespeare_char.toml   # a training config: the model train builds
    tinylm info runs/demo                  # a run folder, or a Hugging Face folder
    tinylm info runs/demo-q8               # a `tinylm quantize` folder (its float model)
    tinylm info model.gguf                 # a GGUF file: types, bits per weight, size
"""

from __future__ import annotations

import json
import os

import click

from tinylm import plugins
from tinylm.loading import _gguf_magic
from tinylm.models.config import ConfigError, config_from_dict, read_config_file
from tinylm.models.hf import read_hf_config
from tinylm.models.info import activation_memory, check_weights, describe, parameter_counts


def resolve_config(target: str, log=None):
    """(model config, training config or None) of a tinylm config file, a training
    config (the model ``tinylm train --config`` builds from it, tokenizer and all), a
    run or Hugging Face folder (or its config.json), or the name of a registered
    architecture (its default config)."""
    if os.path.isdir(target):
        config_json = os.path.join(target, "config.json")
        if not os.path.exists(config_json):
            raise ConfigError(f"{target} has no config.json")
        target = config_json
    if os.path.isfile(target):
        if is_training_config(target):
            from tinylm.train import TrainConfig, model_config_for

            train = TrainConfig.from_toml(target)
            return model_config_for(train, log), train
        data = read_config_file(target)
        if isinstance(data, dict) and "model_type" in data and "architecture" not in data:
            return read_hf_config(target), None
        if isinstance(data, dict) and "architecture" in data and "quantization" in data:
            # a folder `tinylm quantize` wrote: its model config plus a quantization record
            data = dict(data)
            record = data.pop("quantization")
            scheme = record.get("scheme", "?") if isinstance(record, dict) else "?"
            if log is not None:
                log(f"{target}: a model quantized to {scheme} by `tinylm quantize`; the "
                    f"counts and the estimate are of its float32 model")
        return config_from_dict(data), None
    found = plugins.registry("architectures")
    if target in found:
        return found[target].config(), None
    raise ConfigError(f"{target!r} is neither a config file, a checkpoint directory nor an "
                      f"architecture ({', '.join(sorted(found))})")


def is_training_config(path: str) -> bool:
    """A TOML file of training settings (a [model] table, or top-level settings that
    are not a model's), as opposed to a model config file."""
    if not path.endswith(".toml"):
        return False
    from tinylm.train import read_toml

    data = read_toml(path)
    return "architecture" not in data


@click.command(name="info")
@click.argument("config_or_dir")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=None,
              help="Batch size for the memory estimate [default: 1, or a training "
                   "config's batch_size].")
@click.option("-t", "--seq-len", type=click.IntRange(min=1), default=None,
              help="Sequence length for the memory estimate [default: max_positions, or a "
                   "training config's block_size].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "float64"]),
              default="float32", show_default=True, help="Parameter and activation dtype.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a report.")
def info_command(config_or_dir, batch_size, seq_len, dtype, as_json):
    """Print a model's parameter count and an estimate of its training memory.

    CONFIG_OR_DIR is a tinylm model config (.toml or .json), a training config (the
    TOML `tinylm train --config` reads: the model is built exactly as train builds
    it, its vocabulary from the tokenizer train would use, trained on the data if
    need be), a run folder or Hugging Face checkpoint directory (or its config.json),
    a folder `tinylm quantize` wrote (its float32 model), or an architecture name
    (gpt2, llama, bert, t5) for that family's default config. No model is allocated:
    any size works. A .gguf file gets a report of its own: architecture, tensor types
    with counts, bits per weight, size and parameters.
    """
    if os.path.isfile(config_or_dir) and (config_or_dir.lower().endswith(".gguf")
                                          or _gguf_magic(config_or_dir)):
        from tinylm.models.info import describe_gguf, gguf_summary

        click.echo(json.dumps(gguf_summary(config_or_dir), indent=2) if as_json
                   else describe_gguf(config_or_dir))
        return
    config, train = resolve_config(config_or_dir, log=lambda m: click.echo(m, err=True))
    if os.path.isdir(config_or_dir):
        check_weights(config_or_dir)  # a truncated or corrupt model.safetensors (or shard)
    if train is not None:
        batch_size = batch_size or train.batch_size
        seq_len = seq_len or train.block_size
        click.echo(f"the model `tinylm train --config {config_or_dir}` builds (vocab "
                   f"{config.vocab_size} from its {train.tokenizer} tokenizer)", err=True)
    batch_size = batch_size or 1
    if as_json:
        T = config.max_positions if seq_len is None else seq_len
        record = {"config": config.to_dict(), "parameters": parameter_counts(config),
                  "activation_bytes": activation_memory(config, batch_size, T, dtype),
                  "batch_size": batch_size, "seq_len": T, "dtype": dtype}
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(describe(config, batch_size, seq_len, dtype))
