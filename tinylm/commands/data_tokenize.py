"""``tinylm data tokenize``: documents -> shards of token ids that ``tinylm train --data``
streams.

    tinylm data tokenize deduped/ --tokenizer tok.txt --out tokens/ --processes 8
    tinylm train --data tokens/ --out runs/web            # the shards' tokenizer.txt
    tinylm train --data web_tokens/:0.7 --data book_tokens/:0.3 --out runs/mix

The work is ``tinylm.webdata.tokenize_shards``'s: parallel over processes, resumable
(the same command again continues an interrupted run), an index written last.
"""

from __future__ import annotations

import sys

import click

from tinylm.commands.data import _echo_bad_records, _read_options, input_options
from tinylm.commands.options import writable_folder
from tinylm.webdata.tokenize_shards import DEFAULT_SHARD_TOKENS, DEFAULT_SPLIT_BYTES


@click.command(name="tokenize")
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("-i", "--input", "more_inputs", multiple=True, type=click.Path(),
              help="An input file or folder (repeatable; or give them as arguments).")
@click.option("-t", "--tokenizer", required=True, type=click.Path(dir_okay=False),
              help="Tokenizer file (tinylm's, tokenizer.json, ...).")
@click.option("-o", "--out", "--output", "output", required=True,
              type=click.Path(file_okay=False), callback=writable_folder,
              help="Output folder: shards, index.json, tokenizer.txt.")
@click.option("-p", "--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (each tokenizes whole files or byte ranges).")
@click.option("--shard-tokens", type=click.IntRange(min=1), default=DEFAULT_SHARD_TOKENS,
              show_default=True, help="Token ids per shard (an input's last one is shorter).")
@click.option("--split-bytes", type=click.IntRange(min=0), default=DEFAULT_SPLIT_BYTES,
              show_default=True,
              help="Cut uncompressed JSONL files above this size into byte ranges (0: never).")
@click.option("--eot", default="auto", show_default=True,
              help="The token between documents (auto: <|endoftext|>, </s>, ... whichever "
                   "the tokenizer has; none: nothing).")
@click.option("--overwrite", is_flag=True,
              help="Start over: remove the shards OUT holds (of any inputs and options).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar (documents/s, tokens/s) on stderr.")
@input_options
def tokenize_command(inputs, more_inputs, tokenizer, output, processes, shard_tokens,
                     split_bytes, eot, overwrite, progress, fmt, text_field, text_unit):
    """Tokenize INPUTS (files or folders) into fixed-size shards of token ids in OUT."""
    from tinylm.webdata.tokenize_shards import TokenizeConfig, tokenize_corpus

    paths = list(inputs) + list(more_inputs)
    if not paths:
        raise click.UsageError("give the files to tokenize: INPUTS... or --input PATH")
    try:
        config = TokenizeConfig(processes, shard_tokens, split_bytes, eot)
        totals = tokenize_corpus(paths, output, tokenizer, config,
                                 read_options=_read_options(fmt, text_field, text_unit),
                                 show_progress=progress, overwrite=overwrite)
    except KeyboardInterrupt:
        click.echo(f"interrupted: the finished shards are kept in {output}; run the same "
                   f"command again to continue", err=True)
        sys.exit(130)
    _echo_tokenize(totals, output)


def _echo_tokenize(totals: dict, output: str) -> None:
    index = totals["index"]
    click.echo(f"{index['n_tokens']:,} tokens ({index['dtype']}) in {len(index['shards'])} "
               f"shard(s), {index['n_documents']:,} documents from {len(index['inputs'])} "
               f"file(s); left out: {index['n_empty']} empty, {index['n_untokenizable']} "
               f"untokenizable")
    click.echo(f"this run: {totals['units_done']} unit(s) tokenized, {totals['units_skipped']} "
               f"already done; {totals['documents_per_s']:,} documents/s, "
               f"{totals['tokens_per_s']:,} tokens/s")
    _echo_bad_records(index["inputs"])
    click.echo(f"index: {output}/index.json (tinylm train --data {output})")
