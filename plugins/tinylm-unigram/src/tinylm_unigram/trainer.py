"""Unigram training as SentencePiece's trainer does it (``unigram_model_trainer.cc``,
``trainer_interface.cc``), vectorised over the distinct words of the corpus:

1. Sentences (lines) are normalised (``nmt_nfkc`` by default: see ``rules``), user-
   defined symbols cut out; the characters that cover ``character_coverage`` of the
   text are required, the rest become an unknown mark.
2. Seeds: every character, and the right-maximal repeats of 2 to ``max_piece_length``
   characters (``seeds``), scored ``log(count x length)`` normalised.
3. Sentences are split into words (before each ``▁``) and counted.
4. EM: ``num_sub_iterations`` rounds of an E step (expected counts by
   forward-backward over every word's lattice, ``em``) and the Bayesian M step:
   pieces expected less than 0.5 times go, the others score
   ``digamma(count) - digamma(total)``.
5. Unless the vocabulary is down to 1.1 x ``vocab_size``, prune: a piece whose best
   segmentation as a word is itself, with an alternative segmentation, loses
   ``F * (log p(piece) - sum log p(alternatives))`` of likelihood when removed (F: its
   Viterbi frequency); keep the pieces that have no alternative and the highest-loss
   rest, ``shrinking_factor`` of the vocabulary (at least 1.1 x ``vocab_size``); back
   to 4.
6. Finalise: the required characters, then the best-scored pieces up to
   ``vocab_size`` with the meta pieces (``<unk>``, ``<s>``, ``</s>``, control and
   user-defined symbols, 256 byte pieces with ``byte_fallback``).

Scores are rounded to float32 at the end, as a ``.model`` stores them, so that the
trained tokenizer encodes exactly as SentencePiece would with the same file.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from tinylm.tokenizers import TokenizerError

from tinylm_unigram import charsmap, em, lattice, rules
from tinylm_unigram.normalize import SpmNormalizer
from tinylm_unigram.seeds import BOUNDARY, END, UNK_CHAR, WS, seed_pieces
from tinylm_unigram.spm_model import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, SpmModel

DEFAULTS = dict(character_coverage=0.9995, max_piece_length=16, num_sub_iterations=2,
                shrinking_factor=0.75, seed_sentencepiece_size=1_000_000, byte_fallback=False,
                split_by_unicode_script=True, normalization="nmt_nfkc", add_dummy_prefix=True,
                remove_extra_whitespaces=True, max_sentence_length=4192, user_defined_symbols=(),
                unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>")


def digamma(x: np.ndarray) -> np.ndarray:
    """SentencePiece's digamma: the recurrence up to 7, then the asymptotic series."""
    x = np.asarray(x, dtype=np.float64).copy()
    result = np.zeros_like(x)
    for _ in range(7):
        small = x < 7
        if not small.any():
            break
        result[small] -= 1.0 / x[small]
        x[small] += 1.0
    x -= 0.5
    xx = 1.0 / x
    xx2 = xx * xx
    xx4 = xx2 * xx2
    return (result + np.log(x) + (1.0 / 24.0) * xx2 - (7.0 / 960.0) * xx4
            + (31.0 / 8064.0) * xx4 * xx2 - (127.0 / 30720.0) * xx4 * xx4)


