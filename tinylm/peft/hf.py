"""Hugging Face PEFT adapter folders, both ways: ``save_adapter`` / ``load_adapter``.

    peft.save_adapter(model, "out/adapter", base="path/or/hub-id/of/the/base")
    peft.load_adapter(model, "some/peft/adapter")    # LoRA, DoRA, IA3, prompt, prefix

A folder holds ``adapter_config.json`` (PEFT's ``PeftConfig`` fields: ``peft_type``,
``r``, ``lora_alpha``, ``target_modules`` ...) and ``adapter_model.safetensors``, whose
keys are PEFT's: the adapted module's Hugging Face name under ``base_model.model.``
with the adapter name dropped,

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight      (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight      (rows, r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector   (rows,)  DoRA
    base_model.model.model.layers.0.mlp.down_proj.ia3_l                 (1, in) or (out, 1)
    prompt_embeddings             (P, d) prompt tuning; (P, 2 L kv) prefix tuning

so ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads what tinylm saved and
tinylm loads what PEFT saved. The module names come from the family's ``Rule`` table
(``tinylm.peft.targets.hf_module_names``): tinylm's fused ``attn.qkv`` is HF's
``q_proj`` / ``k_proj`` / ``v_proj`` row slices (Llama, BERT, T5) or GPT-2's whole
``c_attn``. A LoRA on the whole fused qkv of a Llama saves as three HF LoRAs that
share A and split B (and DoRA's magnitude) by rows: exactly the same update. GPT-2's
Conv1D keeps PEFT's LoRA shapes (A (r, in), B (out, r)); only ``fan_in_fan_out`` says
that HF stores its weight transposed.

An adapter that Hugging Face PEFT cannot express (bottleneck adapters, a model of no
HF family, a host with no HF module) is saved in the same folder shape
with tinylm's names (``peft_type`` "TINYLM", the method and its options under
``tinylm_method`` / ``tinylm_config``, parameter names without the adapter name):
tinylm loads it back, PEFT refuses it.

Loading checks everything (files, peft_type, options, every tensor's module and
shape) before the adapter is attached, and a failure after attaching detaches it
again, so a bad folder leaves the model as it was. Every error is one line.

A PLUGIN method (``register_peft_methods``) gets PEFT's format the same way by giving
its ``PeftMethod`` class three attributes (docs/peft.md, "PEFT's file format for a
plugin method"); without them its adapters are saved as tinylm folders:

    peft_type = "VERA"                              # PEFT's name for the method
    def to_peft_state(self, model, adapter_name, config) -> (fields, tensors)
        # adapter_config.json fields (peft_type, task_type, base_model_name_or_path,
        # revision, inference_mode are filled in) and {PEFT tensor name: array};
        # raise NoPeftForm("why") when this adapter has no PEFT form
    def from_peft_state(self, model, fields, tensors, adapter_name, path) -> (config, state)
        # the method's config and {tinylm name: array}: the adapter's parameters and,
        # optionally, its persistent buffers (state_dict names, adapter name included)

``PREFIX``, ``target_names`` and ``NoPeftForm`` are the helpers such a method uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from tinylm import backend, checkpoint
from tinylm.atomic import write_atomic
from tinylm.errors import CheckpointError, TinyLMError
from tinylm.peft import base as peft_base
from tinylm.peft.targets import family_of, hf_module_names, matches

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> its tuner (base_model) -> the HF model (model)
TINYLM_TYPE = "TINYLM"  # peft_type of an adapter only tinylm reads


class NoPeftForm(Exception):
    """This adapter has no Hugging Face PEFT form (the reason is the message): a
    method's ``to_peft_state`` raises it, and ``save_adapter`` then writes a tinylm
    folder instead."""


_NoHF = NoPeftForm


# --------------------------------------------------------------------------- names


def hf_modules(model) -> dict:
    """{HF module name: (tinylm host name, rows slice | None, fan_in_fan_out)}: the
    family's rule table, plus a tied ``lm_head`` (HF has the module; the table has no
    rule for a weight it does not store)."""
    out = dict(hf_module_names(model))
    if out and "lm_head" not in out and hasattr(model, "lm_head"):
        out["lm_head"] = ("lm_head", None, False)
    return out


def _hf_params(model) -> dict:
    """{HF tensor name: (tinylm parameter name, rows slice | None, transposed)} of every
    base parameter: "concat" rules by rows, "transpose" (GPT-2's Conv1D) transposed; a
    tied ``lm_head.weight`` is the embedding."""
    from tinylm.models.hf import HF_FAMILIES

    family = family_of(model)
    out = {}
    if family is None:
        return out
    rules = HF_FAMILIES[family].rules(model.config)
    for rule in rules:
        if rule.op == "concat":
            starts = np.cumsum((0,) + tuple(rule.sizes))
            for name, a, b in zip(rule.theirs, starts[:-1], starts[1:]):
                out[name] = (rule.ours, slice(int(a), int(b)), False)
        else:
            out[rule.theirs[0]] = (rule.ours, None, rule.op == "transpose")
    if "lm_head.weight" not in out and hasattr(model, "lm_head"):
        out["lm_head.weight"] = ("lm_head.weight", None, False)
    return out


def _base_value(model, entry) -> np.ndarray:
    """The HF layout of one base parameter (``entry`` from ``_hf_params``)."""
    ours, rows, transposed = entry
    a = _numpy(model.state_dict()[ours])  # a tied weight under each of its names
    a = a if rows is None else a[rows]
    return a.T if transposed else a


def _universe(modules: dict) -> set:
    """Every HF module name a pattern could hit: the adaptable ones and their parents
    (``model.layers.0.self_attn``), the names PEFT's matcher walks too."""
    names = set()
    for n in modules:
        parts = n.split(".")
        names.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return names


def _shortest_names(chosen, universe, rule=matches) -> list:
    """The shortest name suffixes (the last k dotted parts, one k for all) that select
    exactly ``chosen`` out of ``universe`` under ``rule`` (PEFT's list matching):
    ``["q_proj", "v_proj"]`` where that is exact, longer names where it is not."""
    chosen = list(dict.fromkeys(chosen))
    depth = max(n.count(".") + 1 for n in chosen)
    for k in range(1, depth + 1):
        names = sorted({".".join(n.split(".")[-k:]) for n in chosen})
        if any(n.partition(".")[0].isdigit() for n in names):
            continue  # "1.mlp.c_fc" would do, "h.1.mlp.c_fc" reads better
        if {u for u in universe if rule(names, u)} == set(chosen):
            return names
    return sorted(chosen)


def target_names(model, hf_names) -> list:
    """The ``target_modules`` list that PEFT's matcher (names equal to an entry or
    ending with "." + entry) reads back as exactly the HF modules ``hf_names`` of
    ``model``: the shortest suffixes that do (``["q_proj", "v_proj"]``), longer where
    they would catch more. For a plugin's ``to_peft_state``."""
    return _shortest_names(list(hf_names), _universe(hf_modules(model)))


def _task_type(model):
    kind = getattr(model, "kind", None)
    return {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}.get(kind)


def _numpy(a) -> np.ndarray:
    return np.ascontiguousarray(backend.to_numpy(a))


# --------------------------------------------------------------------------- save


def save_adapter(model, path, name: str | None = None, base: str | None = None) -> str:
    """Write adapter ``name`` (default: the active one) of ``model`` as a PEFT folder
    at ``path`` (created; files replaced atomically): ``adapter_config.json`` and
    ``adapter_model.safetensors``. ``base``: the base model's folder or hub id, kept
    as ``base_model_name_or_path`` (what ``AutoPeftModel`` loads the base from).
    Returns "hf" when PEFT can read the folder, "tinylm" when only tinylm can (the
    method or a host has no Hugging Face form: see the module docstring)."""
    name = peft_base._require(model, name)
    config = model.peft_config[name]
    export = _exporter(config.method)
    try:
        if export is None:
            raise _NoHF(f"Hugging Face PEFT has no {config.method!r} method")
        if family_of(model) is None:
            raise _NoHF(f"{type(model).__name__} is of no Hugging Face family")
        fields, tensors = export(model, name, config)
        kind = "hf"
    except _NoHF as why:
        fields, tensors = _export_tinylm(model, name, config, str(why))
        kind = "tinylm"
    fields = {"peft_type": fields.pop("peft_type"), "task_type": _task_type(model),
              "base_model_name_or_path": base, "revision": None, "inference_mode": True,
              **fields}
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file; save_adapter writes a folder: pick a "
                              f"folder path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {path}: {e.strerror or e}") from None
    checkpoint.save_file(tensors, os.path.join(path, WEIGHTS),
                         metadata={"format": "pt" if kind == "hf" else "tinylm"})
    write_atomic(os.path.join(path, CONFIG), json.dumps(fields, indent=2, sort_keys=True) + "\n",
                 error=CheckpointError)
    return kind


