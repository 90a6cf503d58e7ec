"""``tinylm eval``: measure a model (perplexity, multiple choice, GLUE-style tasks).

    tinylm eval perplexity --model M --data FILE
    tinylm eval mc --model M --task FILE --shots 2
    tinylm eval glue --model M --task sst2 --data dev.tsv

Each subcommand lives in its own module (``tinylm.commands.eval_*``) and is added to
the group below.
"""

from __future__ import annotations

import click


@click.group(name="eval")
def eval_group():
    """Evaluate a model: perplexity, multiple-choice tasks, GLUE-style classification."""


# One line per subcommand module (each adds its commands when it lands):
from tinylm.commands.eval_glue import glue_command  # noqa: E402
eval_group.add_command(glue_command)
from tinylm.commands.eval_harness import mc_command, perplexity_command  # noqa: E402
eval_group.add_command(perplexity_command)
eval_group.add_command(mc_command)
