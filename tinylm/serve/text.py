"""A choice's text as its tokens arrive: the same text streamed or returned whole.

    text = ChoiceText(tokenizer, prompt_ids, stop=["\\n\\n"])
    for token in tokens:
        send(text.push(token))        # "" while a character or a stop string is unsure
    send(text.finish())               # what was held back (nothing after a stop)

The bytes of one token are the difference between decoding a few tokens before it
with and without it. Decoding it alone is wrong for SentencePiece tokenizers, which
drop the leading space of the FIRST piece they decode (so every token would lose its
space); with the preceding tokens (the prompt's last ones at first) in front, the
token's bytes are those it has inside the whole text. Special tokens (an eos, chat
markup) are left out, as ``tokenizer.decode(..., skip_special_tokens=True)`` does.

``tinylm.generate.TextStream`` turns those bytes into text: a character split between
tokens waits for its last byte, text that may be the start of a stop string waits
until it is clearly not one, and a stop string ends the text (it and what follows are
never sent). The server sends each ``push`` as a streamed delta and returns their
concatenation as the whole text, so the two always agree.
"""

from __future__ import annotations

from tinylm.generate import TextStream

WINDOW = 4  # tokens of context decoded in front of each new one


class ChoiceText:
    """Incremental detokenization + stop strings for one choice."""

    def __init__(self, tokenizer, context=(), stop=()):
        self.tokenizer = tokenizer
        self.window = [int(t) for t in list(context)[-WINDOW:]]
        self.stream = TextStream(stop)

    def token_bytes(self, token: int) -> bytes:
        """The bytes ``token`` adds after the tokens seen so far."""
        decode = self.tokenizer.decode_bytes
        before = decode(self.window, skip_special_tokens=True)
        after = decode(self.window + [token], skip_special_tokens=True)
        self.window = (self.window + [token])[-WINDOW:]
        if after.startswith(before):
            return after[len(before):]
        return decode([token], skip_special_tokens=True)  # a tokenizer that rewrites context

    def push(self, token: int) -> str:
        """The text that is safe to send after ``token``."""
        return self.stream.feed(self.token_bytes(int(token)))

    @property
    def stopped(self) -> bool:
        """Whether a stop string has appeared (the choice is over)."""
        return self.stream.stopped

    def finish(self) -> str:
        """What is still held back once the choice is over."""
        return self.stream.finish()
