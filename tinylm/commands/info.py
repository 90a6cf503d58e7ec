"""``tinylm info CONFIG_OR_DIR``: parameter count and training-memory estimate.

    tinylm info llama                      # a family's default config (Llama-2 7B)
    tinylm info my-model.toml -b 8 -t 512  # a tinylm config file
    tinylm info path/to/hf-checkpoint/     # a Hugging Face directory (its config.json)
"""

from __future__ import annotations

import json
import os

import click

from tinylm import plugins
from tinylm.models.config import ConfigError, config_from_dict, read_config_file
from tinylm.models.hf import read_hf_config
from tinylm.models.info import activation_memory, describe, parameter_counts


def resolve_config(target: str):
    """A model config from a tinylm config file, a Hugging Face directory or config.json,
    or the name of a registered architecture (its default config)."""
    if os.path.isdir(target):
        config_json = os.path.join(target, "config.json")
        if not os.path.exists(config_json):
            raise ConfigError(f"{target} has no config.json")
        target = config_json
    if os.path.isfile(target):
        data = read_config_file(target)
        if isinstance(data, dict) and "model_type" in data and "architecture" not in data:
            return read_hf_config(target)
        return config_from_dict(data)
    found = plugins.registry("architectures")
    if target in found:
        return found[target].config()
    raise ConfigError(f"{target!r} is neither a config file, a checkpoint directory nor an "
                      f"architecture ({', '.join(sorted(found))})")


@click.command(name="info")
@click.argument("config_or_dir")
@click.option("-b", "--batch-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Batch size for the memory estimate.")
@click.option("-t", "--seq-len", type=click.IntRange(min=1), default=None,
              help="Sequence length for the memory estimate [default: max_positions].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "float64"]),
              default="float32", show_default=True, help="Parameter and activation dtype.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a report.")
def info_command(config_or_dir, batch_size, seq_len, dtype, as_json):
    """Print a model's parameter count and an estimate of its training memory.

    CONFIG_OR_DIR is a tinylm config (.toml or .json), a Hugging Face checkpoint
    directory (or its config.json), or an architecture name (gpt2, llama, bert, t5)
    for that family's default config. Nothing is allocated: any size works.
    """
    config = resolve_config(config_or_dir)
    if as_json:
        T = config.max_positions if seq_len is None else seq_len
        record = {"config": config.to_dict(), "parameters": parameter_counts(config),
                  "activation_bytes": activation_memory(config, batch_size, T, dtype),
                  "batch_size": batch_size, "seq_len": T, "dtype": dtype}
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(describe(config, batch_size, seq_len, dtype))
