"""The PEFT mechanism: adapters attached to host modules, methods as plugins, the
model-level API (apply, switch, disable, merge, report).

An adapter is an ``nn.Module`` attached to the module it adapts (its HOST: a Linear,
an embedding, an attention layer, the model itself). The host keeps its parameters
and their names; its adapters live in a child ``AdapterSet`` named ``peft``, one per
adapter name, so an adapter's parameters are named
``<host>.peft.<adapter name>.<param>`` (``transformer.blocks.0.attn.qkv.peft.default.lora_A``)
and the base model's names never change.

``Module.__call__`` looks for that child (one dict lookup) and, when there is one,
calls ``AdapterSet.run(host, args, kwargs)``: the active adapter, unless it is merged
or the model is inside ``disable_adapters``, may change the inputs (``before``) and the
output (``after``) of ``host.forward``:

    args, kwargs = adapter.before(host, args, kwargs)     # default: unchanged
    y = host.forward(*args, **kwargs)
    y = adapter.after(host, args, kwargs, y)              # default: unchanged

A METHOD (LoRA, IA3, ...) is a ``PeftMethod`` class registered by name through the
``register_peft_methods`` plugin hook; its ``attach(model, config, adapter_name)``
installs adapters (``install(host, adapter)``) and returns the host names. Model-level
state is two plain attributes: ``model.peft_config`` ({adapter name: config}) and
``model.active_adapter`` (the adapter that runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar, NamedTuple

from tinylm.errors import TinyLMError
from tinylm.nn.module import Module

PEFT_CHILD = "peft"  # the host's child that holds its adapters


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Base of method configs: frozen dataclasses validated in ``__post_init__``.
    ``method`` is the registered name (set by ``config_for``). ``aliases`` maps PEFT's
    option names to ours (``lora_alpha`` -> ``alpha``)."""

    method: str = dataclasses.field(default="", kw_only=True)
    aliases: ClassVar[dict] = {}


def _fields(config_class) -> set:
    return {f.name for f in dataclasses.fields(config_class) if f.init} - {"method"}


def _options(config_class, options: dict, method: str) -> dict:
    """``options`` with PEFT's aliases mapped; an unknown one is a TinyLMError listing
    the known."""
    known, aliases = _fields(config_class), getattr(config_class, "aliases", {})
    out = {}
    for key, value in options.items():
        name = aliases.get(key, key)
        if name not in known:
            raise TinyLMError(f"{method} has no option {key!r}; its options: "
                              f"{', '.join(sorted(known | set(aliases)))}")
        if name in out:
            raise TinyLMError(f"{method}: option {name!r} given twice (as {key!r} too)")
        out[name] = value
    return out


def config_for(method: str, **options):
    """The config of registered ``method`` with ``options`` (PEFT's names accepted
    where the config has ``aliases``), validated."""
    cls = method_class(method)
    config = cls.config_class(**_options(cls.config_class, options, method))
    if getattr(config, "method", None) != method:
        object.__setattr__(config, "method", method)  # frozen: set once, here
    return config


def method_class(name: str):
    """The ``PeftMethod`` class registered as ``name`` (unknown: lists the registered)."""
    from tinylm.plugins import get_peft_method

    if not isinstance(name, str):
        raise TinyLMError(f"a PEFT method is a registered name or a config, got "
                          f"{type(name).__name__}")
    return get_peft_method(name)


def _method_name(config) -> str:
    """The registered name of ``config``'s method (its ``method``, else found by class)."""
    from tinylm.plugins import registry

    name = getattr(config, "method", "")
    if name:
        return name
    for n, cls in registry("peft_methods").items():
        if isinstance(config, cls.config_class):
            return n
    raise TinyLMError(f"no registered PEFT method takes a {type(config).__name__}; build it "
                      f"with tinylm.peft.config_for(method, ...)")


# --------------------------------------------------------------------------- adapters


