"""The built-in reward functions for RL (``tinylm align grpo`` / ``rloo --reward NAME``),
registered through the same hook a third-party plugin implements (see
``tinylm.align.rewards`` for what each one rewards)."""

from tinylm.hookspecs import hookimpl


@hookimpl
def register_reward_functions(register):
    from tinylm.align.rewards import exact_match, regex_match, think_format

    register("exact-match", exact_match)
    register("think-format", think_format)
    register("regex", regex_match)