def _lora_parts(piece, host_name, by_host) -> list:
    """[(HF module, rows of the piece's B)] a LoRA piece saves as: its own HF module,
    the host's one module, or (a whole fused qkv) one per HF row slice."""
    if piece.rows is not None:
        return [(piece.target.hf_name, None)]
    entries = by_host.get(host_name)
    if not entries:
        raise _NoHF(f"{host_name} has no Hugging Face module")
    if entries[0][1] is None:
        return [(entries[0][0], None)]
    return [(hf, rows) for hf, rows in entries]


def _export_lora(model, name, config):
    """PEFT's LoraConfig fields and tensors of a LoRA / rsLoRA / DoRA adapter."""
    modules = hf_modules(model)
    by_host: dict = {}
    for hf, (host, rows, _) in modules.items():
        by_host.setdefault(host, []).append((hf, rows))
    tensors, ranks, alphas, fan_in_fan_out = {}, {}, {}, False
    for host_name, _, adapter in peft_base.iter_adapters(model, name):
        for piece in adapter.pieces:
            h = piece.holder
            a, b = _numpy(h.lora_A.data), _numpy(h.lora_B.data)
            m = _numpy(h.lora_magnitude.data) if config.use_dora else None
            for hf, rows in _lora_parts(piece, host_name, by_host):
                key = PREFIX + hf
                tensors[key + ".lora_A.weight"] = a
                tensors[key + ".lora_B.weight"] = b if rows is None else b[rows]
                if m is not None:
                    tensors[key + ".lora_magnitude_vector"] = m if rows is None else m[rows]
                ranks[hf], alphas[hf] = piece.r, piece.alpha
                fan_in_fan_out |= bool(piece.fan_in_fan_out)
    tensors.update(_export_biases(model, name, config, set(ranks)))
    targets = list(ranks)
    fields = {
        "peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha,
        "target_modules": _shortest_names(targets, _universe(modules)),
        "rank_pattern": _pattern_for(config.rank_pattern, ranks, config.r),
        "alpha_pattern": _pattern_for(config.alpha_pattern, alphas, config.alpha),
        "lora_dropout": config.dropout, "bias": config.bias, "use_rslora": config.use_rslora,
        "use_dora": config.use_dora, "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True, "lora_bias": False, "modules_to_save": None,
        "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
    }
    return fields, tensors


