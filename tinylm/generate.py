"""Sampling text from a trained model: the simple way, by full recompute.

    ids = tokenizer.encode("ROMEO:")
    new = sample(model, ids, max_new_tokens=200, temperature=0.8, top_k=200, seed=1)
    print(tokenizer.decode(ids + new))

Each new token runs the model over the whole context (cropped to the model's
``max_positions``), takes the last position's logits, divides them by the
temperature, keeps the ``top_k`` largest, and draws from the softmax with a NumPy
generator seeded by ``seed``. (KV-cache decoding will replace the recompute.)

A decoder continues ``ids``; an encoder-decoder reads ``ids`` with its encoder and
writes a new sequence from its decoder-start token. An encoder (BERT) does not
generate text.
"""

from __future__ import annotations

import numpy as np

from tinylm import backend
from tinylm.autograd import no_grad
from tinylm.errors import TinyLMError


def sample(model, ids, max_new_tokens: int = 200, temperature: float = 1.0,
           top_k: int | None = None, seed: int | None = None, eos_id: int | None = None,
           rng: np.random.Generator | None = None) -> list:
    """The ids of ``max_new_tokens`` sampled tokens (fewer if ``eos_id`` comes)."""
    from tinylm.objectives import model_kind

    kind = model_kind(model)
    if kind not in ("decoder", "encoder-decoder"):
        raise TinyLMError(f"{type(model).__name__} is an {kind or 'unknown kind of'} model and "
                          f"does not generate text; sample from a decoder (gpt2, llama) or "
                          f"an encoder-decoder (t5)")
    if temperature < 0:
        raise TinyLMError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise TinyLMError(f"top_k must be >= 1, got {top_k}")
    ids = [int(i) for i in ids]
    rng = rng if rng is not None else np.random.default_rng(seed)
    limit = model.config.max_positions
    was_training = model.training
    model.eval()
    out = []
    try:
        with no_grad():
            if kind == "encoder-decoder":
                if not ids:
                    raise TinyLMError("an encoder-decoder needs a non-empty prompt to encode")
                memory, _ = model.encode(np.array([ids[-limit:]]))
                context = [model.config.decoder_start_token_id]
            else:
                if not ids:
                    raise TinyLMError("give at least one prompt token to continue from")
                context = list(ids)
            for _ in range(max_new_tokens):
                window = np.array([context[-limit:]])  # (1, T)
                if kind == "encoder-decoder":
                    logits = model(decoder_ids=window, memory=memory).logits
                else:
                    logits = model(window).logits  # (1, T, vocab)
                last = backend.to_numpy(logits.data[0, -1]).astype(np.float64)  # (vocab,)
                token = _pick(last, temperature, top_k, rng)
                out.append(token)
                context.append(token)
                if eos_id is not None and token == eos_id:
                    break
    finally:
        model.train(was_training)
    return out


def _pick(logits: np.ndarray, temperature: float, top_k, rng) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < len(logits):
        cutoff = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < cutoff, -np.inf, logits)
    p = np.exp(logits - logits.max())
    return int(rng.choice(len(p), p=p / p.sum()))
