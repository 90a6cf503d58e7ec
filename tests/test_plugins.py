"""The plugin manager: built-ins, registries, entry points, the allow-list, errors."""

import sys
import textwrap

import pytest

from tinylm import hookimpl, plugins
from tinylm.default_plugins import DEFAULT_PLUGINS
from tinylm.errors import PluginError, TinyLMError

CORE = "tinylm.default_plugins.positional"  # the first built-in
BUILTINS = list(DEFAULT_PLUGINS)  # core first, then the other built-in plugin modules


class Alpha:
    @staticmethod
    @hookimpl
    def register_tokenizers(register):
        register("alpha-bpe", "AlphaBPE")
        register("shared", "alpha's")

    @staticmethod
    @hookimpl
    def register_objectives(register):
        register("alpha-lm", "AlphaLM")


class Beta:
    @staticmethod
    @hookimpl
    def register_tokenizers(register):
        register("shared", "beta's")


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
    assert {"alpha-bpe": "AlphaBPE", "shared": "alpha's"}.items() <= found.items()
    assert {name for name, owner in owners.items() if owner == "Alpha"} == {"alpha-bpe", "shared"}
    assert plugins.get_tokenizer_class("alpha-bpe") == "AlphaBPE"
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
            register("lora", 1)
            register("lora", 2)

    plugins.register_plugin(Twice)
    with pytest.raises(PluginError, match="'Twice' registers PEFT method 'lora' twice"):
        plugins.registry("peft_methods")


def test_plugin_that_raises_is_reported_by_name():
    plugins.register_plugin(Raising, name="raising-plugin")
    with pytest.raises(PluginError) as info:
        plugins.get_architecture("gpt2")
    message = str(info.value)
    assert "'raising-plugin'" in message and "config file is missing" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_invalid_name_is_reported():
    class Nameless:
        @staticmethod
        @hookimpl
        def register_positional_encodings(register):
            register("", object)

    plugins.register_plugin(Nameless)
    with pytest.raises(PluginError, match="'Nameless'.*non-empty"):
        plugins.registry("positional_encodings")


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

    @hookimpl
    def register_tokenizers(register):
        register("fake-tok", "FakeTokenizer")
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
    assert plugins.get_tokenizer_class("fake-tok") == "FakeTokenizer"


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
    monkeypatch.delenv(plugins.ALLOW_ENV)
    with pytest.raises(PluginError) as info:
        plugins.get_plugin_manager()
    message = str(info.value)
    assert "'broken'" in message and "tinylm-broken" in message and "no_such_module_xyz" in message
    assert plugins.ALLOW_ENV in message  # says how to run without it


def test_entry_point_plugin_clash_names_both(installed, monkeypatch):
    installed("tinylm-fake", "fake", "tinylm_fake_mod")
    monkeypatch.delenv(plugins.ALLOW_ENV)

    class Core:
        @staticmethod
        @hookimpl
        def register_tokenizers(register):
            register("fake-tok", "Other")

    plugins.register_plugin(Core, name="other")
    with pytest.raises(PluginError, match="'fake-tok' is registered by two plugins, 'fake' and 'other'"):
        plugins.registry("tokenizers")


def test_two_distributions_declaring_one_plugin_name(installed, monkeypatch):
    installed("tinylm-one", "same", "tinylm_one_mod")
    installed("tinylm-two", "same", "tinylm_two_mod")
    monkeypatch.delenv(plugins.ALLOW_ENV)
    with pytest.raises(PluginError, match="'same' is declared by two distributions"):
        plugins.get_plugin_manager()