class Adapter(Module):
    """One adapter on one host. ``name``: the adapter name ("default"); ``method``: the
    registered method name. Subclasses override ``before`` / ``after`` (and ``merge`` /
    ``unmerge`` when the method can fold itself into the host's weights)."""

    method: ClassVar[str] = ""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self._merged = False

    def before(self, host, args: tuple, kwargs: dict) -> tuple:
        """(args, kwargs) that ``host.forward`` will be called with."""
        return args, kwargs

    def after(self, host, args: tuple, kwargs: dict, y):
        """The host's output given ``host.forward``'s ``y`` (args: what it was called with)."""
        return y

    @property
    def merged(self) -> bool:
        return self._merged

    def merge(self) -> None:
        raise TinyLMError(f"{self.method or type(self).__name__} adapters cannot be merged "
                          f"into the weights; keep the adapter (or use a method that merges)")

    def unmerge(self) -> None:
        raise TinyLMError(f"{self.method or type(self).__name__} adapters cannot be merged, "
                          f"so there is nothing to unmerge")

    def extra_repr(self) -> str:
        return f"{self.name!r}" + (", merged" if self.merged else "")


class AdapterSet(Module):
    """The ``peft`` child of a host: its adapters by name (children), which one is
    active, whether adapters are disabled (a count: ``disable_adapters`` nests), and
    the order adapters were merged in (unmerged in reverse)."""

    is_adapter_set: ClassVar[bool] = True

    def __init__(self):
        super().__init__()
        self.active = None
        self.disabled = 0
        self.merge_order = []

    def adapters(self) -> dict:
        return dict(self._modules)

    def run(self, host, args: tuple, kwargs: dict):
        """The host's forward with the active adapter around it (see the module docs)."""
        adapter = None if self.disabled else self._modules.get(self.active)
        if adapter is None or adapter.merged:
            return host.forward(*args, **kwargs)
        args, kwargs = adapter.before(host, args, kwargs)
        y = host.forward(*args, **kwargs)
        return adapter.after(host, args, kwargs, y)

    def forward(self, *args, **kwargs):
        raise TinyLMError("an AdapterSet is not called; its host runs it")

    def extra_repr(self) -> str:
        return f"active={self.active!r}" + (", disabled" if self.disabled else "")


def install(host: Module, adapter: Adapter) -> None:
    """Attach ``adapter`` to ``host`` (creating the host's ``peft`` child), in the host's
    train / eval mode."""
    adapters = host._modules.get(PEFT_CHILD)
    if adapters is None:
        if PEFT_CHILD in host.__dict__ or PEFT_CHILD in host._parameters:
            raise TinyLMError(f"{type(host).__name__} has an attribute {PEFT_CHILD!r} already; "
                              f"it cannot host adapters")
        adapters = AdapterSet()
        setattr(host, PEFT_CHILD, adapters)
    elif not getattr(adapters, "is_adapter_set", False):
        raise TinyLMError(f"{type(host).__name__} has a child named {PEFT_CHILD!r} that is "
                          f"not an AdapterSet; it cannot host adapters")
    if adapter.name in adapters._modules:
        raise TinyLMError(f"{type(host).__name__} has an adapter {adapter.name!r} already")
    adapters._modules[adapter.name] = adapter  # not setattr: any name is safe as a key
    adapters.train(host.training)  # a model in eval mode gets adapters in eval mode


def adapter_sets(model) -> list:
    """[(host name, host, AdapterSet)] for every host in ``model``."""
    out = []
    for name, m in model.named_modules():
        s = m._modules.get(PEFT_CHILD)
        if s is not None and getattr(s, "is_adapter_set", False):
            out.append((name, m, s))
    return out


def iter_adapters(model, name: str | None = None) -> list:
    """[(host name, host, adapter)] of adapter ``name`` (None: every adapter)."""
    return [(host_name, host, a) for host_name, host, s in adapter_sets(model)
            for n, a in s._modules.items() if name is None or n == name]


