"""The plugin manager and the registries filled through the hooks.

Plugins come from two places, loaded in this order the first time anything is looked
up by name:

1. the built-ins, the modules listed in ``tinylm.default_plugins`` (registered
   directly, under their module names);
2. installed packages that declare an entry point in the ``tinylm`` group, filtered
   by the ``TINYLM_LOAD_PLUGINS`` allow-list: unset loads them all, a comma-separated
   list loads only those (entry-point or distribution names), an empty string loads
   none.

Each registry maps a name to what a plugin registered under it, and remembers which
plugin that was, so that a name registered twice is an error naming both plugins:

    >>> registry("tokenizers")          # doctest: +SKIP
    {'bpe': <class 'tinylm.tokenizers.bpe.BPETokenizer'>, ...}
    >>> get_tokenizer_class("bpe")      # doctest: +SKIP

A broken installed plugin does not stop tinylm: one that fails to import, implements a
hook it does not fit (a misspelt hook name, an unknown argument), raises inside a hook or
registers something unusable (a tokenizer class lacking the interface) is *skipped*
with a ``PluginWarning`` that names it and says why; everything else keeps working.
``broken_plugins()`` lists what was skipped (``tinylm plugins`` prints it and exits 2),
and looking up a name a skipped plugin provided is a ``PluginError`` with the reason.
Conflicts are errors, never resolved silently: a name registered by two plugins, or an
entry-point name declared by two distributions. ``register_plugin`` (explicit, for
tests and programmatic use) refuses a plugin that does not fit the hooks outright.
Plugin authors who want failures loud in their tests turn the warning into an error:
``-W error::tinylm.plugins.PluginWarning``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
import warnings

import pluggy

from tinylm import hookspecs
from tinylm.default_plugins import DEFAULT_PLUGINS
from tinylm.errors import PluginError, TinyLMError

GROUP = "tinylm"  # the entry-point group third-party plugins declare
ALLOW_ENV = "TINYLM_LOAD_PLUGINS"

# registry kind -> the hook that fills it
KINDS = {
    "tokenizers": "register_tokenizers",
    "positional_encodings": "register_positional_encodings",
    "objectives": "register_objectives",
    "peft_methods": "register_peft_methods",
    "architectures": "register_architectures",
    "reward_functions": "register_reward_functions",
    "commands": "register_commands",
}
_LABELS = {  # kind -> what one thing of that kind is called in messages
    "tokenizers": "tokenizer",
    "positional_encodings": "positional encoding",
    "objectives": "objective",
    "peft_methods": "PEFT method",
    "architectures": "architecture",
    "reward_functions": "reward function",
    "commands": "command",
}

# What tinylm calls on every registered tokenizer class (docs/plugins.md, "The
# tokenizer interface"); checked when the registry is filled. ``train`` is optional:
# only the commands that train a tokenizer need it (``get_tokenizer_class(needs=)``).
TOKENIZER_INTERFACE = ("encode", "decode", "decode_bytes", "vocab_size", "token_to_id",
                       "id_to_token", "save", "load")

SKIPPED = f"skipped: fix or uninstall it, or leave it out of {ALLOW_ENV}"  # warnings' tail
_SKIP_HINT = f"to run without it, list the plugins you want in {ALLOW_ENV} (empty for none)"


class PluginWarning(UserWarning):
    """A plugin that is broken and skipped: the message names it and says why."""


_pm: pluggy.PluginManager | None = None
_versions: dict = {}  # plugin name -> version string, or None when unknown
_registries: dict = {}  # kind -> {name: obj}
_owners: dict = {}  # kind -> {name: plugin name}
_broken: dict = {}  # plugin name -> [why it was (partly) skipped, one line each]
_skipped: dict = {}  # kind -> {name a broken plugin tried to register: why it is not there}


# --------------------------------------------------------------------------- manager


def get_plugin_manager() -> pluggy.PluginManager:
    """The process's plugin manager: built-ins, then allowed entry-point plugins."""
    global _pm
    if _pm is None:
        from tinylm.version import __version__

        pm = pluggy.PluginManager(GROUP)
        pm.add_hookspecs(hookspecs)
        versions = {}
        for module_name in DEFAULT_PLUGINS:
            _register(pm, _import(module_name, "built-in plugin"), module_name)
            versions[module_name] = __version__
        _load_entry_points(pm, versions)
        _drop_unfit(pm)
        _pm = pm
        _versions.update(versions)
    return _pm


