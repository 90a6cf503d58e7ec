"""Learning byte-level BPE merges, the way Hugging Face ``tokenizers`` does.

Training never looks at the raw text twice: it cuts the text into pre-tokens, counts
the distinct ones (tinyshakespeare's 1.1 MB is about 300,000 pre-tokens but only
15,000 distinct words), and works on those words with their frequencies.

The merge loop is incremental, as in ``tokenizers``' BpeTrainer:

1. count every adjacent pair of symbols over the distinct words (times the word's
   frequency) and remember, for each pair, the words it occurs in;
2. pop the most frequent pair from a heap; merge it into a new token inside the words
   that contain it, and only those; each merge changes a few neighbouring pair counts
   (merging ``l l`` in ``h e l l o`` takes one from ``e l`` and ``l o`` and gives one to
   ``e ll`` and ``ll o``);
3. push the pairs that appeared; stale heap entries (whose count has gone down since)
   are re-pushed with their current count when they surface. Repeat until the
   vocabulary is full or the best pair is rarer than ``min_frequency``.

A worked example, words ``{"hug": 10, "pug": 5, "hugs": 5}``: the pair ``u g`` occurs
20 times (10 + 5 + 5), more than any other, so the first merge is ``u g -> ug``; then
``h ug`` (15 times) wins, giving ``hug``.

Tie-breaking, the detail that decides whether two trainers agree: when several pairs
have the same count, the one with the smallest ``(left id, right id)`` wins, ids being
vocabulary ids, with the special tokens first, then the 256 bytes in GPT-2's
character order, then tokens in the order they were made. That is ``tokenizers``'
rule (its heap orders equal counts by ascending pair), and with the same ids the
merges come out identical; ``tests/test_tokenizers_bpe.py`` checks it on
tinyshakespeare. Where a merge makes a string that is already a token (``a bc`` after
``ab c``), the existing id is reused and the merge still recorded, as ``tokenizers``
does.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

from tinylm.tokenizers.base import TokenizerError, _alternation, check_text, surrogate_error
from tinylm.tokenizers.formats import BYTE_ORDER, TEXT_FILE_HINT, decode_text, read_bytes


def count_words(texts, pretokenizer, special_tokens=()) -> Counter:
    """``Counter`` of the pre-tokens of each text (special tokens cut out first).

    ``texts``: a str, or an iterable of str (each pre-tokenized as a whole, like
    ``tokenizers``' ``train_from_iterator``)."""
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (bytes, bytearray)) or not hasattr(texts, "__iter__"):
        raise TokenizerError(f"train takes a str or an iterable of str, not "
                             f"{type(texts).__name__}")
    counts = Counter()
    cut = _alternation(special_tokens).split if special_tokens else None
    split = pretokenizer.split
    for text in texts:
        check_text(text)
        for segment in cut(text) if cut else (text,):
            counts.update(split(segment))
    return counts


def count_file_words(paths, pretokenizer, special_tokens=(), progress=None) -> Counter:
    """``Counter`` of the pre-tokens of files read line by line (a line keeps its
    ``\\n``), exactly as ``tokenizers``' ``train(files)`` cuts them."""
    counts = Counter()
    cut = _alternation(special_tokens).split if special_tokens else None
    split = pretokenizer.split
    for path in paths:
        data = read_bytes(path, "text file")
        text = decode_text(data, path, TEXT_FILE_HINT)  # a leading byte order mark dropped
        lines = text.split("\n")
        last = lines.pop()
        pieces = []
        extend = pieces.extend
        for line in lines:
            line += "\n"
            if cut:
                for segment in cut(line):
                    extend(split(segment))
            else:
                extend(split(line))
        if last:
            for segment in cut(last) if cut else (last,):
                extend(split(segment))
        counts.update(pieces)
        if progress is not None:
            progress.update(len(data))
    return counts