def _pattern_for(pattern: dict, values: dict, default) -> dict:
    """A rank/alpha pattern PEFT reads back as ``values`` ({HF module: value}): the
    config's own when PEFT's rule on the HF names gives the same, else one exact
    entry per module whose value is not ``default``."""
    from tinylm.peft.lora import pattern_value

    if all(pattern_value(pattern, [hf], default) == v for hf, v in values.items()):
        return dict(pattern)
    return {re.escape(hf): v for hf, v in values.items() if v != default}


def _export_biases(model, name, config, adapted: set) -> dict:
    """The base biases LoRA's ``bias`` option trains, under their HF tensor names (a
    fused qkv bias split into q/k/v), as PEFT's state dict has them: an ``adapted``
    module's under ``base_layer`` (the layer PEFT wraps)."""
    if getattr(config, "bias", "none") == "none":
        return {}
    by_ours: dict = {}
    for hf, (ours, rows, _) in _hf_params(model).items():
        by_ours.setdefault(ours, []).append((hf, rows))
    out = {}
    for n, a in peft_base.adapter_state_dict(model, name).items():
        if peft_base._is_peft_param(n):
            continue
        if n not in by_ours:
            raise _NoHF(f"the trained bias {n} has no Hugging Face tensor")
        for hf, rows in by_ours[n]:
            module, _, param = hf.rpartition(".")
            key = f"{module}.base_layer.{param}" if module in adapted else hf
            out[PREFIX + key] = _numpy(a if rows is None else a[rows])
    return out


def _strip_adapter_name(param: str, name: str) -> str:
    """``...qkv.peft.default.lora_A`` -> ``...qkv.peft.lora_A`` (PEFT drops it too)."""
    return re.sub(rf"(^|\.)peft\.{re.escape(name)}(?=\.)", r"\1peft", param)