def register_plugin(plugin, name: str | None = None) -> str:
    """Register a module or object with ``@hookimpl`` functions; returns its name.

    For tests and programmatic use; installed packages use the entry-point group.
    """
    pm = get_plugin_manager()
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    _register(pm, plugin, name)
    try:
        _check_pending(pm)
    except PluginError:
        pm.unregister(name=name)
        raise
    _versions[name] = None
    for table in (_registries, _owners, _skipped):
        table.clear()
    return name


def reset() -> None:
    """Forget the manager and every registry (the next lookup loads plugins afresh)."""
    global _pm
    _pm = None
    for table in (_versions, _registries, _owners, _broken, _skipped):
        table.clear()


def broken_plugins() -> dict:
    """``{plugin name: [reasons]}``: the plugins skipped wholly or in part because they
    are broken (see the module docstring). Fills every registry first, so that a hook
    that raises is found; the rest of tinylm works without them."""
    get_plugin_manager()
    for kind in KINDS:
        registry(kind)
    return {name: list(reasons) for name, reasons in _broken.items()}


def _quarantine(plugin: str, why: str, kind: str | None = None, names=()) -> None:
    """Record that ``plugin`` is skipped (for ``kind``, or wholly) and warn once."""
    for name in names:
        _skipped.setdefault(kind, {})[name] = why
    reasons = _broken.setdefault(plugin, [])
    if why not in reasons:
        reasons.append(why)
        warnings.warn(f"{why}; {SKIPPED}", PluginWarning, stacklevel=3)


def _import(module_name: str, what: str):
    try:
        return importlib.import_module(module_name)
    except Exception as e:
        raise PluginError(f"{what} {module_name!r} failed to import: {type(e).__name__}: {e}") from e


