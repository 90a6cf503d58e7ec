"""The ``tinylm`` command line: a thin Click group; each command calls the library.

Plugins add subcommands through the ``register_commands`` hook. Any ``TinyLMError``
that reaches the group becomes one line, ``Error: <message>``, on stderr and exit
code 2; Click's own usage errors keep their messages and exit codes.
"""

from __future__ import annotations

import importlib.metadata
import sys
import warnings

import click

from tinylm import plugins
from tinylm.commands.plugins import plugin_commands, plugins_group
from tinylm.errors import TinyLMError


def _version() -> str:
    try:
        return importlib.metadata.version("tinylm")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        from tinylm.version import __version__

        return __version__


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class TinyLMGroup(click.Group):
    """A Click group that also lists plugin commands and reports TinyLMError in one line."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(plugin_commands(self)))

    def get_command(self, ctx, name):
        return super().get_command(ctx, name) or plugin_commands(self).get(name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        with warnings.catch_warnings():
            _warn_in_one_line()
            try:
                return super().main(args, prog_name, complete_var, standalone_mode, **extra)
            except TinyLMError as e:
                if not standalone_mode:
                    raise
                click.echo(f"Error: {_one_line(e)}", err=True)
                sys.exit(2)


def _warn_in_one_line() -> None:
    """Inside ``warnings.catch_warnings()``: a skipped broken plugin (``PluginWarning``)
    prints as ``Warning: <message>`` on stderr, every time; other warnings as usual."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, plugins.PluginWarning):
            click.echo(f"Warning: {_one_line(message)}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.simplefilter("always", plugins.PluginWarning)
    warnings.showwarning = show


@click.group(cls=TinyLMGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", "-V", prog_name="tinylm",
                      message="%(prog)s %(version)s")
def cli():
    """tinylm: a small, readable language-model engine on NumPy (CPU) and CuPy (GPU).

    Run `tinylm COMMAND --help` for a command's options. Plugins installed in the
    same environment add tokenizers, positional encodings, objectives, PEFT methods,
    architectures and commands: `tinylm plugins` lists them, and the environment
    variable TINYLM_LOAD_PLUGINS (comma-separated names; empty for none) limits
    which are loaded.
    """


def main(argv: list | None = None) -> None:
    """The ``tinylm`` console script."""
    cli.main(args=argv, prog_name="tinylm")


from tinylm.commands.info import info_command  # noqa: E402  (the group is defined above)

cli.add_command(plugins_group)
cli.add_command(info_command)

from tinylm.commands.tokenize import tokenize_group  # noqa: E402

cli.add_command(tokenize_group)

from tinylm.commands.train import train_command  # noqa: E402
from tinylm.commands.generate import generate_command  # noqa: E402
from tinylm.commands.plot import plot_command  # noqa: E402

cli.add_command(train_command)
cli.add_command(generate_command)
cli.add_command(plot_command)
from tinylm.commands.quantize import quantize_command  # noqa: E402
cli.add_command(quantize_command)
from tinylm.commands.finetune import finetune_command  # noqa: E402
cli.add_command(finetune_command)
from tinylm.commands.align import align_group  # noqa: E402
cli.add_command(align_group)
from tinylm.commands.eval import eval_group  # noqa: E402
cli.add_command(eval_group)
from tinylm.commands.audit import audit_group  # noqa: E402
cli.add_command(audit_group)
from tinylm.commands.serve import serve_command  # noqa: E402
cli.add_command(serve_command)
from tinylm.commands.data import data_group  # noqa: E402
cli.add_command(data_group)
