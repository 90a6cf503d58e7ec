"""Tokenizers: byte-level BPE (GPT-2 / tiktoken / Hugging Face compatible), BERT
WordPiece, and character-level; see docs/tokenizers.md.

    >>> from tinylm.tokenizers import BPETokenizer, from_file
    >>> tok = BPETokenizer.train(["some text", "more text"], vocab_size=300)
    >>> tok.decode(tok.encode("some more"))
    'some more'

The classes are registered in the tokenizer registry (``tinylm.plugins``) under
"bpe", "wordpiece" and "char"; ``from_file`` loads any supported file.
"""

from tinylm.tokenizers.base import Tokenizer, TokenizerError, TokenizerFileError, from_file
from tinylm.tokenizers.bpe import BPETokenizer
from tinylm.tokenizers.char import CharTokenizer
from tinylm.tokenizers.pretokenize import GPT2_PATTERN, GPT4_PATTERN, PreTokenizer
from tinylm.tokenizers.wordpiece import WordPieceConfig, WordPieceTokenizer

__all__ = [
    "Tokenizer", "TokenizerError", "TokenizerFileError", "from_file", "BPETokenizer",
    "WordPieceTokenizer", "WordPieceConfig", "CharTokenizer", "PreTokenizer", "GPT2_PATTERN", "GPT4_PATTERN",
]
