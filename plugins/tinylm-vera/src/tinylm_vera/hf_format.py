"""VeRA adapters in Hugging Face PEFT's folder format, both ways.

PEFT's ``adapter_model.safetensors`` for VeRA (``peft_type`` "VERA") holds

    base_model.model.<HF module>.vera_lambda_b     (out,)   per adapted module
    base_model.model.<HF module>.vera_lambda_d     (r,)
    base_model.vera_A                              (r, max_in)    with save_projection
    base_model.vera_B                              (max_out, r)

and ``adapter_config.json`` PEFT's ``VeraConfig`` fields (r, target_modules,
projection_prng_key, save_projection, vera_dropout, d_initial, fan_in_fan_out, ...).
tinylm's fused ``attn.qkv`` is HF's q/k/v row slices, each its own VeRA piece (B from
row 0 for each, as PEFT slices it), or GPT-2's whole ``c_attn``. A VeRA on a whole
fused qkv of a Llama (named the tinylm way) has no PEFT form: as three HF modules, k
and v would slice B from row 0, not from their rows. ``save_adapter`` then writes a
tinylm folder (``NoPeftForm``).

Without the projections in the file (``save_projection`` false), they are drawn from
``projection_prng_key``; tinylm draws exactly PEFT's numbers (``tinylm_vera.projection``).
"""

from __future__ import annotations

import numpy as np

import tinylm
from tinylm import CheckpointError, peft
from tinylm.peft import hf as peft_hf

PROJECTIONS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
VECTORS = ("vera_lambda_b", "vera_lambda_d")
# PEFT options whose other values change what the adapter computes, and tinylm lacks
UNSUPPORTED = {"bias": ("none", None), "modules_to_save": (None, []),
               "layers_to_transform": (None,), "layers_pattern": (None, [])}


def _numpy(a) -> np.ndarray:
    return np.ascontiguousarray(tinylm.Tensor(a).numpy())


def _parts(model, name):
    """(the VeraProjection, [(HF module, piece)]) of adapter ``name``, or NoPeftForm."""
    from tinylm_vera.method import VeraProjection

    modules = peft.hf_module_names(model)
    whole = {host: hf for hf, (host, rows, _) in modules.items() if rows is None}
    shared, parts = None, []
    for host_name, _, adapter in peft.iter_adapters(model, name):
        if isinstance(adapter, VeraProjection):
            shared = adapter
            continue
        for piece in adapter.pieces:
            hf = whole.get(host_name) if piece.rows is None else piece.target.hf_name
            if hf is None:
                fused = any(v[0] == host_name for v in modules.values())
                raise peft_hf.NoPeftForm(
                    f"VeRA on the whole fused {host_name} is several HF modules, each "
                    f"slicing B from row 0" if fused else f"{host_name} has no Hugging "
                    f"Face module")
            parts.append((hf, piece))
    return shared, parts


def to_peft_state(model, name, config) -> tuple:
    """(PEFT's VeraConfig fields, {PEFT tensor name: array}) of adapter ``name``."""
    modules = peft.hf_module_names(model)
    shared, parts = _parts(model, name)
    tensors = {}
    for hf, piece in parts:
        for v in VECTORS:
            tensors[f"{peft_hf.PREFIX}{hf}.{v}"] = _numpy(getattr(piece.holder, v).data)
    if config.save_projection:
        for key, buffer in PROJECTIONS.items():
            tensors[key] = _numpy(getattr(shared, buffer))
    hf_names = [hf for hf, _ in parts]
    fields = {
        "r": config.r, "target_modules": peft_hf.target_names(model, hf_names),
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection, "vera_dropout": config.dropout,
        "d_initial": config.d_initial,
        "fan_in_fan_out": any(modules[hf][2] for hf in hf_names),
        "bias": "none", "modules_to_save": None, "init_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
    }
    return fields, tensors


def _sort_tensors(model, tensors, path) -> tuple:
    """({HF module: {vector: (key, array)}}, {buffer: array}) of a VERA file."""
    found, shared = {}, {}
    for key, a in tensors.items():
        if key in PROJECTIONS:
            shared[PROJECTIONS[key]] = a
            continue
        local = key[len(peft_hf.PREFIX):] if key.startswith(peft_hf.PREFIX) else key
        module, _, vector = local.rpartition(".")
        if vector not in VECTORS or not module:
            raise CheckpointError(f"{path}: tensor {key} is not a VeRA weight tinylm knows "
                                  f"(<module>.vera_lambda_b / vera_lambda_d, "
                                  f"base_model.vera_A / vera_B)")
        found.setdefault(module, {})[vector] = (key, a)
    if not found:
        raise CheckpointError(f"{path}: adapter_model.safetensors holds no VeRA vectors")
    return found, shared


def _check_fields(fields, path) -> None:
    bad = [f"{k}={fields[k]!r}" for k, ok in UNSUPPORTED.items()
           if k in fields and fields[k] not in ok]
    if bad:
        raise CheckpointError(f"{path}: this adapter uses {', '.join(bad)}, which tinylm's "
                              f"VeRA does not support")


def from_peft_state(model, fields, tensors, name, path) -> tuple:
    """(VeraConfig, {tinylm state_dict name: array}) of a PEFT VERA folder; the shared
    projections go to the model-level ``peft.<name>.vera_A`` / ``vera_B`` buffers."""
    _check_fields(fields, path)
    modules = peft.hf_module_names(model)
    r = fields.get("r", 256)
    found, shared = _sort_tensors(model, tensors, path)
    state, problems = {}, []
    for module, vectors in found.items():
        if module not in modules:
            raise CheckpointError(f"{path}: tensor {next(iter(vectors.values()))[0]} is for "
                                  f"module {module}, which this model does not have; is it "
                                  f"an adapter for another base model?")
        host_name, rows, _ = modules[module]
        where = f"{host_name}.peft.{name}." + ("" if rows is None else
                                               module.rpartition(".")[2] + ".")
        for v in VECTORS:
            if v not in vectors:
                raise CheckpointError(f"{path}: {peft_hf.PREFIX}{module}.{v} is missing")
            state[where + v] = vectors[v][1]
    state.update({f"peft.{name}.{buffer}": a for buffer, a in shared.items()})
    options = dict(r=r, target_modules=list(found),
                   projection_prng_key=fields.get("projection_prng_key", 0),
                   save_projection=bool(fields.get("save_projection", True)),
                   dropout=fields.get("vera_dropout", 0.0) or 0.0,
                   d_initial=fields.get("d_initial", 0.1))
    try:
        config = peft.config_for("vera", **options)
    except tinylm.TinyLMError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, state
