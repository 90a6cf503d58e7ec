"""``tinylm plugins``: list the loaded plugins; ``tinylm plugins new NAME``: start one.

    tinylm plugins                    # PLUGIN  VERSION  REGISTERS, one row per plugin
    tinylm plugins --json             # the same as JSON
    tinylm plugins new demo           # ./demo: a package that `pip install ./demo` installs
    tinylm plugins new rope-xl --kind positional -o plugins/

A broken plugin (one that failed to import, fits no hook, raises in a hook) is skipped
by every other command with a warning; here it is listed as broken, one ``Error:``
line each on stderr, and the exit code is 2, so ``tinylm plugins`` is the check to run
after installing one.
"""

from __future__ import annotations

import json
import warnings

import click

from tinylm import plugins
from tinylm.commands.options import writable_folder
from tinylm.default_plugins import DEFAULT_PLUGINS
from tinylm.errors import PluginError
from tinylm.plugin_skeleton import KINDS, write_skeleton


@click.group(name="plugins", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def plugins_group(ctx, as_json: bool) -> None:
    """List the loaded plugins and what each registers.

    Built-in plugins come first, then those installed through the "tinylm"
    entry-point group (filtered by TINYLM_LOAD_PLUGINS). Broken plugins are listed
    as such, each reported on stderr, and the exit code is then 2.
    `tinylm plugins new NAME` writes a plugin package to start from.
    """
    if ctx.invoked_subcommand is not None:
        return
    with warnings.catch_warnings():  # reported below, once, as errors
        warnings.simplefilter("ignore", plugins.PluginWarning)
        plugin_commands(ctx.find_root().command)  # a clash with a built-in is an error here too
        broken = plugins.broken_plugins()
        rows = plugins.list_plugins()
    if as_json:
        records = [{"name": name, "version": version, "builtin": name in DEFAULT_PLUGINS,
                    "registers": registers, **({"broken": broken[name]} if name in broken else {})}
                   for name, version, registers in rows]
        click.echo(json.dumps(records, indent=2))
    else:
        click.echo(_table(rows, broken))
    if broken:
        for reasons in broken.values():
            for why in reasons:
                click.echo(f"Error: {why}", err=True)
        ctx.exit(2)


def plugin_commands(group: click.Group) -> dict:
    """The commands plugins registered; one named like a built-in command is an error."""
    commands = plugins.registry("commands")
    owners = plugins.registered_by("commands")
    for name in commands:
        if name in group.commands:
            raise PluginError(f"plugin {owners[name]!r} adds a command {name!r}, but tinylm "
                              f"has a built-in command of that name; rename the plugin's")
    return commands


def _table(rows: list, broken: dict) -> str:
    lines = [("PLUGIN", "VERSION", "REGISTERS")]
    for name, version, registers in rows:
        what = [f"{kind}: {', '.join(names)}" for kind, names in registers.items()]
        what += [f"BROKEN: {why}" for why in broken.get(name, ())]
        lines.append((name, version or "-", (what or ["-"])[0]))
        lines.extend(("", "", more) for more in what[1:])
    w0, w1 = (max(len(line[col]) for line in lines) for col in (0, 1))
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in lines)


@plugins_group.command(name="new")
@click.argument("name")
@click.option("--kind", type=click.Choice(sorted(KINDS)), default="tokenizer", show_default=True,
              help="What the plugin's one hook registers.")
@click.option("-o", "--output", "parent", type=click.Path(file_okay=False), default=".",
              callback=writable_folder,
              show_default=True, help="The folder to write the package folder NAME into.")
def new_command(name: str, kind: str, parent: str) -> None:
    """Write a working plugin package NAME: pyproject.toml (an entry point in the
    "tinylm" group), README.md, a module with one hook implementation, one test.

    Then: `pip install ./NAME`, `tinylm plugins` lists it, and
    `python -m pytest NAME/tests` passes. docs/plugins.md goes on from there.
    """
    root = write_skeleton(name, kind, parent)
    click.echo(f"wrote {root}: pip install {root} && python -m pytest {root / 'tests'}")
