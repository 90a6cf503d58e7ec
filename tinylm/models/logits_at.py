"""A language model's logits at one position per row, without projecting the others.

    logits = logits_at(model, ids, at, cache=cache)   # (B, V): row b at column at[b]

Scoring a context or prefilling a prompt of T tokens needs the next-token distribution
after one position per row, but ``Decoder.forward`` projects every position onto the
vocabulary: for GPT-2 small and a 170-token prompt that is (170, 768) @ (768, 50257),
about 13 of the forward's 42 GFLOP, all thrown away but one row. For a plain decoder
(token embedding -> ``BlockStack`` -> ``lm_head``, the class's own ``forward``) this
runs those layers itself and projects only the hidden state at column ``at[b]`` of each
row. Any other model (a subclass with its own ``forward``, an instance-level one) goes
through its ``forward`` and the wanted rows are taken from its logits, so nothing it
does is skipped. Adapters on the layers run either way (they hook the modules' calls).
Used by the log-likelihood scorer (tinylm/evaluation/loglik.py) and the server's
engine (tinylm/serve/forward.py).
"""

from __future__ import annotations

from tinylm import backend


def plain_decoder(model) -> bool:
    """Whether ``model``'s forward is ``Decoder.forward`` itself, so that its layers
    may be called one by one."""
    from tinylm.models.decoder import Decoder

    return (isinstance(model, Decoder) and type(model).forward is Decoder.forward
            and "forward" not in vars(model))


def logits_at(model, ids, at, **kwargs):
    """The logits (B, V) of ``model`` on ``ids`` (B, T) at column ``at[b]`` of each row
    b, an array of the model's (its device and dtype). ``kwargs``: the forward's
    ``cache``, ``attention_mask``, ``positions``."""
    if plain_decoder(model):
        ids = model.as_ids(ids)
        xp = backend.get_array_module(ids)
        h, _ = model.transformer(model.tok_emb(ids), **kwargs)  # (B, T, d)
        last = h[xp.arange(ids.shape[0]), xp.asarray(at)]  # (B, d)
        return model.lm_head(last[:, None]).data[:, 0]  # (B, V)
    logits = model(ids, **kwargs).logits.data  # (B, T, V)
    xp = backend.get_array_module(logits)
    return logits[xp.arange(logits.shape[0]), xp.asarray(at)]  # (B, V)
