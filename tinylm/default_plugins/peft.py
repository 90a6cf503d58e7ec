"""The built-in PEFT methods, registered through the same hook a third-party plugin
implements: ``register(name, MethodClass)`` (see ``tinylm.peft`` and docs/peft.md)."""

from tinylm.hookspecs import hookimpl


@hookimpl
def register_peft_methods(register):
    from tinylm.peft.bottleneck import Bottleneck
    from tinylm.peft.ia3 import IA3
    from tinylm.peft.lora import LoRA
    from tinylm.peft.prefix import PrefixTuning
    from tinylm.peft.prompt import PromptTuning

    register("lora", LoRA)
    register("ia3", IA3)
    register("bottleneck", Bottleneck)
    register("prompt_tuning", PromptTuning)
    register("prefix_tuning", PrefixTuning)
