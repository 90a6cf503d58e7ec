"""Model families: configs, the models built from them, Hugging Face import/export.

    from tinylm.models import LlamaConfig, build_model
    config = LlamaConfig(vocab_size=100, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=172)
    model = build_model(config)

``build_model`` looks the family up by ``config.architecture`` among the registered
architectures (``register_architectures`` hook), so plugins add families the same way.
"""

from tinylm.models.config import (  # noqa: F401
    Architecture, BertConfig, ConfigError, GPT2Config, LlamaConfig, ModelConfig, T5Config,
    config_from_dict, load_config,
)
from tinylm.models.base import BlockStack, Model, ModelOutput  # noqa: F401
from tinylm.models.decoder import Decoder  # noqa: F401
from tinylm.models.encoder import Encoder  # noqa: F401
from tinylm.models.encoder_decoder import EncoderDecoder  # noqa: F401


def build_model(config):
    """A freshly initialised model of ``config``'s family."""
    from tinylm import plugins

    return plugins.get_architecture(config.architecture).model(config)
