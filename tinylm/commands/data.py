"""``tinylm data``: prepare web-scale pre-training text, one stage per subcommand.

    tinylm data clean c4/ -o cleaned/            # C4 + Gopher heuristics, stats JSON
    tinylm data dedup cleaned/ -o deduped/       # exact + MinHash/LSH near-duplicates

Every stage reads files ``tinylm.webdata.readers`` knows (JSONL, text, WET, wiki XML;
.gz/.bz2/.zst), writes one output shard per input shard atomically with a done-marker,
skips shards a previous run finished, and writes its statistics as JSON next to its
output. A new stage is a Click command added to ``data_group`` (``@data_group.command``
here, or ``data_group.add_command(cmd)`` from its own module); ``input_options`` gives it
the shared reader options.
"""

from __future__ import annotations

import click

from tinylm.commands.options import option_group, writable_folder
from tinylm.webdata.readers import FORMATS, TEXT_UNITS


@click.group(name="data")
def data_group():
    """Prepare pre-training data: clean and deduplicate web text."""


def input_options(command):
    """The reader options every stage takes: --format, --text-field, --text-unit."""
    command = click.option("--text-unit", type=click.Choice(TEXT_UNITS), default="file",
                           show_default=True,
                           help="Plain text: a document is the whole file, a block between "
                                "blank lines, or a line.")(command)
    command = click.option("--text-field", default="text", show_default=True,
                           help="JSONL: the field holding the text (others are kept as "
                                "metadata).")(command)
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                        help="Input format [default: from each file's name].")(command)


def output_options(command):
    """--output, --compression and --progress, which every stage takes."""
    command = click.option("--progress/--no-progress", default=True, show_default=True,
                           help="Show a progress bar (documents/s) on stderr.")(command)
    command = click.option("--compression", type=click.Choice(["gz", "zst", "none"]),
                           default="gz", show_default=True,
                           help="Output shards: JSONL compressed with gzip, zstd or not.")(command)
    return click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
                        callback=writable_folder,
                        help="Output folder: one shard per input file, a stats JSON.")(command)


def _read_options(fmt, text_field, text_unit) -> dict:
    return {"format": fmt, "text_field": text_field, "text_unit": text_unit}


def _echo_bad_records(files) -> None:
    for entry in files:
        if entry["bad"]:
            bad = ", ".join(f"{n} {reason}" for reason, n in entry["bad"].items())
            click.echo(f"  bad records in {entry['path']}: {bad}", err=True)


# ---------------------------------------------------------------------- clean


def _clean_config(config_file, filters, skip, values):
    import json

    from tinylm.webdata.filters import CleanConfig
    from tinylm.webdata.readers import WebDataError

    settings = {}
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:
                settings = json.load(f)
        except (OSError, ValueError) as e:
            raise WebDataError(f"cannot read the clean config {config_file}: {e}; give a "
                               f"JSON object of CleanConfig fields") from None
        if not isinstance(settings, dict):
            raise WebDataError(f"{config_file} is not a JSON object; give CleanConfig fields")
    settings.update({k: v for k, v in values.items() if v is not None})
    if filters:
        settings["filters"] = [f.strip() for f in filters.split(",") if f.strip()]
    config = CleanConfig.from_dict(settings)
    if skip:
        names = [n for n in config.names() if n not in set(skip)]
        config = CleanConfig.from_dict({**settings, "filters": names})
    return config


def _build_clean_config(filters, skip, config_file, **values):
    return _clean_config(config_file, filters, skip, values)


clean_config_options = option_group(
    "config", _build_clean_config,
    click.option("--filters", default=None,
                 help="Comma-separated filters or groups, in order (c4, gopher, language, "
                      "c4_span_dedup, or single names such as c4_min_words) [default: "
                      "language, gopher, c4, c4_span_dedup]."),
    click.option("--skip", multiple=True, help="Leave out a filter by name (repeatable)."),
    click.option("--min-words-per-line", type=click.IntRange(min=0), default=None,
                 help="C4: drop lines with fewer words [default: 3; TFDS's C4: 5]."),
    click.option("--min-sentences", type=click.IntRange(min=0), default=None,
                 help="C4: drop pages with fewer sentences [default: 5; TFDS's C4: 3]."),
    click.option("--bad-words", type=click.Path(dir_okay=False), default=None,
                 help="C4: drop pages with any word or phrase of this file (one a line)."),
    click.option("--language", default=None,
                 help="Keep pages whose language ID is this label (with --language-id "
                      "script: Latin, Cyrillic, Han, ...)."),
    click.option("--language-id", default=None,
                 help="Language-ID function: a registered name or module:function "
                      "[default: script]."),
    click.option("--min-language-score", type=click.FloatRange(0, 1), default=None,
                 help="The language ID's least score to keep a page [default: 0.5]."),
    click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                 help="A JSON object of CleanConfig fields (thresholds); flags override it."))