def _put_adapter_name(key: str, name: str) -> str:
    return re.sub(r"(^|\.)peft(?=\.)", rf"\1peft.{name}", key)


def _json_value(value, where):
    if isinstance(value, tuple):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v, where) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, list)):
        return value
    raise TinyLMError(f"cannot save the {where} option value {value!r} (a "
                      f"{type(value).__name__}) as JSON; give plain numbers, strings or lists")


def _export_tinylm(model, name, config, reason: str):
    """The tinylm-only folder: tinylm's parameter names, the method's own options."""
    options = {f.name: _json_value(getattr(config, f.name), config.method)
               for f in dataclasses.fields(config) if f.init and f.name != "method"}
    from tinylm.version import __version__

    fields = {"peft_type": TINYLM_TYPE, "tinylm_method": config.method,
              "tinylm_config": options, "tinylm_version": __version__,
              "tinylm_note": f"a tinylm adapter ({reason}): tinylm.peft.load_adapter reads "
                             f"it, Hugging Face PEFT does not"}
    tensors = {_strip_adapter_name(n, name): _numpy(a)
               for n, a in peft_base.adapter_state_dict(model, name).items()}
    return fields, tensors


# --------------------------------------------------------------------------- load


def load_adapter(model, path, name: str = "default"):
    """Attach the adapter of the PEFT folder ``path`` to ``model`` as adapter ``name``
    (the method and options from adapter_config.json, the weights from
    adapter_model.safetensors) and return the model. Reads LoRA (rsLoRA, DoRA,
    rank_pattern / alpha_pattern, bias), IA3, prompt and prefix tuning, and tinylm's
    own folders. Everything is checked first; on any error the model is left as it
    was. Every non-adapter parameter is frozen (``peft.apply``), as PEFT does."""
    path = os.fspath(path)
    peft_base._check_new_name(model, name)
    fields = _read_config(path)
    tensors = _read_weights(path)
    peft_type = fields.get("peft_type")
    if peft_type == TINYLM_TYPE:
        config, state = _import_tinylm(model, fields, tensors, name, path)
    else:
        importers = _importers()
        if peft_type not in importers:
            known = ", ".join(sorted(importers) + [TINYLM_TYPE])
            raise TinyLMError(f"{path}: peft_type {peft_type!r} is not supported; tinylm "
                              f"loads {known}")
        if not hf_modules(model):
            raise TinyLMError(f"{path} is a Hugging Face PEFT adapter, but "
                              f"{type(model).__name__} is of no Hugging Face family (gpt2, "
                              f"llama, bert, t5): it has no HF module names to map")
        config, state = importers[peft_type](model, fields, tensors, name, path)
    _attach_and_fill(model, config, name, state, path)
    return model


def _read_config(path) -> dict:
    file = os.path.join(path, CONFIG)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder; an adapter is a folder with {CONFIG} "
                              f"and {WEIGHTS}")
    try:
        with open(file, encoding="utf-8") as f:
            fields = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {CONFIG}; is it a PEFT adapter folder?") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return fields


def _read_weights(path) -> dict:
    file = os.path.join(path, WEIGHTS)
    if not os.path.exists(file):
        pickled = os.path.exists(os.path.join(path, "adapter_model.bin"))
        hint = (" (only adapter_model.bin: pickled PyTorch weights, which tinylm never "
                "unpickles; save with PEFT's safe_serialization=True)") if pickled else ""
        raise CheckpointError(f"{path} has no {WEIGHTS}{hint}")
    return checkpoint.load_file(file)


