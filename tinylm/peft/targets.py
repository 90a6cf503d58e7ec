"""Which modules a PEFT method adapts: names in two name spaces, PEFT's matching rules.

A model has two sets of module names:

    tinylm   transformer.blocks.3.attn.qkv        (fused q, k, v rows), mlp.up, lm_head ...
    HF       model.layers.3.self_attn.q_proj      (rows [0, q) of that qkv)
             transformer.h.3.attn.c_attn          (GPT-2: all of qkv, stored transposed)

The HF names come from the family's ``Rule`` table in ``tinylm.models.hf`` (the one
that loads and saves HF checkpoints), so they exist for every gpt2 / llama / bert / t5
model, imported or trained here: a "copy" or "transpose" rule names one HF module for
the whole tinylm module, a "concat" rule one HF module per row slice.

Matching is PEFT's (``check_target_module_exists``): a string is a regex that must
``fullmatch`` the whole name; a list matches a name equal to an entry or ending with
"." + entry. Both name spaces are tried; a match in the HF space on a row slice gives a
``Target`` for that slice only (LoRA on q_proj and v_proj of a Llama: two Targets on
one qkv host). ``"all-linear"`` (PEFT's spelling) is every linear layer but the
output head.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from tinylm.errors import TinyLMError

# PEFT's per-architecture defaults (peft.utils.constants
# TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING), by method and family.
DEFAULT_TARGETS = {
    "lora": {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"],
             "t5": ["q", "v"]},
    "ia3": {"gpt2": ["c_attn", "mlp.c_proj"], "llama": ["k_proj", "v_proj", "down_proj"],
            "bert": ["key", "value", "output.dense"], "t5": ["k", "v", "wo"]},
}
DEFAULT_FEEDFORWARD = {
    "ia3": {"gpt2": ["mlp.c_proj"], "llama": ["down_proj"], "bert": ["output.dense"],
            "t5": ["wo"]},
}

ALL_LINEAR = "all-linear"
_OUTPUT_HEADS = ("lm_head", "head")  # the output layers: left out of "all-linear"


class Target(NamedTuple):
    """One place to adapt: ``host`` (named ``host_name`` in tinylm's names), all of it
    (``rows`` None) or output rows ``rows`` of it; ``hf_name`` the HF module name of
    exactly that (None when HF has no module for it); ``fan_in_fan_out``: HF stores
    the weight as (in, out) (GPT-2's Conv1D)."""

    host_name: str
    host: object
    rows: slice | None
    hf_name: str | None
    fan_in_fan_out: bool


def family_of(model) -> str | None:
    """The HF family ("gpt2", "llama", "bert", "t5") of ``model``, or None."""
    from tinylm.models.hf import HF_FAMILIES

    arch = getattr(getattr(model, "config", None), "architecture", None)
    return arch if arch in HF_FAMILIES else None


def hf_module_names(model) -> dict:
    """{HF module name: (tinylm module name, rows slice | None, fan_in_fan_out)} for
    every module the family's rules map (empty for a model of no HF family).

    Derived from the ``.weight`` rules of ``tinylm.models.hf``: "copy" -> (name, None,
    False), "transpose" -> (name, None, True), "concat" -> one entry per piece with its
    row slice (the pieces in rule order: q, k, v)."""
    from tinylm.models.hf import HF_FAMILIES

    family = family_of(model)
    if family is None:
        return {}
    out = {}
    for rule in HF_FAMILIES[family].rules(model.config):
        if not rule.ours.endswith(".weight"):
            continue
        ours = rule.ours[: -len(".weight")]
        theirs = [t[: -len(".weight")] for t in rule.theirs]
        if rule.op == "concat":
            start = 0
            for name, rows in zip(theirs, rule.sizes):
                out[name] = (ours, slice(start, start + rows), False)
                start += rows
        else:
            out[theirs[0]] = (ours, None, rule.op == "transpose")
    return out


def _kind_classes(kind: str) -> tuple:
    from tinylm import nn
    from tinylm.nn.attention import MultiHeadAttention
    from tinylm.nn.block import TransformerBlock
    from tinylm.nn.mlp import MLP
    from tinylm.quant.layers import QuantEmbedding, QuantLinear, QuantTiedHead

    kinds = {"linear": (nn.Linear, QuantLinear, QuantTiedHead),
             "embedding": (nn.Embedding, QuantEmbedding),
             "attention": (MultiHeadAttention,), "mlp": (MLP,), "block": (TransformerBlock,),
             "any": (object,)}
    if kind not in kinds:
        raise TinyLMError(f"unknown target kind {kind!r}; expected one of {', '.join(kinds)}")
    return kinds[kind]


def candidate_modules(model, kinds=("linear",)) -> dict:
    """{tinylm module name: module} of the modules of ``kinds`` (adapters left out)."""
    classes = tuple(c for k in kinds for c in _kind_classes(k))
    return {name: m for name, m in model.named_modules()
            if name and isinstance(m, classes) and not _inside_peft(name)}


def _inside_peft(name: str) -> bool:
    return name == "peft" or name.startswith("peft.") or ".peft." in name or \
        name.endswith(".peft")


def matches(pattern, name: str) -> bool:
    """PEFT's rule: a str pattern is a regex fullmatch; a list/tuple matches a name equal
    to an entry or ending with "." + entry."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _check_pattern(target_modules):
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise TinyLMError(f"target_modules {target_modules!r} is not a valid regex: {e}") \
                from e
        return target_modules
    if isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules and all(
            isinstance(p, str) and p for p in target_modules):
        return sorted(target_modules) if isinstance(target_modules, (set, frozenset)) \
            else list(target_modules)
    raise TinyLMError(f"target_modules must be a regex string or a non-empty list of module "
                      f"names, got {target_modules!r}")


def resolve(model, target_modules, *, kinds=("linear",), exclude_modules=None) -> list:
    """The ``Target``s of ``model`` that ``target_modules`` names (see the module
    docstring), in module order; several HF row slices of one host come as several
    Targets, a whole-host match as one. A pattern that matches nothing is a
    ``TinyLMError`` listing the names that exist (both name spaces, layer numbers
    folded to ``*``). ``exclude_modules``: PEFT's, the same rules, wins over a match."""
    candidates = candidate_modules(model, kinds)
    hf = {n: v for n, v in hf_module_names(model).items() if v[0] in candidates}
    if target_modules == ALL_LINEAR:
        if "linear" not in kinds:
            raise TinyLMError(f"{ALL_LINEAR!r} selects linear layers; this method adapts "
                              f"{', '.join(kinds)}")
        target_modules = [n for n in candidates if n.partition(".")[0] not in _OUTPUT_HEADS]
        if not target_modules:
            raise TinyLMError("'all-linear' found no linear layer besides the output head")
    pattern = _check_pattern(target_modules)
    excluded = (lambda n: False) if not exclude_modules else (
        lambda n, e=_check_pattern(exclude_modules): matches(e, n))
    whole, slices = {}, {}  # host name -> hf name | None ; host name -> {start: Target}
    hf_whole = {v[0]: (n, v[2]) for n, v in hf.items() if v[1] is None}
    for name in candidates:
        if matches(pattern, name) and not excluded(name):
            hf_name, ff = hf_whole.get(name, (None, False))
            whole[name] = Target(name, candidates[name], None, hf_name, ff)
    for hf_name, (host, rows, ff) in hf.items():
        if not matches(pattern, hf_name) or excluded(hf_name) or excluded(host):
            continue
        if rows is None:
            whole.setdefault(host, Target(host, candidates[host], None, hf_name, ff))
        else:
            slices.setdefault(host, {})[rows.start] = Target(host, candidates[host], rows,
                                                             hf_name, ff)
    both = sorted(set(whole) & set(slices))
    if both:
        raise TinyLMError(f"target_modules selects {both[0]} both whole and by HF row slices "
                          f"({', '.join(t.hf_name for t in slices[both[0]].values())}); "
                          f"name it one way")
    if not whole and not slices:
        shown = target_modules if isinstance(target_modules, str) else list(target_modules)
        raise TinyLMError(f"target_modules {shown!r} matches no "
                          f"{'/'.join(kinds)} module; tinylm names: "
                          f"{_abbreviate(candidates)}; HF names: {_abbreviate(hf) or 'none'}")
    out = []
    for name in candidates:  # module order
        if name in whole:
            out.append(whole[name])
        elif name in slices:
            out.extend(slices[name][s] for s in sorted(slices[name]))
    return out


def _abbreviate(names, limit: int = 12) -> str:
    """The names with layer numbers folded (``blocks.*.attn.qkv``), unique, at most
    ``limit`` of them."""
    folded = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names))
    more = f", ... ({len(folded) - limit} more)" if len(folded) > limit else ""
    return ", ".join(folded[:limit]) + more


def default_targets(model, method: str) -> list:
    """PEFT's default ``target_modules`` for ``method`` on ``model``'s family."""
    return _default(DEFAULT_TARGETS, model, method, "target_modules")


def default_feedforward(model, method: str) -> list:
    """PEFT's default ``feedforward_modules`` (IA3) for ``model``'s family."""
    return _default(DEFAULT_FEEDFORWARD, model, method, "feedforward_modules")


def _default(table, model, method, what) -> list:
    family = family_of(model)
    per_family = table.get(method, {})
    if family not in per_family:
        known = ", ".join(sorted(per_family)) or "none"
        raise TinyLMError(f"{method}: no default {what} for a model of family {family!r} "
                          f"(defaults exist for {known}); give {what}=[...]")
    return list(per_family[family])
