"""Text -> ids as lm-evaluation-harness's ``HFLM`` encodes it, and its context/continuation split.

    enc = TextEncoder.for_model("hf/gpt2", model, tokenizer)
    enc.encode("Question: 2+2?")          # + the BOS the tokenizer's post-processor adds
    enc.pair("Question: 2+2?\\nAnswer:", " 4")   # (context ids, continuation ids)

lm-eval (``TemplateLM._encode_pair``) moves the trailing spaces of a context to the
front of its continuation, encodes context + continuation whole and the context alone,
and takes the whole's tokens after the context's length as the continuation: the
continuation is scored with the tokens it has in the whole text, where a tokenizer
may merge across the boundary. An empty context becomes the prefix token (BOS, else
EOS), unless the continuation already starts with it.

BOS: a Hugging Face tokenizer adds one when its ``tokenizer.json`` post-processor says
so (Llama's ``TemplateProcessing``); tinylm's tokenizers never add one, so this does,
reading the same post-processor (a GGUF file's ``tokenizer.ggml.add_bos_token``), unless
``add_bos`` says otherwise. Special tokens written in the text are encoded as special
tokens, as ``transformers`` does.

The prefix token (what the first token of a document is predicted from) is lm-eval's
``prefix_token_id``: the tokenizer's BOS (``tokenizer_config.json``'s ``bos_token``,
else the model config's ``bos_token_id``), else its EOS, else ``<|endoftext|>`` or
``</s>`` in the vocabulary.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tinylm.errors import TinyLMError

END_OF_TEXT = ("<|endoftext|>", "</s>")


@dataclass
class TextEncoder:
    """``tokenizer`` plus lm-eval's rules: ``bos`` (id or None) prepended when
    ``add_bos``; ``prefix_token`` conditions the first token of a document."""

    tokenizer: object
    prefix_token: int
    bos: int | None = None
    add_bos: bool = False

    @classmethod
    def for_model(cls, source, model, tokenizer, add_bos: bool | None = None,
                  prefix_token: int | None = None) -> "TextEncoder":
        """The encoder of a model loaded from ``source`` (a folder or a GGUF file)."""
        source = os.fspath(source) if source is not None else None
        names = _tokenizer_config(source)
        bos = _token_id(tokenizer, names.get("bos_token"))
        eos = _token_id(tokenizer, names.get("eos_token"))
        config = getattr(model, "config", None)
        bos = bos if bos is not None else getattr(config, "bos_token_id", None)
        eos = eos if eos is not None else getattr(config, "eos_token_id", None)
        if eos is None:
            eos = next((tokenizer.token_to_id(t) for t in END_OF_TEXT
                        if tokenizer.token_to_id(t) is not None), None)
        auto_bos = _post_processor_bos(source, tokenizer)
        if add_bos is None:
            add_bos = auto_bos is not None
        bos = auto_bos if auto_bos is not None else bos
        if prefix_token is None:
            prefix_token = bos if bos is not None else eos
        if prefix_token is None:
            raise TinyLMError("the tokenizer names no BOS or EOS token to start a document "
                              "from; pass --prefix-token-id")
        if add_bos and bos is None:
            raise TinyLMError("--add-bos needs a BOS token, and the tokenizer names none")
        return cls(tokenizer, int(prefix_token), None if bos is None else int(bos),
                   bool(add_bos))

    def encode(self, text: str, add_special: bool = True) -> list:
        """The ids of ``text``; with ``add_special`` the BOS first (when the encoder
        adds one and the text does not already start with its spelling)."""
        ids = list(self.tokenizer.encode(text, allowed_special="all"))
        if add_special and self.add_bos and not text.startswith(self._bos_text()):
            ids = [self.bos] + ids
        return ids

    def _bos_text(self) -> str:
        return self.tokenizer.decode([self.bos])

    def pair(self, context: str, continuation: str):
        """(context ids, continuation ids) as lm-eval's ``loglikelihood`` makes them."""
        if context == "":
            cont = self.encode(continuation, add_special=False)
            if not cont:
                raise TinyLMError("an empty continuation has nothing to score")
            return ([self.prefix_token], cont) if cont[0] != self.prefix_token \
                else (cont[:1], cont[1:])
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


def _tokenizer_config(source) -> dict:
    """``{"bos_token": text, "eos_token": text}`` from a folder's tokenizer_config.json
    (or special_tokens_map.json); {} when there is none."""
    if source is None or not os.path.isdir(source):
        return {}
    names = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(source, file), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token"):
            value = data.get(key) if isinstance(data, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    return names


def _token_id(tokenizer, text):
    return None if text is None else tokenizer.token_to_id(text)


def _post_processor_bos(source, tokenizer):
    """The id a tokenizer puts before every text by itself: a tokenizer.json whose
    post-processor's ``single`` template starts with a special token, or a GGUF file
    with ``tokenizer.ggml.add_bos_token``; else None."""
    if source is None:
        return None
    if os.path.isfile(source):
        return _gguf_bos(source)
    try:
        with open(os.path.join(source, "tokenizer.json"), encoding="utf-8") as f:
            post = json.load(f).get("post_processor") or {}
    except (OSError, ValueError, AttributeError):
        return None
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        single = step.get("single") if step.get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            return tokenizer.token_to_id(single[0]["SpecialToken"]["id"])
    return None


def _gguf_bos(path):
    """The BOS id a GGUF file asks to be put first (``tokenizer.ggml.add_bos_token``):
    read through ``special_ids``, so one outside the token list is ignored, as llama.cpp
    and the model's own import do (it was prepended raw, and failed in the embedding)."""
    from tinylm.formats.gguf import GGUFError, read_gguf
    from tinylm.formats.gguf_tokenizer import special_ids

    try:
        f = read_gguf(path)
    except GGUFError:
        return None
    if not f.metadata.get("tokenizer.ggml.add_bos_token"):
        return None
    return special_ids(f).get("bos")
