"""The built-in positional schemes, registered through the same hook a third-party
plugin implements (see ``tinylm.positional`` for what each one does)."""

from tinylm.hookspecs import hookimpl


@hookimpl
def register_positional_encodings(register):
    from tinylm.positional import (
        ALiBi, LearnedPositional, NoPositional, RoPE, SinusoidalPositional, T5RelativeBias,
    )

    register("none", NoPositional)
    register("learned", LearnedPositional)
    register("sinusoidal", SinusoidalPositional)
    register("rope", RoPE)
    register("alibi", ALiBi)
    register("t5", T5RelativeBias)