@data_group.command(name="clean")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@output_options
@input_options
@clean_config_options
@click.option("--memory-mb", type=click.IntRange(min=1), default=16, show_default=True,
              help="Memory budget of the span dedup's on-disk index (hash-partitioned "
                   "files, at most 256 open at once). The process's peak stays near it "
                   "plus about 50 MiB for up to about 3.4 M spans per MiB of budget "
                   "(53.7 M at 16 MiB); past that it is about 80 bytes x spans / 256. "
                   "Every repeat of a span lands in one partition, so a span repeated "
                   "extremely often is sorted in memory there all the same. Changes no "
                   "result.")
def clean_command(inputs, output, compression, progress, fmt, text_field, text_unit,
                  config, memory_mb):
    """Clean INPUTS (files or folders) with C4's and Gopher's heuristics into OUTPUT."""
    from tinylm.webdata.clean import clean_corpus

    totals = clean_corpus(inputs, output, config,
                          read_options=_read_options(fmt, text_field, text_unit),
                          compression=compression, show_progress=progress,
                          memory_bytes=memory_mb << 20)
    _echo_clean(totals, output)


def _echo_clean(totals: dict, output: str) -> None:
    from tinylm.webdata.shards import stats_path

    docs_in, chars_in = totals["documents_in"], max(totals["chars_in"], 1)
    click.echo(f"{'filter':<26}{'documents':>11}{'lines':>11}{'chars':>14}{'% chars':>9}")
    for name, r in totals["removed"].items():
        click.echo(f"{name:<26}{r['documents']:>11}{r['lines']:>11}{r['chars']:>14}"
                   f"{100 * r['chars'] / chars_in:>8.1f}%")
    click.echo(f"kept {totals['documents_out']} of {docs_in} documents, "
               f"{totals['chars_out']} of {totals['chars_in']} characters; "
               f"{totals['shards_done']} shards cleaned, {totals['shards_skipped']} already "
               f"done; {totals['documents_per_s']} documents/s")
    _echo_bad_records(totals["files"])
    click.echo(f"statistics: {stats_path(output, 'clean')}")


# ---------------------------------------------------------------------- dedup


@data_group.command(name="dedup")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@output_options
@input_options
@click.option("--exact/--no-exact", default=True, show_default=True,
              help="Drop documents whose normalised text (NFKC, lowercase, spaces) came before.")
@click.option("--near/--no-near", default=True, show_default=True,
              help="Drop near-duplicates found by MinHash + LSH.")
@click.option("--shingle", type=click.Choice(["word", "char"]), default="word",
              show_default=True, help="Shingles are runs of words or of characters.")
@click.option("--shingle-size", type=click.IntRange(min=1), default=5, show_default=True,
              help="Words (at most 8) or characters per shingle.")
@click.option("--num-perm", type=click.IntRange(min=1), default=128, show_default=True,
              help="MinHash permutations (signature length).")
@click.option("--bands", type=click.IntRange(min=1), default=None,
              help="LSH bands [default: chosen for --threshold].")
@click.option("--rows", type=click.IntRange(min=1), default=None,
              help="LSH rows per band [default: chosen for --threshold].")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.8, show_default=True,
              help="Least estimated Jaccard similarity of a near-duplicate pair.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seed of the MinHash permutations.")
@click.option("--memory-mb", type=click.IntRange(min=1), default=16, show_default=True,
              help="Memory budget of the on-disk duplicate index (hash-partitioned "
                   "files, at most 256 open at once). The process's peak stays near it "
                   "plus about 60 MiB and 16 bytes per candidate pair for up to about "
                   "3.4 M documents per MiB of budget (53.7 M at 16 MiB); past that it "
                   "is about 80 bytes x documents / 256. Equal texts (and equal band "
                   "buckets) land in one partition, so one repeated extremely often is "
                   "sorted in memory there all the same. Changes no result.")
def dedup_command(inputs, output, compression, progress, fmt, text_field, text_unit,
                  memory_mb, **values):
    """Remove exact and near-duplicate documents of INPUTS into OUTPUT."""
    from tinylm.webdata.dedup import DedupConfig, dedup_corpus
    from tinylm.webdata.shards import stats_path

    totals = dedup_corpus(inputs, output, DedupConfig(**values),
                          read_options=_read_options(fmt, text_field, text_unit),
                          compression=compression, show_progress=progress,
                          memory_bytes=memory_mb << 20)
    click.echo(f"kept {totals['documents_out']} of {totals['documents_in']} documents: "
               f"{totals['exact_duplicates']} exact and {totals['near_duplicates']} near "
               f"duplicates dropped ({totals.get('clusters', 0)} clusters, "
               f"{totals['bands']} bands x {totals['rows']} rows, "
               f"{totals.get('candidate_pairs', 0)} candidate pairs, "
               f"{totals.get('verified_pairs', 0)} verified)")
    rates = ", ".join(f"{stage} {rate} documents/s"
                      for stage, rate in totals["documents_per_s"].items())
    click.echo(f"{rates}; dropped documents listed in {output}/.dedup/*.duplicates.jsonl")
    _echo_bad_records(totals["files"])
    click.echo(f"statistics: {stats_path(output, 'dedup')}")


from tinylm.commands.data_tokenize import tokenize_command  # noqa: E402  (issue 20's shards)

data_group.add_command(tokenize_command)
