"""tinylm's own tokenizers, positional schemes, objectives, PEFT methods and model
architectures, registered through the hooks in ``tinylm.hookspecs`` exactly as a
third-party plugin registers its own.

Each hook is implemented here when the module it registers lands, importing that
module inside the hook so that ``import tinylm`` stays light:

    @hookimpl
    def register_tokenizers(register):
        from tinylm.tokenizers.bpe import BPETokenizer
        register("bpe", BPETokenizer)
"""
