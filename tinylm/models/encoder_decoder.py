"""Encoder-decoder models: T5.

    config = T5Config(vocab_size=100, d_model=64, n_layer=2, n_head=4, head_dim=16, d_ff=128)
    model = EncoderDecoder(config)
    out = model(ids, targets=labels, attention_mask=mask)  # decoder input: labels shifted right
    memory = model.encode(ids, mask)                          # or encode once, then decode:
    out = model(decoder_ids=step_ids, memory=memory, attention_mask=mask, cache=cache)

The encoder's blocks see the whole input (bidirectional relative bias); the
decoder's are causal and cross-attend to the encoder output. With tied embeddings the
decoder output is scaled by d_model**-0.5 before the LM head (T5 folds the missing
1/sqrt(d) of its attention scores into its init; this is the matching output scale).
"""

from __future__ import annotations

from typing import ClassVar

from tinylm import backend, nn
from tinylm.errors import TinyLMError
from tinylm.models.base import BlockStack, Model, one_of
from tinylm.models.config import T5Config
from tinylm.tensor import Tensor


def shift_right(targets, start_id: int, pad_id: int):
    """Decoder inputs from targets: start_id, then targets[:-1], with -100 -> pad_id."""
    data = targets.data if isinstance(targets, Tensor) else targets
    xp = backend.get_array_module(data)
    data = xp.asarray(data)
    out = xp.empty_like(data)
    out[:, 0] = start_id
    out[:, 1:] = data[:, :-1]
    return xp.where(out == -100, pad_id, out)


class EncoderDecoder(Model):
    kind: ClassVar[str] = "encoder-decoder"
    config_class = T5Config

    def __init__(self, config: T5Config):
        super().__init__(config)
        c = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = BlockStack(c, c.n_layer, causal=False, final_dropout=True)
        self.decoder = BlockStack(c, c.decoder_layers, causal=True, cross=True, final_dropout=True)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        self.init_weights()

    def encode(self, ids=None, attention_mask=None, *, input_ids=None):
        """ids (B, S) (or ``input_ids=``) -> (hidden (B, S, d), MoE aux or None)."""
        ids = one_of(ids, input_ids, "ids", "input_ids")
        if ids is None:
            raise TinyLMError("encode needs the token ids (ids= or input_ids=)")
        return self.encoder(self.shared(self.as_ids(ids)), attention_mask)  # (B, S, d)

    def forward(self, ids=None, decoder_ids=None, targets=None, attention_mask=None,
                decoder_attention_mask=None, cache=None, memory=None, *, input_ids=None,
                decoder_input_ids=None):
        """ModelOutput with logits (B, T, vocab) for the decoder positions.

        ``ids`` (B, S) and ``attention_mask`` (B, S): the encoder input (or give its
        output as ``memory``, keeping the mask). ``decoder_ids`` (B, T): default
        ``targets`` shifted right. ``cache``: a KVCache for step-by-step decoding.
        ``input_ids`` / ``decoder_input_ids``: the Hugging Face names of ``ids`` /
        ``decoder_ids``."""
        ids = one_of(ids, input_ids, "ids", "input_ids")
        decoder_ids = one_of(decoder_ids, decoder_input_ids, "decoder_ids", "decoder_input_ids")
        aux = None
        if memory is None:
            if ids is None:
                raise TinyLMError("EncoderDecoder needs ids (the encoder input) or memory=")
            memory, aux = self.encode(ids, attention_mask)  # (B, S, d)
        if decoder_ids is None:
            if targets is None:
                raise TinyLMError("EncoderDecoder needs decoder_ids or targets")
            c = self.config
            decoder_ids = shift_right(targets, c.decoder_start_token_id, c.pad_token_id or 0)
        x = self.shared(self.as_ids(decoder_ids))  # (B, T, d)
        h, dec_aux = self.decoder(x, decoder_attention_mask, cache=cache, memory=memory,
                                  memory_mask=attention_mask)  # (B, T, d)
        aux = dec_aux if aux is None else (aux if dec_aux is None else aux + dec_aux)
        scaled = h
        if self.config.tie_embeddings and self.config.scale_decoder_output:
            scaled = h * self.config.d_model**-0.5
        logits = self.lm_head(scaled)  # (B, T, vocab)
        return self.output(logits, targets, aux, hidden_states=h, encoder_hidden_states=memory)