def _attach_and_fill(model, config, name, state: dict, path) -> None:
    """``apply`` the config, then copy ``state`` ({tinylm name: array}) into the new
    adapter; any mismatch detaches it again and restores the trainable flags."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attrs = {a: model.__dict__[a] for a in ("peft_config", "active_adapter")
             if a in model.__dict__}
    try:
        peft_base.apply(model, config, adapter_name=name)
    except TinyLMError as e:  # apply undoes itself; say which folder it was
        raise type(e)(f"{path}: {e}") from None
    try:
        want = peft_base.adapter_state_dict(model, name)
        buffers = {k: v for k, v in model.state_dict().items()  # optional: kept if absent
                   if k not in want and peft_base._is_peft_param(k)
                   and peft_base._adapter_of(k) == name}
        key = lambda k: _strip_adapter_name(k, name)  # noqa: E731  (the file's name)
        problems = [f"tensor {key(k)} {tuple(v.shape)} is missing" for k, v in want.items()
                    if k not in state]
        problems += [_shape_problem(key(k), state[k].shape, v.shape)
                     for k, v in {**want, **buffers}.items()
                     if k in state and state[k].shape != v.shape]
        problems += [f"tensor {key(k)} is not this model's" for k in state
                     if k not in want and k not in buffers]
        _raise_problems(path, problems)
        model.load_state_dict(state, strict=False)
    except BaseException:
        peft_base.delete_adapter(model, name)
        for a in ("peft_config", "active_adapter"):
            if a in attrs:
                object.__setattr__(model, a, attrs[a])
            elif a in model.__dict__:
                object.__delattr__(model, a)
        for n, p in model.named_parameters():
            p.requires_grad = flags.get(n, p.requires_grad)
        raise


def _import_tinylm(model, fields, tensors, name, path):
    method, options = fields.get("tinylm_method"), fields.get("tinylm_config")
    if not isinstance(method, str) or not isinstance(options, dict):
        raise CheckpointError(f"{path}: a TINYLM adapter_config.json needs 'tinylm_method' "
                              f"(a name) and 'tinylm_config' (an object)")
    config = _config(path, method, options)
    return config, {_put_adapter_name(k, name): v for k, v in tensors.items()}


def _unsupported(fields, path, defaults: dict) -> None:
    """PEFT options that change what the adapter computes and tinylm lacks."""
    bad = [f"{k}={fields[k]!r}" for k, ok in defaults.items()
           if k in fields and fields[k] not in ok]
    if bad:
        raise TinyLMError(f"{path}: this adapter uses {', '.join(bad)}, which tinylm's "
                          f"PEFT does not support")


def _module_of(key: str, suffixes) -> tuple:
    """(HF module, which tensor) of a PEFT key (``base_model.model.`` optional)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for s in suffixes:
        if key.endswith("." + s):
            return key[: -len(s) - 1], s
    return None, None


def _shape_problem(key, have, want) -> str:
    return f"tensor {key} has shape {tuple(have)}, this model needs {tuple(want)}"


def _raise_problems(path, problems) -> None:
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path}: {'; '.join(problems[:3])}{more}; is it an adapter "
                              f"for another base model?")


def _host_of(model, modules, module, key, path):
    """(tinylm host name, rows, in_features, out rows) of HF ``module`` (or an error
    naming the tensor that asks for a module this model lacks)."""
    if module not in modules:
        raise CheckpointError(f"{path}: tensor {key} is for module {module}, which this "
                              f"{family_of(model)} model does not have; is it an adapter for "
                              f"another base model?")
    host_name, rows, _ = modules[module]
    host = _submodule(model, host_name)
    out = host.out_features if rows is None else rows.stop - rows.start
    return host_name, rows, host.in_features, out


def _submodule(model, name: str):
    module = model
    for part in name.split("."):
        module = module._modules[part]
    return module


_LORA_KEYS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight",
              "lora_magnitude_vector")
_LORA_OPTIONS = {  # PEFT options and the values tinylm computes the same for
    "lora_bias": (False, None), "modules_to_save": (None, []), "layers_to_transform": (None,),
    "layer_replication": (None,), "use_qalora": (False, None), "target_parameters": (None, []),
    "trainable_token_indices": (None,), "alora_invocation_tokens": (None,),
    "use_bdlora": (None, False), "arrow_config": (None,),
    "init_lora_weights": (True, False, "gaussian", "eva", "orthogonal", None),
}


