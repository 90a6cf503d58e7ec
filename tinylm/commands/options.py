"""Click helpers the commands share: a float type that refuses NaN and infinities, and
option groups, which hand a command one object built from several options.

    @click.command()
    @option_group("sampling", SamplingConfig,
                  click.option("--temperature", type=finite_float(min=0), default=1.0),
                  click.option("--top-k", type=click.IntRange(min=1)))
    def command(sampling):          # one SamplingConfig, not one parameter per option
        ...

Options that travel together are built into their object once, here at the edge,
and passed down whole; a new option touches its group and its one user.
"""

from __future__ import annotations

import functools
import math

import click


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses "nan", "inf" and "-inf" (which pass every
    range check: every comparison with NaN is false)."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        if self.min is None and self.max is None:
            return ""  # --help shows no range for an unbounded one
        return super()._describe_range()


def finite_float(min=None, max=None, *, min_open: bool = False,
                 max_open: bool = False) -> FiniteFloat:
    """A finite float option type, optionally in a range (as ``click.FloatRange``)."""
    return FiniteFloat(min, max, min_open=min_open, max_open=max_open)


def non_empty_strings(ctx, param, values):
    """A callback for a ``multiple=True`` text option whose values must not be empty."""
    for value in values:
        if not value:
            raise click.BadParameter("must not be empty", ctx=ctx, param=param)
    return values


def option_group(name: str, build, *options):
    """A decorator: add ``options`` (``click.option(...)`` decorators, listed in the
    order --help shows them) to a command, and call the command with one argument
    ``name`` = ``build(**their values)`` in place of one argument per option."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {key: kwargs.pop(key) for key in keys}
            return command(*args, **kwargs, **{name: build(**values)})

        wrapper.__click_params__ = list(getattr(command, "__click_params__", []))
        before = len(wrapper.__click_params__)
        for option in reversed(options):
            wrapper = option(wrapper)
        keys = [p.name for p in wrapper.__click_params__[before:]]
        return wrapper

    return decorate