def _register(pm: pluggy.PluginManager, plugin, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {name!r} does not fit tinylm's hooks: {e}") from e
    except ValueError as e:  # the name, or the same object, is registered already
        raise PluginError(f"plugin {name!r} cannot be registered: {e}") from e


def _check_pending(pm: pluggy.PluginManager) -> None:
    """Reject hook implementations whose name matches no hook (a typo, usually)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        name = pm.get_name(e.plugin) or repr(e.plugin)
        raise PluginError(f"plugin {name!r}: {e}; the hooks are in tinylm/hookspecs.py") from e


def _drop_unfit(pm: pluggy.PluginManager) -> None:
    """Unregister and skip each installed plugin with a hook name matching no hook; a
    built-in one is a bug in tinylm and raises."""
    while True:
        try:
            return _check_pending(pm)
        except PluginError as e:
            plugin = e.__cause__.plugin
            name = pm.get_name(plugin)
            if name in DEFAULT_PLUGINS:
                raise
            pm.unregister(plugin)
            _quarantine(name, _one_line(e))


def _one_line(error) -> str:
    return " ".join(str(error).split())


# --------------------------------------------------------------------------- entry points


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _allow_list() -> set | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {_normalize(n) for n in raw.split(",") if n.strip()}


def _entry_points():
    """(entry point, distribution name, version) for every entry point in the group."""
    for dist in importlib.metadata.distributions():
        eps = [ep for ep in dist.entry_points if ep.group == GROUP]
        if eps:
            dist_name = dist.metadata.get("Name") or "unknown distribution"
            for ep in eps:
                yield ep, dist_name, dist.version


def _load_entry_points(pm: pluggy.PluginManager, versions: dict) -> None:
    """Like ``pm.load_setuptools_entrypoints(GROUP)``, with the allow-list and with
    failures reported by plugin name."""
    allowed = _allow_list()
    if allowed == set():
        return
    sources = {}  # plugin name -> distribution that declared it
    for ep, dist_name, version in _entry_points():
        if allowed is not None and not {_normalize(ep.name), _normalize(dist_name)} & allowed:
            continue
        if ep.name in sources:
            if _normalize(sources[ep.name]) == _normalize(dist_name):
                continue  # the same distribution, found twice on sys.path
            raise PluginError(
                f"plugin name {ep.name!r} is declared by two distributions, "
                f"{sources[ep.name]!r} and {dist_name!r}; uninstall one, or {_SKIP_HINT}"
            )
        if pm.has_plugin(ep.name):
            raise PluginError(
                f"plugin {ep.name!r} from {dist_name!r} has the name of a built-in plugin; "
                f"rename its entry point"
            )
        sources[ep.name] = dist_name
        versions[ep.name] = version
        try:
            plugin = ep.load()
        except Exception as e:
            _quarantine(ep.name, _one_line(f"plugin {ep.name!r} (from {dist_name} {version}) "
                                           f"failed to import: {type(e).__name__}: {e}"))
            continue
        try:
            _register(pm, plugin, ep.name)
        except PluginError as e:
            _quarantine(ep.name, _one_line(e))


# --------------------------------------------------------------------------- registries


def registry(kind: str) -> dict:
    """``{name: obj}`` of everything registered for ``kind`` (a key of ``KINDS``)."""
    if kind not in KINDS:
        raise TinyLMError(f"unknown plugin kind {kind!r}; expected one of: {', '.join(KINDS)}")
    if kind not in _registries:
        _registries[kind], _owners[kind] = _collect(kind)
    return dict(_registries[kind])


def registered_by(kind: str) -> dict:
    """``{name: plugin name}``: which plugin registered each name of ``kind``."""
    registry(kind)
    return dict(_owners[kind])


def _collect(kind: str) -> tuple:
    """Call each plugin's hook for ``kind`` on its own, recording who registered what.

    A plugin whose hook raises (or registers a bad name) is skipped for this kind, with
    what it registered before failing; a tokenizer class lacking the interface is
    skipped alone. A name that two plugins register is an error naming both."""
    what = _LABELS[kind]
    found, owners = {}, {}
    for impl in getattr(get_plugin_manager().hook, KINDS[kind]).get_hookimpls():
        plugin = impl.plugin_name
        mine, unusable = {}, {}
        try:
            _run_hook(impl, kind, mine, unusable)
        except PluginError as e:
            if plugin in DEFAULT_PLUGINS:
                raise
            _quarantine(plugin, _one_line(e), kind, list(mine) + list(unusable))
            continue
        for name, why in unusable.items():
            _quarantine(plugin, why, kind, [name])
        for name, obj in mine.items():
            if name in owners:
                first = owners[name]
                fix = (f"uninstall {plugin!r} or leave it out of {ALLOW_ENV}"
                       if first in DEFAULT_PLUGINS else
                       f"uninstall one of them or leave one out of {ALLOW_ENV}")
                raise PluginError(f"{what} {name!r} is registered by two plugins, "
                                  f"{first!r} and {plugin!r}; {fix}")
            found[name], owners[name] = obj, plugin
    return found, owners


def _run_hook(impl, kind: str, mine: dict, unusable: dict) -> None:
    """One plugin's hook for ``kind``: fills ``mine`` {name: obj} and ``unusable``
    {name: why} (tokenizer classes lacking the interface)."""
    plugin, what = impl.plugin_name, _LABELS[kind]

    def register(name, obj):
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {what} under {name!r}; "
                              f"names are non-empty strings")
        if name in mine or name in unusable:
            raise PluginError(f"plugin {plugin!r} registers {what} {name!r} twice")
        missing = _missing(obj, TOKENIZER_INTERFACE) if kind == "tokenizers" else ()
        if missing:
            unusable[name] = (
                f"plugin {plugin!r} registers tokenizer {name!r} ({_describe(obj)}), "
                f"which lacks {_listed(missing)}; a tokenizer class needs "
                f"{', '.join(TOKENIZER_INTERFACE)} (subclass tinylm.tokenizers."
                f"Tokenizer for decode and the helpers; see docs/plugins.md)")
        else:
            mine[name] = obj

    if kind == "commands":
        import click

        group = click.Group("tinylm")
        _call(impl, KINDS[kind], {"cli": group})
        for name, command in group.commands.items():
            register(name, command)
    else:
        _call(impl, KINDS[kind], {"register": register})


def _call(impl, hook_name: str, kwargs: dict) -> None:
    """Run one plugin's implementation of a hook, naming the plugin if it fails."""
    if impl.hookwrapper or getattr(impl, "wrapper", False):
        raise PluginError(f"plugin {impl.plugin_name!r} implements {hook_name} as a wrapper; "
                          f"registration hooks take plain implementations")
    try:
        impl.function(*[kwargs[arg] for arg in impl.argnames])
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(
            f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(e).__name__}: {e}"
        ) from e