def train(cls, texts, vocab_size: int, *, special_tokens=(), progress=None, **options):
    """A ``cls`` (UnigramTokenizer) trained on ``texts``; options: ``DEFAULTS``
    (``unk_token`` names ``unk_piece``; options left at None, as ``tinylm tokenize
    train`` passes the flags it has, are ignored). ``progress``: a callable taking
    one line, or True for lines on stderr."""
    options = {k: v for k, v in options.items() if v is not None}
    if "unk_token" in options:
        options["unk_piece"] = options.pop("unk_token")
    if progress is True:
        import sys

        progress = lambda line: print(line, file=sys.stderr)  # noqa: E731
    elif not callable(progress):
        progress = None
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TokenizerError(f"unknown Unigram training option(s) {', '.join(sorted(unknown))}; "
                             f"the options are: {', '.join(DEFAULTS)}")
    opt = {**DEFAULTS, **options}
    if isinstance(texts, str):
        texts = [texts]
    meta = _meta_pieces(opt, list(special_tokens))
    spm = _spec(opt)
    normalizer = SpmNormalizer(charsmap.cached(spm.precompiled_charsmap),
                               add_dummy_prefix=spm.add_dummy_prefix,
                               remove_extra_whitespaces=spm.remove_extra_whitespaces,
                               user_defined=[p for p, t in meta if t in (USER_DEFINED, CONTROL)])
    sentences = _load_sentences(texts, normalizer, opt)
    if not sentences:
        raise TokenizerError("no text to train on: every line was empty after normalisation")
    text, sep = _joined(sentences)
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    uniq, counts = np.unique(cps, return_counts=True)
    chars = dict(zip(map(chr, uniq.tolist()), counts.tolist()))
    del chars[sep]
    chars.pop(BOUNDARY, None)
    required = _required_chars(chars, opt["character_coverage"])
    if len(required) + len(meta) >= vocab_size:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: the text needs "
                             f"{len(required)} characters and {len(meta)} meta pieces; raise "
                             f"vocab_size or lower character_coverage")
    text = _mark_rare(text, set(chars) - set(required))
    keyed, keyed_freqs = _words(text, sep)
    pieces, scores = _seeds(keyed, keyed_freqs, required, opt)
    words, freqs = _merge_followers(keyed, keyed_freqs)
    final = _em(pieces, scores, words, freqs, required, vocab_size, len(meta), opt, progress)
    return _assemble(cls, meta, final, spm)


# ---------------------------------------------------------------------- input


