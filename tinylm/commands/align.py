"""``tinylm align``: alignment tuning, one subcommand per method.

    tinylm align reward --model M --data prefs.jsonl --out runs/rm
    tinylm align dpo --model M --data prefs.jsonl --beta 0.1 --out runs/dpo
    tinylm align grpo --model M --data prompts.jsonl --reward exact-match --out runs/grpo

Each subcommand lives in its own module (``tinylm.commands.align_*``) and is added to
the group below.
"""

from __future__ import annotations

import click


@click.group(name="align")
def align_group():
    """Align a model: a reward model, DPO, or reinforcement learning (GRPO, RLOO)."""


# One line per subcommand module (each adds its commands when it lands):
from tinylm.commands.align_reward import reward_command  # noqa: E402
align_group.add_command(reward_command)
from tinylm.commands.align_rl import grpo_command, rloo_command  # noqa: E402
align_group.add_command(grpo_command)
align_group.add_command(rloo_command)
from tinylm.commands.align_dpo import dpo_command  # noqa: E402
align_group.add_command(dpo_command)
