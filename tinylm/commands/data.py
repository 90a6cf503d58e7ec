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