class PeftMethod:
    """Base of method plugins: ``name``, ``config_class`` and ``attach``.

        class MyMethod(PeftMethod):
            name = "mine"
            config_class = MyConfig               # a frozen PeftConfig dataclass
            def attach(self, model, config, adapter_name):
                for t in targets.resolve(model, config.target_modules):
                    install(t.host, MyAdapter(adapter_name, ...))
                return [t.host_name for t in ...]
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = PeftConfig

    def attach(self, model, config, adapter_name: str) -> list:
        """Install the adapters of ``config`` named ``adapter_name``; the host names."""
        raise NotImplementedError

    def trainable_base(self, model, config, hosts: list) -> list:
        """Names of base parameters this config trains too (LoRA's ``bias`` option)."""
        return []


# --------------------------------------------------------------------------- model API


def _with_options(config, options: dict):
    if not options:
        return config
    method = _method_name(config)
    changed = dataclasses.replace(config, **_options(type(config), options, method))
    object.__setattr__(changed, "method", method)
    return changed


def _check_new_name(model, adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise TinyLMError(f"adapter_name must be a non-empty string without '.', got "
                          f"{adapter_name!r}")
    if adapter_name in getattr(model, "peft_config", {}):
        raise TinyLMError(f"the model has an adapter named {adapter_name!r} already; pick "
                          f"another adapter_name (adapters: {', '.join(adapter_names(model))})")


def apply(model, method_or_config, adapter_name: str = "default", **options):
    """Add a PEFT adapter to ``model`` in place and return it.

    ``method_or_config``: a registered method name (options as keywords, PEFT's names
    accepted: ``lora_alpha``) or a config (``config_for``; keywords override fields).
    Every parameter that is not the active adapter's (or chosen by its config, e.g.
    LoRA's ``bias="all"``) is frozen (``requires_grad=False``), so the base's ``.grad``
    stays None. The first adapter becomes active; a later one is added beside it
    (switch with ``set_adapter``), as PEFT's ``add_adapter``."""
    _check_new_name(model, adapter_name)
    if isinstance(method_or_config, str):
        config = config_for(method_or_config, **options)
    else:
        if not dataclasses.is_dataclass(method_or_config):
            raise TinyLMError(f"apply takes a method name or a config, got "
                              f"{type(method_or_config).__name__}")
        config = _with_options(method_or_config, options)
    method = method_class(_method_name(config))()
    try:
        hosts = method.attach(model, config, adapter_name)
    except BaseException:
        _drop(model, adapter_name)
        raise
    configs = dict(getattr(model, "peft_config", {}))
    configs[adapter_name] = config
    object.__setattr__(model, "peft_config", configs)
    if getattr(model, "active_adapter", None) is None:
        object.__setattr__(model, "active_adapter", adapter_name)
    base = set(method.trainable_base(model, config, list(hosts)))
    for name, p in model.named_parameters():
        if not _is_peft_param(name):
            p.requires_grad = name in base
    _refresh(model)
    return model


def _is_peft_param(name: str) -> bool:
    return name.startswith(PEFT_CHILD + ".") or f".{PEFT_CHILD}." in name


def _adapter_of(name: str) -> str:
    """The adapter name in a PEFT parameter name (``...qkv.peft.default.lora_A``)."""
    tail = name[len(PEFT_CHILD) + 1:] if name.startswith(PEFT_CHILD + ".") else \
        name.split(f".{PEFT_CHILD}.", 1)[1]
    return tail.split(".", 1)[0]


def _refresh(model) -> None:
    """Every AdapterSet runs ``model.active_adapter``; only its parameters train."""
    active = getattr(model, "active_adapter", None)
    for _, _, s in adapter_sets(model):
        s.active = active
    for name, p in model.named_parameters():
        if _is_peft_param(name):
            p.requires_grad = _adapter_of(name) == active


def _require(model, name: str | None) -> str:
    names = adapter_names(model)
    if not names:
        raise TinyLMError("the model has no adapters; add one with tinylm.peft.apply(model, ...)")
    name = model.active_adapter if name is None else name
    if name not in names:
        raise TinyLMError(f"no adapter named {name!r}; the model has {', '.join(names)}")
    return name


def adapter_names(model) -> list:
    """The model's adapter names, in the order they were added."""
    return list(getattr(model, "peft_config", {}))


def set_adapter(model, name: str) -> None:
    """Make adapter ``name`` the one that runs (and trains)."""
    object.__setattr__(model, "active_adapter", _require(model, name))
    _refresh(model)


@contextlib.contextmanager
def disable_adapters(model):
    """Run the base model: no adapter runs inside (nests; restored on exceptions).
    Merged adapters are in the weights: unmerge first."""
    sets = [s for _, _, s in adapter_sets(model)]
    merged = sorted({n for s in sets for n in s.merge_order})
    if merged:
        raise TinyLMError(f"adapter(s) {', '.join(merged)} are merged into the weights; call "
                          f"tinylm.peft.unmerge(model) before disable_adapters")
    for s in sets:
        s.disabled += 1
    try:
        yield model
    finally:
        for s in sets:
            s.disabled -= 1


def merge(model, name: str | None = None) -> None:
    """Fold adapter ``name`` (default: the active one) into its hosts' weights: the
    forward gives the same output and pays nothing for it. All or nothing: a host that
    cannot merge undoes the others."""
    name = _require(model, name)
    done = []
    try:
        for _, _, s in adapter_sets(model):
            a = s._modules.get(name)
            if a is not None and not a.merged:
                a.merge()
                s.merge_order.append(name)
                done.append((s, a))
    except BaseException:
        for s, a in reversed(done):
            a.unmerge()
            s.merge_order.remove(name)
        raise


def unmerge(model) -> None:
    """Take every merged adapter out of the weights again (the weights are restored
    exactly, as they were before ``merge``)."""
    for _, _, s in adapter_sets(model):
        while s.merge_order:
            s._modules[s.merge_order.pop()].unmerge()


def merge_and_unload(model):
    """Merge the active adapter, then remove every adapter: a plain model (every
    parameter trainable again) with the adapted weights. Returns it."""
    merge(model)
    for _, host, s in adapter_sets(model):
        for a in s._modules.values():
            if hasattr(a, "forget_merge"):
                a.forget_merge()
        del host._modules[PEFT_CHILD]
    for attr in ("peft_config", "active_adapter"):
        if attr in model.__dict__:
            object.__delattr__(model, attr)
    model.requires_grad_(True)
    return model


def delete_adapter(model, name: str) -> None:
    """Remove adapter ``name`` (unmerged first if merged); the next one becomes active
    when it was."""
    name = _require(model, name)
    _drop(model, name)
    configs = dict(model.peft_config)
    del configs[name]
    object.__setattr__(model, "peft_config", configs)
    if model.active_adapter == name:
        object.__setattr__(model, "active_adapter", next(iter(configs), None))
    _refresh(model)


def _drop(model, name: str) -> None:
    """Remove every adapter ``name`` from its host (used when attach fails half-way)."""
    for _, host, s in adapter_sets(model):
        if name in s._modules:
            while name in s.merge_order:  # unmerge down to (and including) this one
                s._modules[s.merge_order.pop()].unmerge()
            del s._modules[name]
        if not s._modules:
            del host._modules[PEFT_CHILD]


def adapter_state_dict(model, name: str | None = None) -> dict:
    """{tinylm parameter name: array} of adapter ``name`` (default: the active one):
    its own parameters and the base parameters its config trains (LoRA's bias)."""
    name = _require(model, name)
    config = model.peft_config[name]
    method = method_class(_method_name(config))()
    hosts = [h for h, _, _ in iter_adapters(model, name)]
    base = set(method.trainable_base(model, config, hosts))
    return {n: p.data for n, p in model.named_parameters()
            if (_is_peft_param(n) and _adapter_of(n) == name) or n in base}


class TrainableReport(NamedTuple):
    trainable: int
    total: int
    percent: float

    def __str__(self) -> str:  # PEFT's print_trainable_parameters line
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.percent:.4f}")


def trainable_parameters(model) -> TrainableReport:
    """How many numbers train, of how many (tied weights once; a quantized layer's
    packed weight counts its out x in elements, as PEFT counts 4-bit weights)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.size
        trainable += p.size if p.requires_grad else 0
    for m in model.modules():
        if "qweight" in m._buffers and hasattr(m, "weight_shape"):
            total += int(m.weight_shape[0]) * int(m.weight_shape[1])
    return TrainableReport(trainable, total, 100.0 * trainable / total if total else 0.0)
