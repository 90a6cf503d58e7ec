"""tinylm's built-in tokenizers, registered through the ``register_tokenizers`` hook
exactly as a plugin registers its own (the ``tinylm tokenize`` commands live in
``tinylm/commands/tokenize.py``). Imports happen inside the hook so that
``import tinylm`` stays light.
"""

from tinylm.hookspecs import hookimpl


@hookimpl
def register_tokenizers(register):
    from tinylm.tokenizers.bpe import BPETokenizer
    from tinylm.tokenizers.char import CharTokenizer
    from tinylm.tokenizers.spm import SentencePieceBPE
    from tinylm.formats.gguf_tokenizer import MissingBytesBPE
    from tinylm.tokenizers.wordpiece import WordPieceTokenizer

    register("bpe", BPETokenizer)
    register("wordpiece", WordPieceTokenizer)
    register("char", CharTokenizer)
    register("spm", SentencePieceBPE)  # GGUF's "llama" vocabularies (tokenizers/spm.py)
    register("bpe-gguf", MissingBytesBPE)  # a GGUF BPE lacking some byte tokens