def _meta_pieces(opt, special_tokens) -> list:
    meta = [(opt["unk_piece"], UNKNOWN), (opt["bos_piece"], CONTROL), (opt["eos_piece"], CONTROL)]
    meta += [(t, CONTROL) for t in special_tokens]
    meta += [(t, USER_DEFINED) for t in opt["user_defined_symbols"]]
    if opt["byte_fallback"]:
        meta += [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    seen = set()
    for piece, _ in meta:
        if not piece or piece in seen:
            raise TokenizerError(f"the meta piece {piece!r} is empty or given twice")
        seen.add(piece)
    return meta


def _spec(opt) -> SpmModel:
    name = opt["normalization"]
    blob = rules.charsmap_blob(name)
    return SpmModel([], [], [], byte_fallback=bool(opt["byte_fallback"]), normalizer_name=name,
                    precompiled_charsmap=blob, add_dummy_prefix=bool(opt["add_dummy_prefix"]),
                    remove_extra_whitespaces=bool(opt["remove_extra_whitespaces"]))


def _load_sentences(texts, normalizer: SpmNormalizer, opt) -> list:
    """Normalised lines, with the meta symbols cut out as boundaries (``\t``)."""
    meta = normalizer.user_defined
    limit = opt["max_sentence_length"]
    lines = []
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerError(f"train takes strings, not {type(text).__name__}")
        lines += [line for line in text.split("\n") if line]
    # SentencePiece skips over-long lines and ones with its mark
    if any(UNK_CHAR in text for text in texts):
        lines = [line for line in lines if UNK_CHAR not in line]
    if lines and max(map(len, lines)) * 4 > limit:
        lines = [line for line in lines if len(line.encode("utf-8")) <= limit]
    out = normalizer.normalize_lines(lines)
    if meta:
        text, sep = _joined(out)
        if any(sep in m for m in meta):
            out = [re.sub("|".join(map(re.escape, meta)), BOUNDARY, t) for t in out]
        else:
            out = re.sub("|".join(map(re.escape, meta)), BOUNDARY, text).split(sep)[:-1]
    return [t for t in out if t]


def _joined(sentences: list) -> tuple:
    """``(text, sep)``: the sentences as one string, each followed by ``sep``, a
    character in none of them (``\n`` unless normalisation made one)."""
    whole = "".join(sentences)
    sep = next(c for c in map(chr, [10] + list(range(0xE000, 0xF900))) if c not in whole)
    return sep.join(sentences) + sep, sep


def _required_chars(counts: dict, coverage: float) -> dict:
    total = sum(counts.values())
    required, covered = {}, 0
    for ch, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if covered / total >= coverage:
            break
        covered += c
        required[ch] = c
    return required


def _mark_rare(text: str, rare: set) -> str:
    """``text`` with the characters outside the coverage replaced by ``UNK_CHAR``."""
    if not rare:
        return text
    return re.sub("[" + "".join(map(re.escape, sorted(rare))) + "]", UNK_CHAR, text)


def _words(text: str, sep: str) -> tuple:
    """Words with the character after them (``▁`` or ``END``), counted: the seeds'
    input; the EM's words are the same without that character. ``text``: sentences,
    each followed by ``sep``; a word starts at a sentence's start or at each ``▁``.
    (Two scans, one per next character; their order does not matter downstream.)"""
    body = f"{WS}?[^{re.escape(WS + sep)}]*"
    words, freqs = [], []
    for pattern, mark in ((f"({body})(?={WS})", WS), (f"({body}){re.escape(sep)}", END)):
        counts = Counter(re.findall(pattern, text))
        counts.pop("", None)  # the empty match before a ▁ that starts a word
        words += [w + mark for w in counts]
        freqs += counts.values()
    return words, np.array(freqs, dtype=np.int64)


def _seeds(words: list, freqs: np.ndarray, required: dict, opt) -> tuple:
    """The seed pieces and their initial scores (log of count x length, normalised):
    the characters left after ``_mark_rare`` (the required ones) and the substrings."""
    found = sorted(required.items(), key=lambda kv: (-kv[1], kv[0]))
    found += seed_pieces(words, freqs, max_piece_length=opt["max_piece_length"],
                         seed_size=opt["seed_sentencepiece_size"],
                         split_by_unicode_script=opt["split_by_unicode_script"])
    counts = np.array([n for _, n in found], dtype=np.float64)
    return [p for p, _ in found], np.log(counts) - np.log(counts.sum())


def _merge_followers(words: list, freqs: np.ndarray) -> tuple:
    merged = Counter()
    for w, f in zip(words, freqs.tolist()):
        merged[w[:-1]] += f
    ordered = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ordered], np.array([f for _, f in ordered], dtype=np.float64)


# ---------------------------------------------------------------------- EM


def _em(pieces, scores, words, freqs, required, vocab_size, n_meta, opt, progress) -> list:
    desired = int(vocab_size * 1.1)
    corpus = em.WordLattices(words, lattice.PieceIndex(pieces))  # searched once
    splits = None  # the pieces' own lattices (for pruning), searched once when first needed
    while True:
        for _ in range(opt["num_sub_iterations"]):
            expected, objective = corpus.expected_counts(scores, freqs, len(pieces))
            keep, scores = _m_step(expected)
            pieces, corpus, splits = _keep(pieces, corpus, splits, keep)
            if progress is not None:
                progress(f"EM: {len(pieces)} pieces, objective {objective:.4f}")
        if len(pieces) <= desired:
            break
        if splits is None:
            splits = em.WordLattices(pieces, lattice.PieceIndex(pieces), skip_whole=True)
        keep = _prune(pieces, scores, corpus, splits, freqs, desired, opt["shrinking_factor"])
        pieces, corpus, splits = _keep(pieces, corpus, splits, keep)
        scores = scores[keep]
    return _finalize(pieces, scores, required, vocab_size - n_meta)


