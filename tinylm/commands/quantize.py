"""``tinylm quantize MODEL --to SCHEME -o OUT``: a weight-quantized copy of a model.

    tinylm quantize runs/demo --to q8_0 -o runs/demo-q8          # a quantized folder
    tinylm quantize hf/gpt2 --to q4_1 --skip lm_head -o gpt2-q4  # keep the head float
    tinylm quantize runs/demo --to q4_0 -o demo-q4_0.gguf        # a GGUF file (llama.cpp)
    tinylm quantize hf/gpt2 --to nf4 --embeddings bf16 -o gpt2-nf4  # QLoRA's storage

``--embeddings bf16`` (int8 and nf4; ``quantize(model, scheme, embeddings="bf16")``)
keeps the token embedding, and an LM head tied to it, as bfloat16 bits: a ``bf16``
layer whose ``qweight`` is a BF16 tensor in model.safetensors, loaded back as those
bits (half the float32 table's memory). ``float32``, the default, leaves them float32.
q8_0, q4_0 and q4_1 quantize the embedding to the scheme itself, so ``--embeddings``
is refused for them (``--skip`` the embedding's name keeps it float32).

MODEL is anything ``tinylm.loading.load_model`` reads (a run folder, a Hugging Face
folder, a GGUF file), with float32 weights (a quantized source is dequantized, so every
layer is quantized to SCHEME anew; a --skip pattern must name a layer). OUT is a folder
(``tinylm.quant.model.save_quantized``: config.json with a "quantization" section,
model.safetensors, tokenizer.txt) or, ending in ``.gguf``, a GGUF file written by
``tinylm.formats.gguf_model.export_gguf``.
"""

from __future__ import annotations

import os
import warnings

import click

from tinylm.commands.options import non_empty_strings
from tinylm.errors import TinyLMError

CLI_SCHEMES = ("q8_0", "q4_0", "q4_1", "int8", "nf4")
EMBEDDING_CHOICES = ("float32", "bf16")  # --embeddings, for int8 and nf4
GGUF_SCHEMES = ("q8_0", "q4_0", "q4_1")  # int8 and nf4 are tinylm's own: no GGUF type


def check_output(out: str, scheme: str, overwrite: bool) -> None:
    """A TinyLMError for an OUT that cannot be written, before anything is loaded."""
    if out.lower().endswith(".gguf"):
        if scheme not in GGUF_SCHEMES:
            raise TinyLMError(f"GGUF has no {scheme} tensor type; for a .gguf output choose "
                              f"--to {' or '.join(GGUF_SCHEMES)}, or write a folder")
        if os.path.isdir(out):
            raise TinyLMError(f"{out} is a folder; give a file name ending in .gguf")
        if os.path.exists(out) and not overwrite:
            raise TinyLMError(f"{out} already exists; pass --overwrite to replace it")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise TinyLMError(f"the folder {parent} of {out} does not exist; create it first")
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise TinyLMError(f"{out} exists and is not a folder; give a folder (or a .gguf "
                          f"file name)")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise TinyLMError(f"{out} already exists and is not empty; pass --overwrite to "
                          f"replace it")


def embeddings_for(scheme: str, embeddings: str | None):
    """``quantize``'s ``embeddings`` argument for ``--embeddings`` (None: the scheme's
    default); a TinyLMError for a scheme that quantizes the embedding itself."""
    if embeddings is None:
        return None
    embeddings = embeddings.lower()
    if scheme not in ("int8", "nf4"):
        raise TinyLMError(f"--embeddings applies to int8 and nf4; {scheme} quantizes the "
                          f"token embedding to {scheme} itself (drop --embeddings, or --skip "
                          f"the embedding's name to keep it float32)")
    return "bf16" if embeddings == "bf16" else False


def check_skip(model, skip, model_path: str) -> None:
    """A TinyLMError for a --skip pattern that names no layer of ``model`` (a typo would
    otherwise quantize the layer it meant, silently); the message lists a few names."""
    import fnmatch

    from tinylm import nn

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise TinyLMError(f"--skip {pattern!r} matches no layer of {model_path}; its "
                              f"layers are named like {shown} (fnmatch patterns: "
                              f"'*.attn.*', 'lm_head')")


