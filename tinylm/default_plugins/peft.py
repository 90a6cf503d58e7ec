"""The built-in PEFT methods, registered through the same hook a third-party plugin
implements: ``register(name, MethodClass)`` (see ``tinylm.peft`` and docs/peft.md)."""

from tinylm.hookspecs import hookimpl


@hookimpl
def register_peft_methods(register):
    from tinylm.peft.lora import LoRA

    register("lora", LoRA)