def _keep(pieces: list, corpus: em.WordLattices, splits, keep: np.ndarray) -> tuple:
    """The pieces at the indices ``keep`` (in that order), the corpus lattice under
    them and (once made) the pieces' own lattices under them."""
    new_id = np.full(len(pieces), -1, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    if splits is not None:
        splits = splits.subset(new_id, words=True)
    return [pieces[i] for i in keep.tolist()], corpus.subset(new_id), splits


def _m_step(expected: np.ndarray) -> tuple:
    """Keep the pieces expected at least 0.5 times (their indices); they score
    digamma(n) - digamma(sum)."""
    keep = np.flatnonzero(expected >= 0.5)
    kept = expected[keep]
    return keep, digamma(kept) - digamma(np.array([kept.sum()]))[0]


def _prune(pieces, scores, corpus, alt, freqs, desired: int, shrinking: float) -> np.ndarray:
    """SentencePiece's ``PruneSentencePieces`` (see the module docstring), vectorised:
    the indices of the pieces kept, in their new order. ``alt``: the pieces' own
    lattices without their whole-word edge (``skip_whole``)."""
    n = len(pieces)
    # each piece's best segmentation into other pieces (its own word, itself left out)
    alt_edges, alt_owner, alt_best = alt.best_paths(scores)
    single = np.array([len(p) == 1 for p in pieces])
    has_alt = np.isfinite(alt_best) & ~single
    removable = has_alt & (alt_best > scores)  # its Viterbi path is split: remove
    # the Viterbi frequency of each piece over the corpus
    edges, owner, _ = corpus.best_paths(scores)
    ids = corpus.ids[edges]
    known = ids >= 0
    freq = np.bincount(ids[known], weights=freqs[owner[known]], minlength=n)
    vsum = freqs.sum()
    total = freq.sum()
    logsum = np.log(total)
    # alternatives: ids of each piece's best split (unknown edges count as frequency 0)
    alt_ids = alt.ids[alt_edges]
    alt_freq = np.where(alt_ids >= 0, freq[np.maximum(alt_ids, 0)], 0.0)
    n_alt = np.bincount(alt_owner, minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):  # freq 0: removed below anyway
        logsum_alt = np.log(total + freq * (n_alt - 1))
        logprob_alt = np.bincount(alt_owner, weights=np.log(alt_freq + freq[alt_owner])
                                  - logsum_alt[alt_owner], minlength=n)
        logprob_sp = np.log(freq) - logsum
        loss = (freq / vsum) * (logprob_sp - logprob_alt)
    kept_always = (freq > 0) & ~removable & ~has_alt
    candidate = (freq > 0) & ~removable & has_alt
    size = max(desired, int(shrinking * n))
    keep = list(np.flatnonzero(kept_always))
    cand = np.flatnonzero(candidate)
    order = cand[np.lexsort((cand, -loss[cand]))]
    keep += list(order[: max(0, size - len(keep))])
    return np.array(keep, dtype=np.int64)


def _finalize(pieces, scores, required: dict, size: int) -> list:
    """The required characters, then the best-scored pieces: ``[(piece, score)]``."""
    have = dict(zip(pieces, scores.tolist()))
    min_score = float(scores.min())
    final, penalty = {}, 0.0
    for ch, _ in sorted(required.items(), key=lambda kv: (-kv[1], kv[0])):
        if ch in have:
            final[ch] = have[ch]
        else:
            final[ch] = min_score + penalty
            penalty += 0.0001
    for p, s in sorted(have.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(final) >= size:
            break
        final.setdefault(p, s)
    return sorted(final.items(), key=lambda kv: (-kv[1], kv[0]))


def _assemble(cls, meta: list, final: list, spm: SpmModel):
    pieces = [p for p, _ in meta] + [p for p, _ in final]
    types = [t for _, t in meta] + [NORMAL] * len(final)
    scores = [0.0] * len(meta) + np.array([s for _, s in final], np.float32).astype(float).tolist()
    spm.pieces, spm.scores, spm.types = pieces, scores, types
    return cls(pieces, scores, types, spm=spm)
