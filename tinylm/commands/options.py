"""Click helpers the commands share: a float type that refuses NaN and infinities,
checks that an output folder or file can be written (before any work is done), and
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
import os

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


def _flag(param) -> str:
    return "/".join(param.opts) if param is not None and param.opts else "the output"


def writable_folder(ctx, param, value):
    """A callback for an output-folder option: ``value`` (None passes) must be a folder
    that exists or can be created, and that may be written to. It is checked by
    creating it (and a file in it) and removing whatever the check made, so a bad path
    is one error line before any work, and a good one is left as it was."""
    if value is None:
        return value
    import tempfile

    path = os.path.abspath(os.fspath(value))
    made, p = [], path
    while not os.path.lexists(p):
        made.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise click.BadParameter(f"{p} is a file, so {value} cannot be a folder; pick "
                                 f"another {_flag(param)}", ctx=ctx, param=param)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise click.BadParameter(f"cannot write into the folder {value} "
                                 f"({e.strerror or e}); pick a folder you may write to",
                                 ctx=ctx, param=param) from None
    finally:
        for folder in made:  # deepest first: only the folders this check created
            if os.path.isdir(folder):
                try:
                    os.rmdir(folder)
                except OSError:
                    break
    return value


def writable_file(ctx, param, value):
    """A callback for an output-file option (None and "-" pass): the folder ``value``
    goes into must exist and may be written to, checked before any work is done (the
    file itself is written at the end, atomically)."""
    if value is None or value == "-":
        return value
    import tempfile

    folder = os.path.dirname(os.path.abspath(os.fspath(value)))
    if not os.path.isdir(folder):
        what = ("is a file, not a folder;" if os.path.exists(folder)
                else "does not exist; create it, or")
        raise click.BadParameter(f"the folder {folder} of {value} {what} pick another "
                                 f"{_flag(param)}", ctx=ctx, param=param)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise click.BadParameter(f"cannot write {value} ({e.strerror or e}); pick a "
                                 f"folder you may write to", ctx=ctx, param=param) from None
    return value


def _surrogate_at(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (what Python makes of bytes that
    are not UTF-8 in a command-line argument or on standard input), else None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def check_utf8(text: str, what: str) -> str:
    """``text`` if it is UTF-8 text; else a TinyLMError naming ``what`` (a shell that
    passed bytes in another encoding, or a binary file piped in)."""
    at = _surrogate_at(text)
    if at is not None:
        from tinylm.errors import TinyLMError

        raise TinyLMError(f"{what} is not UTF-8 text (a byte that is not UTF-8 at character "
                          f"{at}); give UTF-8 text (check the terminal's or the file's "
                          f"encoding)")
    return text


def utf8_text(ctx, param, value):
    """A callback for a text option or argument (one value or ``multiple``): each must be
    UTF-8 (see ``check_utf8``)."""
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(item, str) and _surrogate_at(item) is not None:
            at = _surrogate_at(item)
            raise click.BadParameter(f"not UTF-8 text (a byte that is not UTF-8 at character "
                                     f"{at}); give UTF-8 text (check the terminal's "
                                     f"encoding)", ctx=ctx, param=param)
    return value
