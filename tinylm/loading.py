"""One model loader for every source: ``load_model(path, device) -> (model, tokenizer)``.

    model, tokenizer = load_model("runs/demo")            # a `tinylm train` run folder
    model, tokenizer = load_model("hf/gpt2", "cuda")      # a Hugging Face folder
    model, tokenizer = load_model("smollm2.Q4_1.gguf")    # a GGUF file (llama, gpt2)
    model, tokenizer = load_model("demo-q4_1/")           # a `tinylm quantize` folder
    model = tinylm.load_pretrained("runs/demo")           # the model alone, any kind

A folder is recognised by its ``config.json``: tinylm's own (it names an
``architecture``; the run folder also holds ``tokenizer.txt`` and
``model.safetensors``, checked against ``trainer_state.json``: see
``tinylm.rundir``; with a ``quantization`` section it is a folder ``tinylm quantize``
wrote, read by ``tinylm.quant.model.load_quantized_folder``) or a Hugging Face one (it names a ``model_type``; the weights are
read by ``tinylm.models.hf.load_pretrained`` and the tokenizer from
``tokenizer.json``, ``vocab.json`` + ``merges.txt`` or ``vocab.txt``). A ``.gguf`` file
(or any file starting with the GGUF magic) is read by ``tinylm.formats.gguf_model``:
the model and the tokenizer its metadata describes.

Quantized sources (GGUF files, ``tinylm quantize`` folders) load with their weights
packed (``tinylm.quant.layers``: a 98 MB Q4_1 file holds about 97 MB, no float32
copy) on the CPU. ``dequantize=True`` gives float32 weights instead: four to eight
times the memory, and faster (BLAS on float32 instead of a decode per tile); a device
other than the CPU implies it (the quantized layers compute on the CPU only). Every way a
path can be wrong is a ``CheckpointError`` saying what was expected (for a GGUF file:
"PATH is a GGUF file tinylm cannot load: what is wrong or unsupported"). The model
comes back in eval mode.
"""

from __future__ import annotations

import json
import os

from tinylm.errors import CheckpointError

# spiece.model: a SentencePiece model (T5, ALBERT), read when a plugin recognises it
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model")
_EXPECTED = ("a `tinylm train` run folder (config.json, tokenizer.txt, model.safetensors), a "
             "Hugging Face folder (config.json, model.safetensors, tokenizer.json) or a "
             ".gguf file")


def load_model(path, device: str = "cpu", *, dequantize: bool | None = None):
    """(model, tokenizer) from a run folder, a Hugging Face folder, a GGUF file or a
    quantized folder, on ``device``. ``dequantize``: float32 weights for a quantized
    source (default: packed on the CPU, float32 elsewhere)."""
    path = os.fspath(path)
    kind = source_kind(path)
    if dequantize is None:
        dequantize = str(device) != "cpu"
    if kind == "gguf":
        model, tokenizer = _load_gguf(path, dequantize)
        model = model.to(device)
    elif kind == "quantized":
        from tinylm.quant.model import dequantize_model, load_quantized_folder

        model, tokenizer = load_quantized_folder(path)
        if dequantize:
            model = dequantize_model(model)
        model = model.to(device)
    elif kind == "run":
        from tinylm.rundir import load_model_dir

        model, tokenizer = load_model_dir(path, device)
        _check_vocab(path, model, tokenizer)
    else:
        model, tokenizer = _load_hf(path), hf_tokenizer(path)
        model = model.to(device)
    model.eval()
    return model, tokenizer


def load_pretrained(path, strict: bool = True, *, dequantize: bool | None = None):
    """The model alone (on the CPU) of a run folder, a Hugging Face folder, a GGUF file
    or a quantized folder (``dequantize`` as for ``load_model``). ``strict``: a Hugging
    Face checkpoint with tensors the model does not use is an error (the other sources
    always fit exactly)."""
    path = os.fspath(path)
    kind = source_kind(path)
    if kind in ("gguf", "run", "quantized"):
        return load_model(path, dequantize=dequantize)[0]
    return _load_hf(path, strict)


def source_kind(path) -> str:
    """"run" (tinylm's config.json), "quantized" (tinylm's config.json with a
    "quantization" section: a folder ``tinylm quantize`` wrote), "hf" (a Hugging Face
    config.json) or "gguf" (a .gguf file, or a file that starts with the GGUF magic);
    anything else is a CheckpointError saying what was expected."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is not a directory (it does not exist); pass {_EXPECTED}")
    if os.path.isfile(path) and (path.lower().endswith(".gguf") or _gguf_magic(path)):
        return "gguf"
    if not os.path.isdir(path):
        folder = os.path.dirname(path) or "."
        if os.path.isfile(os.path.join(folder, "config.json")):  # model.safetensors, ...
            raise CheckpointError(f"{path} is not a directory: pass the folder that holds "
                                  f"it, {folder}")
        raise CheckpointError(f"{path} is not a directory; pass {_EXPECTED}")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        if os.path.exists(os.path.join(path, "trainer_state.json")):
            return "run"  # a damaged run: load_model_dir names what is missing
        raise CheckpointError(f"{path} has no config.json; pass {_EXPECTED}")
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {config}: {e}") from None
    if isinstance(data, dict) and "architecture" in data:
        return "quantized" if "quantization" in data else "run"
    if isinstance(data, dict) and "model_type" in data:
        return "hf"
    raise CheckpointError(f"{config} names neither an 'architecture' (tinylm) nor a "
                          f"'model_type' (Hugging Face); pass {_EXPECTED}")


def _check_vocab(path, model, tokenizer) -> None:
    """A run folder's tokenizer may not have ids past the model's embedding rows (a
    tokenizer.txt from another run: it would fail in the embedding mid-generation)."""
    rows = getattr(getattr(model, "config", None), "vocab_size", None)
    size = getattr(tokenizer, "vocab_size", None)
    if rows is not None and size is not None and size > rows:
        raise CheckpointError(f"{path}: the tokenizer has {size} ids, the model's embedding "
                              f"{rows} rows; its tokenizer.txt is not the model's: restore "
                              f"the run's own, or retrain (tinylm train --overwrite)")


def _load_gguf(path, dequantize: bool):
    """(model, tokenizer) of a GGUF file; its GGUFError as a CheckpointError."""
    from tinylm.formats.gguf import GGUFError
    from tinylm.formats.gguf_model import load_gguf

    try:
        return load_gguf(path, dequantize=dequantize, progress=True)
    except GGUFError as e:
        problem = str(e)
        problem = problem[len(path) + 2:] if problem.startswith(f"{path}: ") else problem
        raise CheckpointError(f"{path} is a GGUF file tinylm cannot load: {problem}") from None


def _gguf_magic(path) -> bool:
    from tinylm.formats.gguf import MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def hf_tokenizer(path):
    """The tokenizer of a Hugging Face folder (tokenizer.json, vocab.json + merges.txt
    or vocab.txt)."""
    from tinylm.tokenizers import from_file

    for name in HF_TOKENIZER_FILES:
        if os.path.exists(os.path.join(path, name)):
            return from_file(os.path.join(path, name))
    raise CheckpointError(f"{path} has a config.json but no tokenizer "
                          f"({', '.join(HF_TOKENIZER_FILES)}); add one")


def _load_hf(path, strict: bool = True):
    from tinylm.models import hf

    return hf.load_pretrained(path, strict=strict)