def learn_merges(word_counts, vocab_size: int, *, min_frequency: int = 0,
                 special_tokens=(), progress: bool = False) -> tuple:
    """Learn merges from ``{word: count}``.

    Returns ``(tokens, merges, specials)``: ``tokens[id]`` is the bytes of every
    non-special token (None at special ids), ``merges`` the learned ``(left id,
    right id)`` pairs in order, ``specials`` ``{text: id}``. ``vocab_size`` counts
    special tokens, the 256 bytes and the merged tokens.
    """
    specials, tokens, byte_id = _initial_vocabulary(special_tokens, vocab_size)
    token_id = {t: i for i, t in enumerate(tokens) if t is not None}
    words, freqs = _symbol_words(word_counts, byte_id)
    pairs = _PairCounts(words, freqs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=vocab_size - len(tokens), desc="merges", unit="merge",
                   leave=False, mininterval=0.2)
    merges = []
    n_tokens = len(tokens)
    while n_tokens < vocab_size:
        pair, count = pairs.pop_best()
        if pair is None or count < 1 or count < min_frequency:
            break
        merged = tokens[pair[0]] + tokens[pair[1]]
        new = token_id.get(merged)
        if new is None:  # else an existing token, made again: reuse its id
            new = len(tokens)
            tokens.append(merged)
            token_id[merged] = new
            n_tokens += 1
            if bar is not None:
                bar.update()
        merges.append(pair)
        pairs.merge(pair, new)
    if bar is not None:
        bar.close()
    return tokens, merges, specials


def _initial_vocabulary(special_tokens, vocab_size: int) -> tuple:
    """``(specials, tokens, byte_id)``: the special tokens' ids (first), the token table
    (None at special ids, then the 256 bytes in GPT-2's character order) and each
    byte's id."""
    specials = {}
    for token in special_tokens:
        specials.setdefault(token, len(specials))
    tokens = [None] * len(specials) + [bytes([b]) for b in BYTE_ORDER]
    if vocab_size < len(tokens):
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level BPE has "
                             f"256 byte tokens plus {len(specials)} special token(s), so at "
                             f"least {len(tokens)}")
    byte_id = [0] * 256
    for i, b in enumerate(BYTE_ORDER):
        byte_id[b] = len(specials) + i
    return specials, tokens, byte_id


def _symbol_words(word_counts, byte_id: list) -> tuple:
    """``(words, freqs)``: the distinct words as lists of byte ids, and their counts;
    one-byte words, which have no pairs, are left out."""
    words, freqs = [], []
    for word, count in word_counts.items():
        try:
            data = word.encode("utf-8")
        except UnicodeEncodeError:
            raise surrogate_error(word) from None
        if len(data) > 1:
            words.append([byte_id[b] for b in data])
            freqs.append(count)
    return words, freqs


class _PairCounts:
    """The adjacent-pair counts of the words, kept current as merges are applied:
    ``counts[pair]`` (times the words' frequencies), ``where[pair]`` (the indices of
    the words it occurs in) and a heap of ``(-count, pair)`` whose stale entries are
    fixed when they surface."""

    def __init__(self, words: list, freqs: list):
        self.words, self.freqs = words, freqs
        self.counts = defaultdict(int)
        self.where = defaultdict(set)
        for wi, word in enumerate(words):
            f = freqs[wi]
            for pair in zip(word, word[1:]):
                self.counts[pair] += f
                self.where[pair].add(wi)
        # Max-heap on count, then min-heap on the pair: (-count, pair).
        self.heap = [(-c, pair) for pair, c in self.counts.items() if c > 0]
        heapq.heapify(self.heap)

    def pop_best(self) -> tuple:
        """``(pair, count)`` of the most frequent pair (the smallest pair on a tie), or
        ``(None, 0)`` when no pair is left."""
        heap, counts = self.heap, self.counts
        while heap:
            negative, pair = heapq.heappop(heap)
            count = counts[pair]
            if -negative == count:
                return pair, count
            heapq.heappush(heap, (-count, pair))  # stale: its count went down since
        return None, 0

    def merge(self, pair: tuple, new: int) -> None:
        """Replace ``pair`` by the token ``new`` in every word that has it, updating the
        counts of the neighbouring pairs, and push the pairs it formed."""
        a, b = pair
        counts, words, freqs = self.counts, self.words, self.freqs
        created = defaultdict(set)  # pairs this merge formed -> words they formed in
        for wi in self.where.pop(pair, ()):
            word = words[wi]
            f = freqs[wi]
            i = 0
            try:
                while True:
                    i = word.index(a, i)
                    if i + 1 < len(word) and word[i + 1] == b:
                        if i:
                            left = word[i - 1]
                            counts[left, a] -= f
                            counts[left, new] += f
                            created[left, new].add(wi)
                        word[i] = new
                        del word[i + 1]
                        if i + 1 < len(word):
                            right = word[i + 1]
                            counts[b, right] -= f
                            counts[new, right] += f
                            created[new, right].add(wi)
                    i += 1
            except ValueError:  # no more `a` in this word
                pass
        for new_pair, in_words in created.items():
            c = counts[new_pair]
            if c > 0:
                heapq.heappush(self.heap, (-c, new_pair))
            known = self.where.get(new_pair)
            if known is None:
                self.where[new_pair] = in_words
            else:
                known |= in_words