def export_to_gguf(model, tokenizer, out: str, scheme: str) -> None:
    """The model to a GGUF file through the GGUF exporter, if this tinylm has it."""
    from tinylm.models.decoder import Decoder

    if not isinstance(model, Decoder):
        raise TinyLMError(f"GGUF export writes decoder-only models (GPT-2, Llama); this "
                          f"model is a {type(model).__name__}: write a folder instead")
    try:
        from tinylm.formats.gguf_model import export_gguf
    except ImportError:
        raise TinyLMError("GGUF export is not available in this tinylm (no "
                          "tinylm.formats.gguf_model.export_gguf); write a folder "
                          "instead") from None
    export_gguf(model, tokenizer, out, dtype=scheme)


def quantize_model_to(model_path: str, scheme: str, skip, out: str, overwrite: bool,
                      log=print, embeddings: str | None = None) -> dict:
    """Load ``model_path``, quantize it to ``scheme`` (the token embedding as
    ``embeddings``: None, "float32" or "bf16", see ``--embeddings``) and write ``out``;
    returns the model's quantization record."""
    from tinylm.loading import load_model
    from tinylm.quant.model import quantize, save_quantized

    check_output(out, scheme, overwrite)
    emb = embeddings_for(scheme, embeddings)
    if out.lower().endswith(".gguf") and skip:
        raise TinyLMError("--skip applies to folder outputs; the GGUF exporter picks each "
                          "tensor's type itself (drop --skip or write a folder)")
    # float32 weights from a quantized source too (a GGUF file, a quantize folder): its
    # packed layers would otherwise be kept in their old format under the new name
    model, tokenizer = load_model(model_path, dequantize=True)
    check_skip(model, skip, model_path)
    if out.lower().endswith(".gguf"):
        export_to_gguf(model, tokenizer, out, scheme)  # the exporter quantizes itself
        return {"scheme": scheme, "tensors": {}, "skipped": {}}
    with warnings.catch_warnings():  # the layers left float are logged below instead
        warnings.simplefilter("ignore", UserWarning)
        quantize(model, scheme, skip=list(skip), embeddings=emb, progress=True)
    record = model.quantization
    if not record["tensors"]:
        raise TinyLMError(f"no layer of {model_path} was quantized (every Linear matched "
                          f"--skip or was off the block size); nothing to write")
    save_quantized(model, tokenizer, out, overwrite=overwrite)
    for name, reason in record["skipped"].items():
        log(f"left float32: {name} ({reason})")
    return record


@click.command(name="quantize")
@click.argument("model")
@click.option("--to", "scheme", required=True, type=click.Choice(CLI_SCHEMES,
              case_sensitive=False), help="The weight format.")
@click.option("--skip", multiple=True, metavar="PATTERN", callback=non_empty_strings,
              help="Leave the layers whose module names match this fnmatch pattern "
                   "float (e.g. lm_head, '*.attn.*'); repeatable.")
@click.option("--embeddings", type=click.Choice(EMBEDDING_CHOICES, case_sensitive=False),
              default=None, help="int8 and nf4: store the token embedding (and an LM head "
                                 "tied to it) as float32 [default] or bf16 (bfloat16 bits, "
                                 "half the memory, as QLoRA keeps it). Refused for q8_0, "
                                 "q4_0 and q4_1, which quantize it to SCHEME.")
@click.option("-o", "--out", required=True, help="A folder, or a file name ending in .gguf.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def quantize_command(model, scheme, skip, embeddings, out, overwrite):
    """Quantize MODEL's weights to SCHEME and write OUT.

    MODEL is a run folder, a Hugging Face folder or a GGUF file (a quantized
    one is dequantized to float32 first, then every layer quantized anew). q8_0, q4_0 and
    q4_1 also quantize the token embedding (a tied LM head follows it); int8 and
    nf4 quantize the Linear layers only, the embedding float32 or, with
    --embeddings bf16, bfloat16. OUT ending in .gguf is a GGUF file
    (q8_0, q4_0, q4_1 only) that llama.cpp reads; anything else is a folder that
    `tinylm generate --model OUT` loads.
    """
    scheme = scheme.lower()
    record = quantize_model_to(model, scheme, skip, out, overwrite, log=click.echo,
                               embeddings=embeddings)
    formats = [t["format"] for t in record["tensors"].values()]
    counts = [f"{formats.count(f)} {'layers ' if i == 0 else ''}in {f}"
              for i, f in enumerate([scheme] + sorted(set(formats) - {scheme}))]
    click.echo(f"wrote {out}" + (f" ({', '.join(counts)})" if formats else f" ({scheme})"))
