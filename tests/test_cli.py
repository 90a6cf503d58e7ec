"""The `tinylm` command line: version, help, `plugins`, plugin commands, error reporting."""

import json
import os
import subprocess
import sys
import textwrap

import click
import pytest
from click.testing import CliRunner

import tinylm
from tinylm import hookimpl, plugins
from tinylm.cli import cli, main
from tinylm.default_plugins import DEFAULT_PLUGINS
from tinylm.errors import CheckpointError

CORE = "tinylm.default_plugins.positional"  # the first built-in


def run(*args):
    return CliRunner().invoke(cli, list(args), prog_name="tinylm")


class Commands:
    @staticmethod
    @hookimpl
    def register_commands(cli):
        @cli.command()
        @click.argument("who", default="world")
        def hello(who):
            """Greet someone."""
            click.echo(f"hello {who}")

        @cli.command()
        def boom():
            """Fail the way a user error fails."""
            raise CheckpointError("checkpoint 'x.safetensors' is truncated;\n"
                                  "save it again")

        @cli.command()
        def crash():
            """Fail the way a bug fails."""
            raise ZeroDivisionError("a bug")


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"tinylm {tinylm.__version__}"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag):
    result = run(flag)
    assert result.exit_code == 0
    assert "Usage: tinylm [OPTIONS] COMMAND [ARGS]..." in result.output
    assert "language-model engine" in result.output
    assert "plugins" in result.output and "TINYLM_LOAD_PLUGINS" in result.output


def test_plugins_table():
    result = run("plugins")
    assert result.exit_code == 0, result.output
    header, row, *more = result.output.splitlines()
    assert header.split() == ["PLUGIN", "VERSION", "REGISTERS"]
    assert row.split()[:2] == [CORE, tinylm.__version__]
    names = [line.split()[0] for line in [row, *more] if not line.startswith(" ")]
    assert names == list(DEFAULT_PLUGINS)  # the built-ins, nothing installed


def test_plugins_table_lists_what_each_registers():
    plugins.register_plugin(Commands, name="greeter")
    result = run("plugins")
    assert result.exit_code == 0, result.output
    assert "greeter" in result.output and "commands: boom, crash, hello" in result.output


def test_plugins_json():
    plugins.register_plugin(Commands, name="greeter")
    result = run("plugins", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert records[0] == {"name": CORE, "version": tinylm.__version__, "builtin": True,
                          "registers": records[0]["registers"]}
    assert records[0]["registers"]["positional_encodings"]
    assert records[-1] == {"name": "greeter", "version": None, "builtin": False,
                          "registers": {"commands": ["boom", "crash", "hello"]}}


def test_plugin_commands_are_listed_and_run():
    plugins.register_plugin(Commands)
    assert "Greet someone." in run("--help").output
    result = run("hello", "tinylm")
    assert result.exit_code == 0 and result.output == "hello tinylm\n"


def test_tinylm_error_is_one_line_on_stderr_with_exit_code_2():
    plugins.register_plugin(Commands)
    result = run("boom")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "Error: checkpoint 'x.safetensors' is truncated; save it again\n"


def test_other_exceptions_are_not_hidden():
    plugins.register_plugin(Commands)
    result = run("crash")
    assert isinstance(result.exception, ZeroDivisionError)


def test_usage_errors_keep_clicks_message():
    result = run("no-such-command")
    assert result.exit_code == 2
    assert "No such command 'no-such-command'" in result.stderr
    assert "Usage:" in result.stderr


def test_broken_plugin_is_reported_in_one_line():
    class Broken:
        @staticmethod
        @hookimpl
        def register_tokenizers(register):
            raise ValueError("vocab.json not found")

    plugins.register_plugin(Broken)
    result = run("plugins")
    assert result.exit_code == 2
    assert result.stderr == ("Error: plugin 'Broken' failed in register_tokenizers: "
                             "ValueError: vocab.json not found\n")


def test_plugin_command_may_not_shadow_a_builtin_one():
    class Shadow:
        @staticmethod
        @hookimpl
        def register_commands(cli):
            @cli.command(name="plugins")
            def fake():
                pass

    plugins.register_plugin(Shadow)
    result = run("--help")
    assert result.exit_code == 2
    assert "plugin 'Shadow' adds a command 'plugins'" in result.stderr


def test_main_entry_point(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"tinylm {tinylm.__version__}\n"


def test_error_in_a_real_process():
    """The console script's path end to end: stderr has one line, no traceback."""
    code = textwrap.dedent("""
        from tinylm import hookimpl, plugins
        from tinylm.cli import main
        from tinylm.errors import TinyLMError

        class Failing:
            @hookimpl
            def register_commands(self, cli):
                @cli.command()
                def boom():
                    raise TinyLMError("it went wrong; try again")

        plugins.register_plugin(Failing())
        main(["boom"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, plugins.ALLOW_ENV: ""})
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "Error: it went wrong; try again\n"


def test_python_dash_m_tinylm_runs_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tinylm", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("Usage: tinylm "), done.stderr
