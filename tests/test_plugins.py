"""The plugin manager: built-ins, registries, entry points, the allow-list, errors."""

import re
import sys
import textwrap

import pytest

from tinylm import hookimpl, plugins
from tinylm.default_plugins import DEFAULT_PLUGINS
from tinylm.errors import PluginError, TinyLMError
from tinylm.plugins import PluginWarning
from tinylm.tokenizers import CharTokenizer

CORE = "tinylm.default_plugins.positional"  # the first built-in
BUILTINS = list(DEFAULT_PLUGINS)  # core first, then the other built-in plugin modules


class AlphaBPE(CharTokenizer):
    name = "alpha-bpe"


class AlphaShared(CharTokenizer):
    name = "shared"


class BetaShared(CharTokenizer):
    name = "shared"


class Alpha:
    @staticmethod
    @hookimpl
    def register_tokenizers(register):
        register("alpha-bpe", AlphaBPE)
        register("shared", AlphaShared)

    @staticmethod
    @hookimpl
    def register_objectives(register):
        register("alpha-lm", "AlphaLM")


class Beta:
    @staticmethod
    @hookimpl
    def register_tokenizers(register):
        register("shared", BetaShared)


class Raising:
    @staticmethod
    @hookimpl
    def register_architectures(register):
        raise RuntimeError("config file is missing")


# --------------------------------------------------------------------------- built-ins


def test_builtins_are_loaded_as_ordinary_plugins():
    import tinylm

    loaded = plugins.list_plugins()
    # the conftest allow-list is empty: nothing installed is loaded, only the built-ins
    assert [name for name, _, _ in loaded] == BUILTINS and BUILTINS[0] == CORE
    for _, version, registers in loaded:
        assert version == tinylm.__version__ and isinstance(registers, dict)


def test_manager_is_cached_until_reset():
    pm = plugins.get_plugin_manager()
    assert plugins.get_plugin_manager() is pm
    plugins.reset()
    assert plugins.get_plugin_manager() is not pm


# --------------------------------------------------------------------------- registries


def test_registered_names_are_looked_up_and_attributed():
    assert plugins.register_plugin(Alpha) == "Alpha"
    found, owners = plugins.registry("tokenizers"), plugins.registered_by("tokenizers")
    assert {"alpha-bpe": AlphaBPE, "shared": AlphaShared}.items() <= found.items()
    assert {name for name, owner in owners.items() if owner == "Alpha"} == {"alpha-bpe", "shared"}
    assert plugins.get_tokenizer_class("alpha-bpe") is AlphaBPE
    assert plugins.get_objective("alpha-lm") == "AlphaLM"
    listed = {name: registers for name, _, registers in plugins.list_plugins()}
    assert listed["Alpha"] == {"tokenizers": ["alpha-bpe", "shared"], "objectives": ["alpha-lm"]}


def test_registry_returns_a_copy():
    plugins.register_plugin(Alpha)
    plugins.registry("tokenizers")["intruder"] = object()
    assert "intruder" not in plugins.registry("tokenizers")


def test_duplicate_name_names_both_plugins():
    plugins.register_plugin(Alpha)
    plugins.register_plugin(Beta)
    with pytest.raises(PluginError) as info:
        plugins.registry("tokenizers")
    message = str(info.value)
    assert "'shared'" in message and "'Alpha'" in message and "'Beta'" in message


def test_same_plugin_registering_a_name_twice_is_an_error():
    class Twice:
        @staticmethod
        @hookimpl
        def register_peft_methods(register):
            register("twice-method", 1)
            register("twice-method", 2)

    plugins.register_plugin(Twice)
    with pytest.warns(PluginWarning, match="'Twice' registers PEFT method 'twice-method' twice"):
        assert "twice-method" not in plugins.registry("peft_methods")
    assert "lora" in plugins.registry("peft_methods")  # the rest is there
    with pytest.raises(PluginError, match="PEFT method 'twice-method' is unavailable: plugin "
                                          "'Twice' registers PEFT method 'twice-method' twice"):
        plugins.get_peft_method("twice-method")


