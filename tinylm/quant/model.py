"""Quantizing a whole model in place, and the quantized model folder.

    model = quantize(model, "q4_1", skip=["lm_head"])   # Linear (+ embedding) -> packed
    model.quantization["skipped"]                        # what stayed float, and why
    save_quantized(model, tokenizer, "out/")             # config.json + model.safetensors
    model, tokenizer = load_quantized_folder("out/")
    model = dequantize_model(model)                      # float32 again, for speed

Which layers: every ``nn.Linear`` whose dotted module name matches none of the
``skip`` patterns (``fnmatch``: ``"lm_head"``, ``"*.attn.*"``, ``"transformer.blocks.0.*"``),
and the token embedding(s) when ``embeddings`` is true: by default for the GGUF
schemes (q8_0, q4_0, q4_1, f16, bf16), not for int8 and nf4 (QLoRA's practice: those
quantize the Linear layers only); ``embeddings`` may also name a scheme of their own
(``quantize(model, "nf4", embeddings="bf16")``: NF4 Linear layers, the embedding in
bfloat16 storage, as QLoRA keeps it with ``torch_dtype=bfloat16``). An LM head tied
to an embedding (GPT-2's, a Llama with ``tie_embeddings``) follows that embedding: when it is quantized the head becomes
a ``QuantTiedHead`` over the same packed rows (no second copy); otherwise both stay
float. A layer whose input features (the row length) are not a multiple of the
scheme's block (32, nf4: 64) stays float32; it is listed in
``model.quantization["skipped"]`` with the reason, and a warning says so. (No
fallback format: a model that must be fully quantized should be built with block-size
multiples, as every published model is.)

The folder is a run folder's model part: ``config.json`` (the model config plus a
``"quantization"`` section: scheme, skip patterns, each quantized layer's format and
shape, the tied heads), ``model.safetensors`` (the float parameters as usual; each
quantized layer as its packed buffers, ``<layer>.qweight`` uint8/int8 plus
``<layer>.scale`` / ``.absmax`` / ``.qabsmax`` / ``.absmax2`` / ``.offset`` by format;
a layer in a float format, e.g. the bf16 embedding of ``embeddings="bf16"``, as its
``qweight`` typed BF16 / F16 / F32 (out, in), which loads back as those bits, not
float32) and ``tokenizer.txt``. Loading builds the model from the config with its weights
unwritten (``nn.skip_init``), then reads the file one layer at a time: each quantized
layer's packed arrays become its buffers (no copy), each float tensor is copied into
its parameter and dropped, so loading never holds more than the model plus one tensor.
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings

import numpy as np

from tinylm import checkpoint, nn
from tinylm.atomic import write_atomic
from tinylm.errors import CheckpointError, TinyLMError
from tinylm.quant import kernels
from tinylm.quant.base import QuantError
from tinylm.quant.layers import QuantEmbedding, QuantLinear, QuantTiedHead, _BUFFER
from tinylm.quant.registry import get_format

SCHEMES = ("q8_0", "q4_0", "q4_1", "int8", "nf4", "nf4-dq", "f16", "bf16")
EMBEDDING_SCHEMES = ("q8_0", "q4_0", "q4_1", "f16", "bf16")  # embeddings=None: these
# the float layer formats and the safetensors dtype their ``qweight`` is stored as (the
# file says what the bytes are; a folder with them as U8 bytes, as written before, loads too)
FLOAT_CODES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.txt"
QUANT_VERSION = 1


def check_scheme(scheme: str) -> str:
    """The lower-case scheme name, or a QuantError listing the schemes."""
    name = str(scheme).lower()
    if name not in SCHEMES:
        raise QuantError(f"unknown quantization scheme {scheme!r}; choose one of "
                         f"{', '.join(SCHEMES)}")
    return name


def _matches(name: str, skip) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def _targets(model, scheme: str, skip, embeddings: bool, emb_scheme: str):
    """[(name, module)] of the Linear / Embedding layers to quantize, the tied heads
    {head name: embedding name}, and {name: reason} of the layers left float."""
    named = list(model.named_modules())
    emb_of = {id(m.weight): n for n, m in named if isinstance(m, nn.Embedding)}
    heads = {n: emb_of[id(m.weight)] for n, m in named
             if isinstance(m, nn.Linear) and id(m.weight) in emb_of}
    chosen, skipped = [], {}
    for name, m in named:
        if not isinstance(m, (nn.Linear, nn.Embedding)) or name in heads:
            continue
        is_emb = isinstance(m, nn.Embedding)
        # a tied pair is one matrix: quantized only if neither name is skipped
        names = [name] + [h for h, e in heads.items() if e == name]
        if (is_emb and not embeddings) or any(_matches(n, skip) for n in names):
            continue
        row = m.embedding_dim if is_emb else m.in_features
        fmt = emb_scheme if is_emb else scheme
        block = get_format(fmt).block_size or 1
        if row % block:
            skipped[name] = (f"{row} input features are not a multiple of {fmt}'s "
                             f"block of {block}; left float32")
            continue
        chosen.append((name, m))
    done = {n for n, _ in chosen}
    return chosen, {h: e for h, e in heads.items() if e in done}, skipped


def _replace(model, name: str, module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = dict(model.named_modules())[parent_name]
    setattr(parent, attr, module)


def quantize(model, scheme: str, skip=(), embeddings: bool | str | None = None,
             progress: bool = False):
    """Swap ``model``'s Linear layers (and embeddings, see the module docstring) for
    quantized ones in ``scheme``, in place; returns the model, whose ``quantization``
    attribute records what was done (``scheme``, ``skip``, ``tensors``: {layer:
    {"format", "shape", "layer"}}, ``tied``: {head: embedding}, ``skipped``: {layer:
    reason}). ``embeddings``: True / False, or a scheme of their own for the token
    embeddings (and a head tied to one), e.g. ``quantize(model, "nf4",
    embeddings="bf16")``: NF4 Linear layers, the embedding/head in bfloat16 storage,
    what QLoRA with ``torch_dtype=bfloat16`` keeps. ``progress``: a tqdm bar on stderr."""
    from tqdm import tqdm

    scheme = check_scheme(scheme)
    skip = [str(p) for p in ([skip] if isinstance(skip, str) else skip)]
    if embeddings is None:
        embeddings = scheme in EMBEDDING_SCHEMES
    emb_scheme = check_scheme(embeddings) if isinstance(embeddings, str) else scheme
    chosen, tied, skipped = _targets(model, scheme, skip, bool(embeddings), emb_scheme)
    record = getattr(model, "quantization", None) or {"tensors": {}, "tied": {}}
    new = {}
    for name, m in tqdm(chosen, desc=f"quantizing to {scheme}", unit="layer",
                        disable=not progress, leave=False):
        if isinstance(m, nn.Linear):
            new[name] = QuantLinear.from_linear(m, scheme)
        else:
            new[name] = QuantEmbedding.from_embedding(m, emb_scheme)
        _replace(model, name, new[name])
        record["tensors"][name] = {"format": new[name].fmt,
                                   "shape": list(new[name].weight_shape),
                                   "layer": "linear" if isinstance(m, nn.Linear) else "embedding"}
    for head, emb in tied.items():
        _replace(model, head, QuantTiedHead(new[emb]))
        record["tied"][head] = emb
    for name, reason in skipped.items():
        warnings.warn(f"quantize: {name}: {reason}", stacklevel=2)
    record.update(scheme=scheme, skip=skip, skipped=skipped, version=QUANT_VERSION)
    object.__setattr__(model, "quantization", record)
    return model


def dequantize_model(model):
    """Every quantized layer of ``model`` back to float32 (``nn.Linear`` / ``nn.Embedding``,
    tied heads tied again), in place; returns the model."""
    named = list(model.named_modules())
    floats = {}
    for name, m in named:
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            floats[id(m)] = m.dequantize()
            _replace(model, name, floats[id(m)])
    for name, m in named:
        if isinstance(m, QuantTiedHead):
            emb = floats.get(id(m.embedding))
            head = m.dequantize() if emb is None else nn.Linear(m.in_features, m.out_features,
                                                                bias=False)
            if emb is not None:
                head.weight = emb.weight
            _replace(model, name, head)
    if hasattr(model, "quantization"):
        object.__delattr__(model, "quantization")
    return model


# --------------------------------------------------------------------------- the folder


def describe(model) -> dict:
    """The quantization record of ``model`` as its layers are now: ``tensors`` {layer:
    {"format", "shape", "layer"}} and ``tied`` {head: embedding}, with ``scheme``,
    ``skip`` and ``skipped`` from ``model.quantization`` when ``quantize`` made it (a
    model built from packed GGUF tensors has none: its commonest format is the scheme)."""
    named = list(model.named_modules())
    names = {id(m): n for n, m in named}
    tensors, tied = {}, {}
    for name, m in named:
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            kind = "linear" if isinstance(m, QuantLinear) else "embedding"
            tensors[name] = {"format": m.fmt, "shape": list(m.weight_shape), "layer": kind}
        elif isinstance(m, QuantTiedHead):
            tied[name] = names[id(m.embedding)]
    record = dict(getattr(model, "quantization", None) or {})
    formats = [t["format"] for t in tensors.values()]
    scheme = record.get("scheme") or (max(set(formats), key=formats.count) if formats else None)
    return {"version": QUANT_VERSION, "scheme": scheme, "skip": record.get("skip", []),
            "tensors": tensors, "tied": tied, "skipped": record.get("skipped", {})}


def save_quantized(model, tokenizer, folder, overwrite: bool = False) -> None:
    """Write ``folder``/config.json, model.safetensors and tokenizer.txt (see the module
    docstring) for a model with quantized layers (``quantize``'s, or packed GGUF
    tensors'); each file atomic. A folder that exists and is not empty is refused
    unless ``overwrite``."""
    folder = os.fspath(folder)
    record = describe(model)
    if not record["tensors"]:
        raise QuantError("save_quantized: the model has no quantized layers; quantize it "
                         "first (tinylm.quant.quantize) or save it as a run folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"{folder} exists and is not a folder; choose another output")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise CheckpointError(f"{folder} already exists and is not empty; pass "
                              f"--overwrite (overwrite=True) to replace it")
    os.makedirs(folder, exist_ok=True)
    state = {k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    dtypes = {}
    for name, info in record["tensors"].items():  # f32 / f16 / bf16 layers: typed, not U8
        code = FLOAT_CODES.get(info["format"])
        key = f"{name}.qweight"
        if code and key in state:
            typed = np.dtype(get_format(info["format"]).dtype)  # BF16: its uint16 bits
            state[key] = state[key].view(typed).reshape(info["shape"])
            dtypes[key] = code
    checkpoint.save_file(state, os.path.join(folder, MODEL_FILE), dtypes=dtypes,
                         metadata={"format": "np", "tinylm_quantization": record["scheme"]})
    tokenizer.save(os.path.join(folder, TOKENIZER_FILE))
    config = {**model.config.to_dict(), "quantization": record}
    write_atomic(os.path.join(folder, CONFIG_FILE), json.dumps(config, indent=2) + "\n")


def is_quantized_folder(path) -> bool:
    """Whether ``path`` is a folder whose config.json has a "quantization" section."""
    config = os.path.join(os.fspath(path), CONFIG_FILE)
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "quantization" in data


def load_quantized_folder(path, device: str = "cpu"):
    """(model, tokenizer) of a folder ``save_quantized`` wrote; the model in eval mode.
    Every way the folder can be wrong is a ``CheckpointError`` naming the file."""
    from tinylm.models import build_model, config_from_dict
    from tinylm.tokenizers import from_file

    path = os.fspath(path)
    for name in (CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path} has no {name}; is it a folder that "
                                  f"`tinylm quantize` wrote?")
    data = _read_json(os.path.join(path, CONFIG_FILE))
    record = data.pop("quantization", None)
    if not isinstance(record, dict) or not isinstance(record.get("tensors"), dict):
        raise CheckpointError(f"{path}/{CONFIG_FILE} has no valid \"quantization\" section "
                              f"(with \"tensors\"); it is not a quantized model folder")
    if str(device) != "cpu":
        raise TinyLMError("quantized layers compute on the CPU; load with device='cpu' (or "
                          "dequantize_model(model).to(device) for float32 on the GPU)")
    with nn.skip_init():  # every weight comes from the file: no float32 copy is drawn
        model = build_model(config_from_dict(data))
    file = os.path.join(path, MODEL_FILE)
    header = checkpoint.read_header(file)
    quant_keys = _swap_in(model, record, file, header)
    rest = [k for k in header if k not in quant_keys]
    targets = set(model.state_dict())
    missing = sorted(targets - set(rest) - quant_keys)
    unexpected = sorted(set(rest) - targets)
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit its config.json: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    _load_floats(model, file, rest)
    object.__setattr__(model, "quantization", record)
    tokenizer = from_file(os.path.join(path, TOKENIZER_FILE))
    return model.eval(), tokenizer


def _load_floats(model, file: str, keys) -> None:
    """The float tensors ``keys`` of ``file`` into ``model``, one at a time: a parameter
    of the same shape and dtype takes the array read (no copy); a tied alias of one
    already read is not read again; anything else is copied in by load_state_dict."""
    modules, done = dict(model.named_modules()), set()
    for key in keys:
        owner, _, attr = key.rpartition(".")
        param = getattr(modules.get(owner), "_parameters", {}).get(attr)
        if param is not None and id(param) in done:
            continue
        array = checkpoint.load_file(file, names=[key])[key]
        if (param is not None and isinstance(param.data, np.ndarray)
                and param.data.shape == array.shape and param.data.dtype == array.dtype):
            param.data = array
        else:
            model.load_state_dict({key: array}, strict=False)
        if param is not None:
            done.add(id(param))


def _read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds no JSON object; it is not a model config")
    return data


def _swap_in(model, record: dict, file: str, header: dict) -> set:
    """Replace each layer ``record`` lists by a quantized one over its arrays, read from
    ``file`` (whose ``header`` is ``checkpoint.read_header``'s) layer by layer; returns
    the state keys they took."""
    taken, made = set(), {}
    modules = dict(model.named_modules())
    for name, info in record["tensors"].items():
        if name not in modules or not isinstance(info, dict):
            raise CheckpointError(f"{file}: the quantization section names layer {name!r}, "
                                  f"which the model does not have")
        try:
            fmt, shape = info["format"], tuple(int(n) for n in info["shape"])
            keys = {a: f"{name}.{_BUFFER.get(a, a)}" for a in kernels.LAYOUTS[get_format(fmt).name]}
            if f"{name}.bias" in header and info.get("layer") != "embedding":
                keys["bias"] = f"{name}.bias"
            state = checkpoint.load_file(file, names=[k for k in keys.values() if k in header],
                                         bf16="raw")  # BF16 as its bits, never float32
            arrays = {a: state[k] for a, k in keys.items() if a != "bias"}
            code = header.get(keys.get("raw"), {}).get("dtype")
            if code in FLOAT_CODES.values():  # a typed f32 / f16 / bf16 table: its bytes
                if code != FLOAT_CODES.get(get_format(fmt).name):
                    raise ValueError(f"a {fmt} layer stored as {code}")
                arrays["raw"] = arrays["raw"].reshape(shape[0], -1).view(np.uint8)
            packed = kernels.check_packed(kernels.Packed(get_format(fmt).name, shape, arrays))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: layer {name!r} is not a valid quantized tensor "
                                  f"({type(e).__name__}: {e}); the file is damaged or was "
                                  f"written by another tool") from None
        taken.update(keys.values())
        if info.get("layer") == "embedding":
            made[name] = QuantEmbedding(packed)
        else:
            made[name] = QuantLinear(packed, state.get(keys.get("bias")))
        _replace(model, name, made[name])
    for head, emb in record.get("tied", {}).items():
        if emb not in made or head not in modules:
            raise CheckpointError(f"{file}: tied head {head!r} -> {emb!r} names no "
                                  f"quantized embedding")
        _replace(model, head, QuantTiedHead(made[emb]))
    return taken