def _sort_lora_tensors(model, tensors, path) -> tuple:
    """({HF module: {"lora_A" | "lora_B" | "lora_magnitude_vector": (key, array)}},
    {tinylm bias: {first row: array}}) of a LORA file. Base weights PEFT saves beside
    a tied or embedding target (``save_embedding_layers``) must be this model's own."""
    params = _hf_params(model)
    found, biases = {}, {}
    for key, a in tensors.items():
        module, kind = _module_of(key, _LORA_KEYS)
        local = (key[len(PREFIX):] if key.startswith(PREFIX) else key).replace(
            ".base_layer.", ".")  # the wrapped layer's own tensor
        if module is not None:
            found.setdefault(module, {})[kind.split(".")[0]] = (key, a)
        elif local in params and local.endswith("bias"):  # bias="all" / "lora_only"
            ours, rows, _ = params[local]
            biases.setdefault(ours, {})[rows.start if rows else 0] = a
        elif local in params:
            base = _base_value(model, params[local])
            if base.shape != a.shape or not np.allclose(a, base, rtol=1e-6, atol=0):
                raise CheckpointError(f"{path}: tensor {key} holds base weights that differ "
                                      f"from this model's (a trained or resized embedding?); "
                                      f"put them into the base model first")
        else:
            raise CheckpointError(f"{path}: tensor {key} is not a LoRA weight tinylm knows "
                                  f"(lora_A/lora_B/lora_magnitude_vector of a linear module, "
                                  f"or a bias of this model)")
    if not found:
        raise CheckpointError(f"{path}: {WEIGHTS} holds no LoRA weights")
    return found, biases


def _import_lora(model, fields, tensors, name, path):
    """(LoraConfig, {tinylm name: array}) of a PEFT LORA folder."""
    from tinylm.peft.lora import pattern_value

    _unsupported(fields, path, _LORA_OPTIONS)
    modules = hf_modules(model)
    r0, alpha0 = fields.get("r", 8), fields.get("lora_alpha", 8)
    # the config's own values first: r = -3 (or 0, 2.5, "two") was only found out as
    # tensor shapes "(-3, 32)" that no file can have
    _config(path, "lora", dict(
        r=r0, alpha=alpha0, dropout=fields.get("lora_dropout", 0.0) or 0.0,
        use_rslora=fields.get("use_rslora", False), use_dora=fields.get("use_dora", False),
        bias=fields.get("bias", "none"), rank_pattern=fields.get("rank_pattern") or {},
        alpha_pattern=fields.get("alpha_pattern") or {}))
    use_dora = bool(fields.get("use_dora", False))
    found, state = _sort_lora_tensors(model, tensors, path)
    ranks, alphas, lora, problems = {}, {}, {}, []
    for module, parts in found.items():
        first_key = next(iter(parts.values()))[0]
        host_name, rows, inp, out = _host_of(model, modules, module, first_key, path)
        r = pattern_value(fields.get("rank_pattern") or {}, [module], r0)
        need = {"lora_A": (r, inp), "lora_B": (out, r)}
        if use_dora:
            need["lora_magnitude_vector"] = (out,)
        for kind, shape in need.items():
            if kind not in parts:
                raise CheckpointError(f"{path}: {PREFIX}{module}.{kind} is missing (the "
                                      f"adapter_config.json asks for it)")
            key, a = parts[kind]
            if tuple(a.shape) != shape:
                problems.append(_shape_problem(key, a.shape, shape))
        extra = set(parts) - set(need)
        if extra:
            raise CheckpointError(f"{path}: {parts[extra.pop()][0]} is there but "
                                  f"adapter_config.json has use_dora=false")
        ranks[module], alphas[module] = r, pattern_value(fields.get("alpha_pattern") or {},
                                                         [module], alpha0)
        where = f"{host_name}.peft.{name}." + ("" if rows is None else
                                               module.rpartition(".")[2] + ".")
        lora[where + "lora_A"] = parts["lora_A"][1]
        lora[where + "lora_B"] = parts["lora_B"][1]
        if use_dora:
            lora[where + "lora_magnitude"] = parts["lora_magnitude_vector"][1]
    _raise_problems(path, problems)
    state = {ours: np.concatenate([p[k] for k in sorted(p)]) for ours, p in state.items()}
    options = dict(
        r=r0, alpha=alpha0, dropout=fields.get("lora_dropout", 0.0) or 0.0,
        target_modules=list(found), use_rslora=bool(fields.get("use_rslora", False)),
        use_dora=use_dora, bias=fields.get("bias", "none"),
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != alpha0})
    return _config(path, "lora", options), {**state, **lora}


def _config(path, method, options):
    try:
        return peft_base.config_for(method, **options)
    except TinyLMError as e:
        raise TinyLMError(f"{path}: adapter_config.json: {e}") from None


# --------------------------------------------------------------------------- IA3


def _ia3_feedforward_rule(names, module) -> bool:
    """PEFT's ``_check_target_module_feedforward`` for a list: a plain ``endswith``."""
    return any(module.endswith(n) for n in names)


