"""The built-in training objectives, registered through the same hook a third-party
plugin implements (see ``tinylm.objectives`` for what each one does)."""

from tinylm.hookspecs import hookimpl


@hookimpl
def register_objectives(register):
    from tinylm.objectives import SFT, CausalLM, MaskedLM, PrefixLM, SpanCorruption

    register("causal-lm", CausalLM)
    register("prefix-lm", PrefixLM)
    register("masked-lm", MaskedLM)
    register("span-corruption", SpanCorruption)
    register("sft", SFT)