def test_plugin_that_raises_is_reported_by_name_and_skipped():
    plugins.register_plugin(Raising, name="raising-plugin")
    with pytest.warns(PluginWarning) as record:
        assert plugins.get_architecture("gpt2")  # the rest of tinylm still works
    message = str(record[0].message)
    assert "'raising-plugin' failed in register_architectures" in message
    assert "RuntimeError: config file is missing" in message and plugins.ALLOW_ENV in message
    assert plugins.broken_plugins() == {"raising-plugin": [message[:-len(plugins.SKIPPED) - 2]]}


def test_invalid_name_is_reported():
    class Nameless:
        @staticmethod
        @hookimpl
        def register_positional_encodings(register):
            register("", object)

    plugins.register_plugin(Nameless)
    with pytest.warns(PluginWarning, match="'Nameless'.*non-empty"):
        assert "rope" in plugins.registry("positional_encodings")


@pytest.mark.parametrize("lookup, kind", [
    (plugins.get_tokenizer_class, "tokenizer"),
    (plugins.get_positional, "positional encoding"),
    (plugins.get_objective, "objective"),
    (plugins.get_peft_method, "PEFT method"),
    (plugins.get_architecture, "architecture"),
])
def test_unknown_name_lists_what_is_available(lookup, kind):
    with pytest.raises(TinyLMError, match=f"unknown {kind} 'nope'; available: "):
        lookup("nope")


def test_unknown_name_suggests_a_close_one():
    plugins.register_plugin(Alpha)
    with pytest.raises(TinyLMError, match="available: alpha-bpe, .*shared.*Did you mean 'alpha-bpe'"):
        plugins.get_tokenizer_class("alpha_bpe")


def test_unknown_kind():
    with pytest.raises(TinyLMError, match="unknown plugin kind 'widgets'"):
        plugins.registry("widgets")


def test_commands_registry():
    import click

    class Commands:
        @staticmethod
        @hookimpl
        def register_commands(cli):
            @cli.command()
            def hello():
                """Say hello."""

    plugins.register_plugin(Commands)
    commands = plugins.registry("commands")
    assert list(commands) == ["hello"] and isinstance(commands["hello"], click.Command)
    assert plugins.registered_by("commands") == {"hello": "Commands"}


# --------------------------------------------------------------------------- register_plugin


def test_registering_the_same_plugin_name_twice_fails():
    plugins.register_plugin(Alpha, name="p")
    with pytest.raises(PluginError, match="'p' cannot be registered"):
        plugins.register_plugin(Beta, name="p")


def test_misspelt_hook_is_rejected_and_not_kept():
    class Typo:
        @staticmethod
        @hookimpl
        def register_tokenizer(register):  # missing "s"
            register("x", 1)

    with pytest.raises(PluginError, match="'Typo'.*register_tokenizer"):
        plugins.register_plugin(Typo)
    assert not plugins.get_plugin_manager().has_plugin("Typo")


def test_hook_with_unknown_argument_is_rejected():
    class WrongArgs:
        @staticmethod
        @hookimpl
        def register_tokenizers(register, extra):
            pass

    with pytest.raises(PluginError, match="'WrongArgs' does not fit tinylm's hooks"):
        plugins.register_plugin(WrongArgs)


def test_new_plugin_refreshes_cached_registries():
    assert "alpha-bpe" not in plugins.registry("tokenizers")
    plugins.register_plugin(Alpha)
    assert "alpha-bpe" in plugins.registry("tokenizers")


# --------------------------------------------------------------------------- entry points

