"""How the model families are called: Hugging Face's argument names (``input_ids``,
``decoder_input_ids``) as keyword-only aliases of tinylm's (``ids``, ``decoder_ids``)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import tinylm
from tinylm.errors import TinyLMError
from tinylm.models import BertConfig, LlamaConfig, T5Config, build_model

SMALL = dict(vocab_size=40, d_model=16, n_layer=1, n_head=2, d_ff=32)
IDS = np.random.default_rng(0).integers(1, 40, (2, 5))
MASK = np.array([[1] * 5, [1] * 3 + [0] * 2])


@pytest.mark.parametrize("config", [LlamaConfig(**SMALL), BertConfig(**SMALL)],
                         ids=["decoder", "encoder"])
def test_input_ids_is_ids(config):
    tinylm.seed(0)
    model = build_model(config).eval()
    with tinylm.no_grad():
        want = model(IDS, attention_mask=MASK).logits.numpy()
        got = model(input_ids=IDS, attention_mask=MASK).logits.numpy()
    np.testing.assert_array_equal(got, want)
    with pytest.raises(TinyLMError, match="give ids or input_ids, not both"):
        model(IDS, input_ids=IDS)
    with pytest.raises(TinyLMError, match="input_ids="):
        model(attention_mask=MASK)
    kind = inspect.signature(model.forward).parameters["input_ids"].kind
    assert kind is inspect.Parameter.KEYWORD_ONLY


def test_encoder_decoder_takes_input_ids_and_decoder_input_ids():
    tinylm.seed(0)
    model = build_model(T5Config(**SMALL, head_dim=8)).eval()
    dec = IDS[:, :3]
    with tinylm.no_grad():
        want = model(IDS, decoder_ids=dec, attention_mask=MASK).logits.numpy()
        got = model(input_ids=IDS, decoder_input_ids=dec, attention_mask=MASK).logits.numpy()
        memory, _ = model.encode(input_ids=IDS, attention_mask=MASK)
        from_memory = model(memory=memory, decoder_input_ids=dec, attention_mask=MASK)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(from_memory.logits.numpy(), want)
    with pytest.raises(TinyLMError, match="give ids or input_ids, not both"):
        model(IDS, decoder_ids=dec, input_ids=IDS)
    with pytest.raises(TinyLMError, match="give decoder_ids or decoder_input_ids, not both"):
        model(IDS, decoder_ids=dec, decoder_input_ids=dec)