def list_plugins() -> list:
    """``[(plugin name, version or None, {kind: [names]})]`` in loading order; plugins
    skipped wholly (one that failed to import, say) come last, registering nothing
    (``broken_plugins()`` says why)."""
    pm = get_plugin_manager()
    registers = {name: {} for name, _ in pm.list_name_plugin()}
    for kind in KINDS:
        for name, plugin in sorted(registered_by(kind).items()):
            registers[plugin].setdefault(kind, []).append(name)
    for name in _broken:
        registers.setdefault(name, {})
    return [(name, _versions.get(name), registers[name]) for name in registers]


# --------------------------------------------------------------------------- lookups


def _lookup(kind: str, name: str):
    found = registry(kind)
    if name in found:
        return found[name]
    if name in _skipped.get(kind, {}):
        raise PluginError(f"{_LABELS[kind]} {name!r} is unavailable: {_skipped[kind][name]}")
    close = difflib.get_close_matches(str(name), list(found), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    available = ", ".join(sorted(found)) or "none"
    broken = (f" Skipped as broken: {', '.join(map(repr, _broken))}." if _broken else "")
    raise TinyLMError(f"unknown {_LABELS[kind]} {name!r}; available: {available}.{hint}"
                      f"{broken} Plugins can add more: see `tinylm plugins`.")


def get_tokenizer_class(name: str, *, needs=(), purpose: str | None = None):
    """The tokenizer class registered as ``name``. ``needs``: methods beyond the
    interface every tokenizer has (``TOKENIZER_INTERFACE``) that the caller will use,
    e.g. ``("train",)``; a class without one is a ``PluginError`` naming the class, its
    plugin and ``purpose`` (what needs the method)."""
    cls = _lookup("tokenizers", name)
    missing = _missing(cls, needs)
    if missing:
        owner = registered_by("tokenizers").get(name)
        raise PluginError(
            f"tokenizer {name!r} ({_describe(cls)}, from plugin {owner!r}) has no "
            f"{_listed(missing)} method, which {purpose or 'this'} needs; use a tokenizer "
            f"that has it, or add it to the plugin (see docs/plugins.md)")
    return cls


def _missing(obj, names) -> list:
    """The attributes of ``names`` that ``obj`` lacks or leaves abstract."""
    abstract = getattr(obj, "__abstractmethods__", ())
    return [n for n in names if n in abstract or getattr(obj, n, None) is None]


def _describe(obj) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return repr(obj)


def _listed(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def get_positional(name: str):
    return _lookup("positional_encodings", name)


def get_objective(name: str):
    return _lookup("objectives", name)


def get_peft_method(name: str):
    return _lookup("peft_methods", name)


def get_architecture(name: str):
    return _lookup("architectures", name)


def get_reward_function(name: str):
    """The reward function registered as ``name`` (``register_reward_functions``); a
    registered object that is not callable is a ``PluginError`` naming its plugin."""
    fn = _lookup("reward_functions", name)
    if not callable(fn):
        owner = registered_by("reward_functions").get(name)
        raise PluginError(f"plugin {owner!r} registers reward function {name!r} as "
                          f"{_describe(fn)}, which is not callable; register a function "
                          f"f(prompts, completions, **fields) -> list[float]")
    return fn