def _export_ia3(model, name, config):
    """PEFT's IA3Config fields and ``ia3_l`` tensors (already in PEFT's shapes)."""
    modules = hf_modules(model)
    by_rows = {(host, rows.start if rows else None): hf for hf, (host, rows, _) in modules.items()}
    by_host: dict = {}
    for hf, (host, rows, _) in modules.items():
        by_host.setdefault(host, []).append((hf, rows))
    tensors, feedforward, fan_in_fan_out = {}, [], False
    for host_name, _, adapter in peft_base.iter_adapters(model, name):
        for rows, holder in adapter.pieces:
            vec = _numpy(holder.ia3_l.data)  # (rows, 1) or (1, in)
            if rows is not None:
                parts = [(by_rows[(host_name, rows.start)], None)]
            else:
                parts = _lora_parts(_WholeHost, host_name, by_host)
                if adapter.feedforward and len(parts) > 1:
                    raise _NoHF(f"{host_name} scales its input but is several HF modules")
            for hf, sub in parts:
                tensors[f"{PREFIX}{hf}.ia3_l"] = vec if sub is None else vec[sub]
                if adapter.feedforward:
                    feedforward.append(hf)
                fan_in_fan_out |= modules[hf][2]
    targets = [k[len(PREFIX):-len(".ia3_l")] for k in tensors]
    names = _shortest_names(targets, _universe(modules))
    ff = [n for n in names if all(t in feedforward for t in targets if matches([n], t))]
    if {t for t in targets if _ia3_feedforward_rule(ff, t)} != set(feedforward):
        names, ff = sorted(targets), sorted(feedforward)  # exact names: always right
    fields = {"peft_type": "IA3", "target_modules": names, "feedforward_modules": ff,
              "fan_in_fan_out": fan_in_fan_out, "init_ia3_weights": True,
              "modules_to_save": None, "exclude_modules": None}
    return fields, tensors


class _WholeHost:
    """A stand-in piece for ``_lora_parts``: the whole host (no rows of its own)."""

    rows = None


def _import_ia3(model, fields, tensors, name, path):
    """(IA3Config, {tinylm name: array}) of a PEFT IA3 folder."""
    _unsupported(fields, path, {"modules_to_save": (None, [])})
    modules = hf_modules(model)
    ff_pattern = fields.get("feedforward_modules") or []
    state, targets, feedforward, problems = {}, [], [], []
    for key, a in tensors.items():
        module, _ = _module_of(key, ("ia3_l",))
        if module is None:
            raise CheckpointError(f"{path}: tensor {key} is not an IA3 weight (<module>.ia3_l)")
        host_name, rows, inp, out = _host_of(model, modules, module, key, path)
        ff = (re.fullmatch(ff_pattern, module) is not None if isinstance(ff_pattern, str)
              else _ia3_feedforward_rule(ff_pattern, module))
        shape = (1, inp) if ff else (out, 1)
        if tuple(a.shape) != shape:
            problems.append(_shape_problem(key, a.shape, shape))
        targets.append(module)
        if ff:
            feedforward.append(module)
        piece = "" if rows is None else module.rpartition(".")[2] + "."
        state[f"{host_name}.peft.{name}.{piece}ia3_l"] = a
    if not state:
        raise CheckpointError(f"{path}: {WEIGHTS} holds no IA3 weights")
    _raise_problems(path, problems)
    options = dict(target_modules=targets, feedforward_modules=feedforward)
    return _config(path, "ia3", options), state


# --------------------------------------------------------------------------- prompt tuning


def _export_prompt(model, name, config):
    """PEFT's PromptTuningConfig fields and ``prompt_embeddings`` (P, d)."""
    (_, _, adapter), = peft_base.iter_adapters(model, name)
    c = model.config
    fields = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": config.num_virtual_tokens,
              "token_dim": c.d_model, "num_transformer_submodules": 1,
              "num_attention_heads": c.n_head, "num_layers": c.n_layer,
              "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
              "tokenizer_name_or_path": None, "modules_to_save": None}
    return fields, {"prompt_embeddings": _numpy(adapter.prompt_embeddings.data)}