GOOD_PLUGIN = """
    from tinylm import hookimpl
    from tinylm.tokenizers import CharTokenizer

    class FakeTokenizer(CharTokenizer):
        name = "fake-tok"

    @hookimpl
    def register_tokenizers(register):
        register("fake-tok", FakeTokenizer)
"""


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install a fake distribution (a *.dist-info and a module) on sys.path."""
    modules = []

    def install(dist, ep_name, module, source=GOOD_PLUGIN, version="1.2.3"):
        root = tmp_path / dist
        root.mkdir()
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[tinylm]\n{ep_name} = {module}\n")
        monkeypatch.syspath_prepend(str(root))
        modules.append(module)

    yield install
    for module in modules:
        sys.modules.pop(module, None)


def loaded_names():
    return [name for name, _, _ in plugins.list_plugins()]


def test_entry_point_plugins_load_when_allow_list_is_unset(installed, monkeypatch):
    installed("tinylm-fake", "fake", "tinylm_fake_mod")
    monkeypatch.delenv(plugins.ALLOW_ENV)
    assert ("fake", "1.2.3", {"tokenizers": ["fake-tok"]}) in plugins.list_plugins()
    assert plugins.get_tokenizer_class("fake-tok").__name__ == "FakeTokenizer"


def test_empty_allow_list_loads_no_third_party_plugin(installed):
    installed("tinylm-fake", "fake", "tinylm_fake_mod")
    assert loaded_names() == BUILTINS  # conftest sets TINYLM_LOAD_PLUGINS=""


@pytest.mark.parametrize("allow, loaded", [
    ("fake", True),                   # the entry-point name
    ("TinyLM_Fake", True),            # the distribution name, normalised
    ("something-else, fake ", True),  # a list, with spaces
    ("something-else", False),
    (",", False),
])
def test_allow_list_selects_plugins(installed, monkeypatch, allow, loaded):
    installed("tinylm-fake", "fake", "tinylm_fake_mod")
    monkeypatch.setenv(plugins.ALLOW_ENV, allow)
    assert ("fake" in loaded_names()) is loaded


def test_allow_list_picks_among_several(installed, monkeypatch):
    installed("tinylm-one", "one", "tinylm_one_mod")
    installed("tinylm-two", "two", "tinylm_two_mod", source=GOOD_PLUGIN.replace("fake-tok", "two"))
    monkeypatch.setenv(plugins.ALLOW_ENV, "two")
    assert loaded_names() == BUILTINS + ["two"]


def test_plugin_that_fails_to_import_is_reported_by_name(installed, monkeypatch):
    installed("tinylm-broken", "broken", "tinylm_broken_mod", source="import no_such_module_xyz\n")
    installed("tinylm-fake", "fake", "tinylm_fake_mod")
    monkeypatch.delenv(plugins.ALLOW_ENV)
    with pytest.warns(PluginWarning) as record:
        plugins.get_plugin_manager()
    message = str(record[0].message)
    assert "'broken'" in message and "tinylm-broken 1.2.3" in message
    assert "ModuleNotFoundError: No module named 'no_such_module_xyz'" in message
    assert plugins.ALLOW_ENV in message  # says how to run without it
    # the other plugin and the built-ins work; the broken one is listed, registering nothing
    assert plugins.get_tokenizer_class("fake-tok").__name__ == "FakeTokenizer"
    assert ("broken", "1.2.3", {}) in plugins.list_plugins()
    assert plugins.broken_plugins() == {"broken": [message.replace("; " + plugins.SKIPPED, "")]}
    with pytest.raises(TinyLMError, match="unknown tokenizer 'nope'.* Skipped as broken: 'broken'"):
        plugins.get_tokenizer_class("nope")


def test_entry_point_plugin_clash_names_both(installed, monkeypatch):
    installed("tinylm-fake", "fake", "tinylm_fake_mod")
    monkeypatch.delenv(plugins.ALLOW_ENV)

    class Core:
        @staticmethod
        @hookimpl
        def register_tokenizers(register):
            register("fake-tok", AlphaBPE)

    plugins.register_plugin(Core, name="other")
    with pytest.raises(PluginError, match="'fake-tok' is registered by two plugins, 'fake' and 'other'"):
        plugins.registry("tokenizers")


def test_two_distributions_declaring_one_plugin_name(installed, monkeypatch):
    installed("tinylm-one", "same", "tinylm_one_mod")
    installed("tinylm-two", "same", "tinylm_two_mod")
    monkeypatch.delenv(plugins.ALLOW_ENV)
    with pytest.raises(PluginError, match="'same' is declared by two distributions"):
        plugins.get_plugin_manager()


# --------------------------------------------------------------------------- the tokenizer interface


def _guide_plugin(tmp_path, monkeypatch):
    """The plugin module docs/plugins.md shows (its `tinylm_shout.py` block)."""
    import importlib
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text("utf-8")
    after = guide.split("`tinylm_shout.py`:", 1)[1]
    source = re.search(r"```python\n(.*?)```", after, re.S).group(1)
    (tmp_path / "tinylm_shout.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tinylm_shout", None)
    return importlib.import_module("tinylm_shout")


def test_the_plugin_guides_tokenizer_works(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tinylm.cli import cli
    from tinylm.tokenizers import TokenizerError, from_file

    shout = _guide_plugin(tmp_path, monkeypatch)
    try:
        plugins.register_plugin(shout, name="shout")
        cls = plugins.get_tokenizer_class("shout")
        tok = cls()
        assert tok.encode("hi!") == [72, 73, 33] and tok.decode([72, 73]) == "HI"
        assert tok.decode(tok.encode("héllo")) == "HÉLLO"
        with pytest.raises(TokenizerError, match="not in the vocabulary"):
            tok.decode([300])
        tok.save(tmp_path / "shout.tok")
        assert isinstance(from_file(tmp_path / "shout.tok"), cls)
        runner = CliRunner()
        assert runner.invoke(cli, ["shout", "hello"]).output == "HELLO\n"
        listed = runner.invoke(cli, ["plugins"])
        assert listed.exit_code == 0 and "tokenizers: shout" in listed.output
        train = runner.invoke(cli, ["tokenize", "train", "--type", "shout", "-o",
                                    str(tmp_path / "t.tok")])
        assert train.exit_code == 2 and "Traceback" not in train.output
        assert train.stderr.startswith("Error: 'shout' tokenizers are not trained by tinylm")
        assert "ShoutTokenizer" in train.stderr and train.stderr.count("\n") == 1
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("hello world\n" * 50, encoding="utf-8")
        model = runner.invoke(cli, ["train", "--tokenizer", "shout", "--data", str(corpus),
                                    "--out", str(tmp_path / "run"), "--no-progress"])
        assert model.exit_code == 2 and "Traceback" not in model.output
        error = model.stderr.splitlines()[-1]
        assert error.startswith("Error: 'shout' tokenizers are not trained"), model.stderr
        assert "no train method" in error and model.stderr.count("Error:") == 1
        assert not (tmp_path / "run").exists()
    finally:
        sys.modules.pop("tinylm_shout", None)


class Shout:
    """The old plugin guide's tokenizer: encode and decode, nothing else."""

    def encode(self, text):
        return list(text.upper().encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_tokenizer_lacking_required_methods_is_refused_at_registration():
    class OldGuide:
        @staticmethod
        @hookimpl
        def register_tokenizers(register):
            register("shout", Shout)

    plugins.register_plugin(OldGuide, name="shout-plugin")
    with pytest.warns(PluginWarning):
        assert "shout" not in plugins.registry("tokenizers")
    with pytest.raises(PluginError, match="tokenizer 'shout' is unavailable") as info:
        plugins.get_tokenizer_class("shout")
    message = str(info.value)
    assert "'shout-plugin'" in message and "'shout'" in message and "Shout" in message
    for method in ("decode_bytes", "vocab_size", "token_to_id", "id_to_token", "save", "load"):
        assert method in message.split("lacks", 1)[1].split(";")[0], method
    assert "encode," not in message.split("lacks", 1)[1].split(";")[0]  # it has encode


def test_an_abstract_method_counts_as_missing():
    from tinylm.tokenizers import Tokenizer

    class Half(Tokenizer):
        name = "half"

        def encode(self, text, **kwargs):
            return []

    class Plugin:
        @staticmethod
        @hookimpl
        def register_tokenizers(register):
            register("half", Half)

    plugins.register_plugin(Plugin)
    with pytest.warns(PluginWarning), \
            pytest.raises(PluginError, match=r"Half\), which lacks decode_bytes, vocab_size, "
                                             r"token_to_id, id_to_token, save and load;"):
        plugins.get_tokenizer_class("half")


class NoTrain(Shout):
    """The whole interface but ``train``."""

    vocab_size = 256

    def decode_bytes(self, ids, *, skip_special_tokens=False):
        return bytes(ids)

    def token_to_id(self, token):
        return None

    def id_to_token(self, id):
        return None

    def save(self, path, format=None):
        pass

    @classmethod
    def load(cls, path):
        return cls()


def test_an_optional_method_is_checked_where_it_is_needed(tmp_path):
    from click.testing import CliRunner

    from tinylm.cli import cli

    class Plugin:
        @staticmethod
        @hookimpl
        def register_tokenizers(register):
            register("no-train", NoTrain)

    plugins.register_plugin(Plugin, name="no-train-plugin")
    assert plugins.get_tokenizer_class("no-train") is NoTrain  # the interface is complete
    with pytest.raises(PluginError, match=r"tokenizer 'no-train' \(.*NoTrain, from plugin "
                                          r"'no-train-plugin'\) has no train method, which "
                                          r"my command needs"):
        plugins.get_tokenizer_class("no-train", needs=("train",), purpose="my command")
    result = CliRunner().invoke(cli, ["tokenize", "train", "--type", "no-train", "-o",
                                      str(tmp_path / "x.tok")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "has no train method, which `tinylm tokenize train` needs" in result.stderr


# --------------------------------------------------------------------------- broken plugins


TYPO_PLUGIN = """
    from tinylm import hookimpl

    @hookimpl
    def register_tokenizer(register):  # missing "s"
        register("typo-tok", object)
"""

HALF_BROKEN_PLUGIN = GOOD_PLUGIN + """
    @hookimpl
    def register_objectives(register):
        register("half-lm", object)
        raise KeyError("objective table")
"""


def test_installed_plugin_with_a_misspelt_hook_is_skipped(installed, monkeypatch):
    installed("tinylm-typo", "typo", "tinylm_typo_mod", source=TYPO_PLUGIN)
    installed("tinylm-fake", "fake", "tinylm_fake_mod")
    monkeypatch.delenv(plugins.ALLOW_ENV)
    with pytest.warns(PluginWarning, match=r"plugin 'typo': unknown hook 'register_tokenizer'"):
        pm = plugins.get_plugin_manager()
    assert not pm.has_plugin("typo") and pm.has_plugin("fake")
    assert "fake-tok" in plugins.registry("tokenizers")
    assert list(plugins.broken_plugins()) == ["typo"]


def test_a_hook_that_raises_costs_only_its_own_kind(installed, monkeypatch):
    """The plugin's other hooks still register; what the failing hook registered before
    raising is reported as unavailable, with the reason."""
    installed("tinylm-half", "half", "tinylm_half_mod", source=HALF_BROKEN_PLUGIN)
    monkeypatch.delenv(plugins.ALLOW_ENV)
    assert plugins.get_tokenizer_class("fake-tok").__name__ == "FakeTokenizer"
    with pytest.warns(PluginWarning, match="'half' failed in register_objectives: KeyError"):
        assert "half-lm" not in plugins.registry("objectives")
    with pytest.raises(PluginError, match="objective 'half-lm' is unavailable: plugin 'half' "
                                          "failed in register_objectives"):
        plugins.get_objective("half-lm")
    assert plugins.get_objective("causal-lm")
    assert ("half", "1.2.3", {"tokenizers": ["fake-tok"]}) in plugins.list_plugins()


def test_each_problem_is_warned_about_once(installed, monkeypatch):
    installed("tinylm-broken", "broken", "tinylm_broken_mod", source="raise ImportError('x')\n")
    monkeypatch.delenv(plugins.ALLOW_ENV)
    with pytest.warns(PluginWarning) as record:
        plugins.registry("tokenizers")
        plugins.register_plugin(Alpha)  # refills the registries: no second warning
        plugins.registry("tokenizers")
    assert len(record) == 1


def test_a_broken_builtin_is_a_bug_and_raises(monkeypatch):
    from tinylm.default_plugins import architectures

    def raising(register):
        raise RuntimeError("bug")

    monkeypatch.setattr(architectures.register_architectures, "__code__", raising.__code__)
    with pytest.raises(PluginError, match="'tinylm.default_plugins.architectures' failed"):
        plugins.registry("architectures")


def test_clashes_stay_errors(installed, monkeypatch):
    """Two plugins with one name are never resolved silently, broken or not."""
    installed("tinylm-one", "same", "tinylm_one_mod", source="import no_such_module_xyz\n")
    installed("tinylm-two", "same", "tinylm_two_mod")
    monkeypatch.delenv(plugins.ALLOW_ENV)
    with pytest.raises(PluginError, match="'same' is declared by two distributions"):
        plugins.get_plugin_manager()


def _cli(args, pythonpath, **env):
    """tinylm's console-script path, in a fresh process with ``pythonpath`` first."""
    import os
    import subprocess

    code = f"from tinylm.cli import main; main({args!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), *sys.path]), **env}
    env.pop(plugins.ALLOW_ENV, None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_help_and_commands_work_beside_a_broken_plugin(installed, tmp_path):
    """`tinylm --help` (and any command) runs, with one warning line naming the plugin;
    `tinylm plugins` lists it as broken, says why on stderr and exits 2."""
    installed("tinylm-broken", "broken", "tinylm_broken_mod", source="import no_such_module_xyz\n")
    path = tmp_path / "tinylm-broken"
    result = _cli(["--help"], path)
    assert result.returncode == 0, result.stderr
    assert "Usage: tinylm" in result.stdout and "plugins" in result.stdout
    warning, = result.stderr.splitlines()
    assert warning.startswith("Warning: plugin 'broken' (from tinylm-broken 1.2.3) failed to "
                              "import: ModuleNotFoundError: No module named 'no_such_module_xyz'")
    result = _cli(["info", "llama"], path)  # a command that looks an architecture up
    assert result.returncode == 0 and "parameters" in result.stdout.lower()
    assert result.stderr.startswith("Warning: plugin 'broken'")
    result = _cli(["plugins"], path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(r"^broken +1\.2\.3 +BROKEN: plugin 'broken' \(from", result.stdout, re.M)
    error, = result.stderr.splitlines()
    assert error == warning.replace("Warning:", "Error:").replace("; " + plugins.SKIPPED, "")
    result = _cli(["plugins", "--json"], path)
    record = [r for r in __import__("json").loads(result.stdout) if r["name"] == "broken"]
    assert result.returncode == 2 and record[0]["broken"] == [error[len("Error: "):]]


def test_help_lists_builtins_beside_a_plugin_whose_commands_hook_raises():
    from click.testing import CliRunner

    from tinylm.cli import cli

    class BadCommands:
        @staticmethod
        @hookimpl
        def register_commands(cli):
            raise RuntimeError("no click today")

        @staticmethod
        @hookimpl
        def register_objectives(register):
            register("still-here", "an objective")

    plugins.register_plugin(BadCommands, name="bad-commands")
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "tokenize" in result.stdout
    assert result.stderr == ("Warning: plugin 'bad-commands' failed in register_commands: "
                             f"RuntimeError: no click today; {plugins.SKIPPED}\n")
    assert plugins.get_objective("still-here") == "an objective"
