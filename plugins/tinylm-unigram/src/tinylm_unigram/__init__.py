"""tinylm-unigram: the Unigram language-model tokenizer (SentencePiece's default) as a
tinylm plugin, registered as the "unigram" tokenizer.

    >>> from tinylm_unigram import UnigramTokenizer
    >>> tok = UnigramTokenizer.from_spm("spiece.model")          # doctest: +SKIP
    >>> tok = UnigramTokenizer.from_hf_json("tokenizer.json")    # doctest: +SKIP
    >>> tok = UnigramTokenizer.train(lines, vocab_size=8000)     # doctest: +SKIP

Installed, it also lets ``tinylm.tokenizers.from_file`` read Unigram tokenizer.json
files (T5, ALBERT, XLNet ...), so Hugging Face folders with one load with their real
tokenizer, and ``tinylm tokenize train --type unigram`` train one.
"""

from tinylm import hookimpl

__version__ = "0.1.0"
__all__ = ["UnigramTokenizer", "register_tokenizers"]


def __getattr__(name):
    if name == "UnigramTokenizer":  # imported lazily: loading plugins stays cheap
        from tinylm_unigram.tokenizer import UnigramTokenizer

        return UnigramTokenizer
    raise AttributeError(name)


@hookimpl
def register_tokenizers(register):
    from tinylm_unigram.tokenizer import UnigramTokenizer

    register("unigram", UnigramTokenizer)