def _import_prompt(model, fields, tensors, name, path):
    """(PromptTuningConfig, {tinylm name: array}) of a PEFT PROMPT_TUNING folder."""
    _unsupported(fields, path, {"num_transformer_submodules": (1, None),
                                "modules_to_save": (None, [])})
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"{path}: a prompt-tuning {WEIGHTS} holds prompt_embeddings "
                              f"only, found {', '.join(sorted(tensors))}")
    a = tensors["prompt_embeddings"]
    P = fields.get("num_virtual_tokens")
    config = _config(path, "prompt_tuning", {"num_virtual_tokens": P})  # before the shapes
    shape = (P, model.config.d_model)
    if tuple(a.shape) != shape:
        _raise_problems(path, [_shape_problem("prompt_embeddings", a.shape, shape)])
    return config, {f"transformer.peft.{name}.prompt_embeddings": a}


# --------------------------------------------------------------------------- prefix tuning


def _export_prefix(model, name, config):
    """PEFT's PrefixTuningConfig fields and ``prompt_embeddings`` (P, 2 L kv): every
    layer's key/value prefixes, the reparametrising MLP already applied (what PEFT
    saves too). kv = n_kv_head x head_dim is PEFT's ``token_dim`` for GQA models."""
    from tinylm.autograd import no_grad

    (_, _, adapter), = peft_base.iter_adapters(model, name)
    kv = adapter.n_kv_head * adapter.head_dim
    with no_grad():
        table = _numpy(adapter.virtual_kv().data)
    fields = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": config.num_virtual_tokens,
              "token_dim": kv, "num_attention_heads": adapter.n_kv_head,
              "num_layers": adapter.n_layer, "num_transformer_submodules": 1,
              "prefix_projection": config.prefix_projection,
              "encoder_hidden_size": config.encoder_hidden_size or kv,
              "modules_to_save": None}
    return fields, {"prompt_embeddings": table}


def _import_prefix(model, fields, tensors, name, path):
    """(PrefixTuningConfig, {tinylm name: array}) of a PEFT PREFIX_TUNING folder. The
    file holds the final (P, 2 L kv) table, so it loads without the MLP
    (``prefix_projection`` False: the same keys and values)."""
    _unsupported(fields, path, {"num_transformer_submodules": (1, None),
                                "modules_to_save": (None, [])})
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"{path}: a prefix-tuning {WEIGHTS} holds prompt_embeddings "
                              f"only, found {', '.join(sorted(tensors))}")
    c, a = model.config, tensors["prompt_embeddings"]
    config = _config(path, "prefix_tuning",  # before the shapes
                     {"num_virtual_tokens": fields.get("num_virtual_tokens")})
    shape = (fields.get("num_virtual_tokens"), 2 * c.n_layer * c.kv_heads * c.head_size)
    if tuple(a.shape) != shape:
        _raise_problems(path, [_shape_problem("prompt_embeddings", a.shape, shape)])
    return config, {f"transformer.peft.{name}.embedding": a}


# --------------------------------------------------------------------------- plugin methods


def _exporter(method: str):
    """The exporter of ``method``: a built-in one, its class's ``to_peft_state``, or None."""
    if method in _EXPORTERS:
        return _EXPORTERS[method]
    cls = peft_base.method_class(method)
    if getattr(cls, "to_peft_state", None) is None or not getattr(cls, "peft_type", None):
        return None

    def export(model, name, config):
        fields, tensors = cls().to_peft_state(model, name, config)
        return {**fields, "peft_type": cls.peft_type}, tensors
    return export


def _importers() -> dict:
    """{peft_type: importer}: the built-ins, then each registered method class with a
    ``peft_type`` and ``from_peft_state`` (a built-in type is never taken over)."""
    from tinylm.plugins import registry

    out = dict(_IMPORTERS)
    for cls in registry("peft_methods").values():
        peft_type = getattr(cls, "peft_type", None)
        if peft_type and peft_type not in out and getattr(cls, "from_peft_state", None):
            out[peft_type] = (lambda model, fields, tensors, name, path, cls=cls:
                              cls().from_peft_state(model, fields, tensors, name, path))
    return out


_EXPORTERS = {"lora": _export_lora, "ia3": _export_ia3, "prompt_tuning": _export_prompt,
              "prefix_tuning": _export_prefix}
_IMPORTERS = {"LORA": _import_lora, "IA3": _import_ia3, "PROMPT_TUNING": _import_prompt,
              "PREFIX_TUNING": _import_prefix}
