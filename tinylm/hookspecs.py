"""The pluggy hook specifications: everything a plugin can add to tinylm.

A plugin is a module (or any object) with functions marked ``@hookimpl`` whose names
are the hooks below. Each ``register_*`` hook receives a ``register(name, obj)``
callback and calls it once per thing it provides:

    from tinylm import hookimpl

    @hookimpl
    def register_tokenizers(register):
        register("my-bpe", MyBPETokenizer)

A hook that a plugin does not implement is simply not called. A name that two
plugins register is an error naming both (see ``tinylm.plugins``).
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("tinylm")
hookimpl = HookimplMarker("tinylm")


@hookspec
def register_tokenizers(register):
    """Register tokenizer classes: ``register("bpe", BPETokenizer)``. A class needs
    the methods in ``plugins.TOKENIZER_INTERFACE`` (checked as the registry fills;
    docs/plugins.md, "The tokenizer interface", says who calls what)."""


@hookspec
def register_positional_encodings(register):
    """Register positional schemes: ``register("rope", RoPE)``."""


@hookspec
def register_objectives(register):
    """Register training objectives: ``register("causal-lm", CausalLM)``."""


@hookspec
def register_peft_methods(register):
    """Register fine-tuning (PEFT) methods: ``register("lora", LoRA)``."""


@hookspec
def register_architectures(register):
    """Register model families (config + model class): ``register("gpt2", GPT2)``."""


@hookspec
def register_reward_functions(register):
    """Register reward functions for RL (``tinylm align grpo`` / ``rloo --reward
    NAME``): ``register("exact-match", exact_match)``. A reward function has TRL's
    signature, ``f(prompts, completions, completion_ids, **fields) -> list[float]``: one
    finite number per completion (``tinylm.align.rewards``)."""


@hookspec
def register_commands(cli):
    """Add subcommands to the ``tinylm`` Click group: ``@cli.command()`` or
    ``cli.add_command(cmd)``."""
