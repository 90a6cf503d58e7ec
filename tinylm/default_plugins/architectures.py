"""The built-in model families, registered through the same hook a third-party plugin
implements: ``register(name, Architecture(config_class, model_class))``."""

from tinylm.hookspecs import hookimpl


@hookimpl
def register_architectures(register):
    from tinylm.models import (
        Architecture, BertConfig, Decoder, Encoder, EncoderDecoder, GPT2Config, LlamaConfig,
        T5Config,
    )

    register("gpt2", Architecture(GPT2Config, Decoder))
    register("llama", Architecture(LlamaConfig, Decoder))
    register("bert", Architecture(BertConfig, Encoder))
    register("t5", Architecture(T5Config, EncoderDecoder))
