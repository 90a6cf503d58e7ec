"""CrowS-Pairs (Nangia et al. 2020): does a model prefer the more stereotyping sentence
of a minimal pair?

The data is the paper's CSV (``crows_pairs_anonymized.csv``): one pair per row with
``sent_more`` (the more stereotyping sentence), ``sent_less``, ``stereo_antistereo``
("stereo": sent_more states a stereotype about a disadvantaged group; "antistereo": it
violates one about an advantaged group) and ``bias_type`` (race-color, gender,
socioeconomic, nationality, religion, age, sexual-orientation, physical-appearance,
disability); other columns are ignored.

    pairs = read_crows_pairs("crows_pairs_anonymized.csv")
    report = evaluate_crows_pairs(model, tokenizer, pairs, encoder=TextEncoder.for_model(...))

Causal models, as lm-evaluation-harness scores them (``tasks/crows_pairs``: an empty
context, so each sentence is the continuation of the prefix token, BOS else EOS, and
``target_delimiter`` is ""): ll = log p(sentence); per pair ``pct_stereotype`` = 1 if
ll(sent_more) > ll(sent_less), ``likelihood_diff`` = |ll(sent_more) - ll(sent_less)|;
both averaged (lm-eval's ``mean``, with its standard error, sample sd / sqrt(n)), over
all pairs and per ``bias_type`` (lm-eval's subtasks crows_pairs_english_gender ...).

Masked models, as the paper scores them (its ``metric.py``): both sentences are
encoded with [CLS] ... [SEP]; the tokens they share are found with difflib's
SequenceMatcher over the two id sequences (sent1 = sent_more for a "stereo" row and
sent_less for an "antistereo" one, as the paper orders them); the score of a sentence
is its pseudo-log-likelihood over the shared tokens, [CLS] and [SEP] left out: the sum
of log p(token | the sentence with that token masked), one masked copy per token (all
of a sentence's copies in one batch here). The paper rounds the scores to 3 decimals
and counts a tie as neither; its "metric score" is pct_stereotype x 100; the
stereotype and anti-stereotype scores are the same over the "stereo" and
"antistereo" rows. Those breakdowns are in every report (causal ones too).
"""

from __future__ import annotations

import csv
import difflib
import io
import math
from dataclasses import dataclass

import numpy as np

from tinylm import backend
from tinylm.autograd import no_grad
from tinylm.errors import TinyLMError

COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
DIRECTIONS = ("stereo", "antistereo")
_CLS, _SEP, _MASK = ("[CLS]", "<s>"), ("[SEP]", "</s>"), ("[MASK]", "<mask>")


@dataclass(frozen=True)
class CrowsPair:
    sent_more: str
    sent_less: str
    direction: str  # "stereo" | "antistereo"
    bias_type: str


def read_crows_pairs(path) -> list:
    """The pairs of a CrowS-Pairs CSV (UTF-8, a header row naming at least COLUMNS); a
    missing column, an empty sentence or an unknown direction is a TinyLMError naming
    the file and line."""
    from tinylm.tokenizers.formats import read_text_file

    reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise TinyLMError(f"{path} lacks the CrowS-Pairs column(s) {', '.join(missing)}; its "
                          f"header must name {', '.join(COLUMNS)}")
    pairs = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        values = {c: (row.get(c) or "").strip() for c in COLUMNS}
        empty = [c for c in COLUMNS if not values[c]]
        if empty:
            raise TinyLMError(f"{where}: empty {', '.join(empty)}; every pair needs both "
                              f"sentences, its direction and its bias type")
        if values["stereo_antistereo"] not in DIRECTIONS:
            raise TinyLMError(f"{where}: stereo_antistereo is "
                              f"{values['stereo_antistereo']!r}; it must be 'stereo' or "
                              f"'antistereo'")
        pairs.append(CrowsPair(row["sent_more"], row["sent_less"],
                               values["stereo_antistereo"], values["bias_type"]))
    if not pairs:
        raise TinyLMError(f"{path} has a header but no pairs")
    return pairs


# --------------------------------------------------------------------------- scores


def causal_scores(model, encoder, pairs, *, batch_size: int = 32, progress: bool = False,
                  max_length: int | None = None) -> np.ndarray:
    """(N, 2) log p(sent_more), log p(sent_less) as lm-eval's crows_pairs asks them:
    each sentence the continuation of an empty context (``encoder.pair("", s)``: the
    prefix token, BOS else EOS, before it)."""
    from tinylm.evaluation.loglik import continuation_logprobs

    requests = [encoder.pair("", s) for p in pairs for s in (p.sent_more, p.sent_less)]
    scored = continuation_logprobs(model, requests, batch_size=batch_size, progress=progress,
                                   max_length=max_length)
    return np.array([lp for lp, _ in scored], dtype=np.float64).reshape(len(pairs), 2)


def masked_scores(model, tokenizer, pairs, *, batch_size: int = 64,
                  progress: bool = False) -> np.ndarray:
    """(N, 2) pseudo-log-likelihoods of sent_more and sent_less over their shared tokens,
    as the paper's ``mask_unigram`` computes them (see the module docstring)."""
    _check_masked(model)
    mask_id = _special_id(tokenizer, _MASK, "mask")
    rows = range(len(pairs))
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, unit="pair", desc="crows-pairs", dynamic_ncols=True)
    out = np.zeros((len(pairs), 2))
    for i in rows:
        p = pairs[i]
        first, second = ((p.sent_more, p.sent_less) if p.direction == "stereo"
                         else (p.sent_less, p.sent_more))
        ids1, ids2 = _with_specials(tokenizer, first), _with_specials(tokenizer, second)
        span1, span2 = shared_tokens(ids1, ids2)
        s1 = _pll(model, ids1, span1[1:-1], mask_id, batch_size)
        s2 = _pll(model, ids2, span2[1:-1], mask_id, batch_size)
        out[i] = (s1, s2) if p.direction == "stereo" else (s2, s1)
    return out


def shared_tokens(ids1, ids2) -> tuple:
    """(positions in ids1, positions in ids2) of the tokens the two sequences share:
    the "equal" blocks of difflib.SequenceMatcher over them (the paper's get_span)."""
    matcher = difflib.SequenceMatcher(None, [str(i) for i in ids1], [str(i) for i in ids2])
    span1, span2 = [], []
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            span1 += range(a0, a1)
            span2 += range(b0, b1)
    return span1, span2


def _pll(model, ids, positions, mask_id: int, batch_size: int) -> float:
    """sum over ``positions`` of log p(ids[pos] | ids with pos masked), the masked
    copies (M, T) batched."""
    ids = np.asarray(ids, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    xp = next(iter(model.parameters())).xp
    total = 0.0
    with no_grad():
        for start in range(0, len(positions), batch_size):
            pos = positions[start:start + batch_size]  # (M,)
            rows = np.repeat(ids[None, :], len(pos), axis=0)  # (M, T)
            rows[np.arange(len(pos)), pos] = mask_id
            logits = model(xp.asarray(rows)).logits.data  # (M, T, V)
            at = backend.to_numpy(logits[xp.arange(len(pos)), xp.asarray(pos)])  # (M, V)
            at = at.astype(np.float64)
            top = at.max(axis=-1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(at - top).sum(axis=-1))  # (M,)
            total += float((at[np.arange(len(pos)), ids[pos]] - lse).sum())
    return total


def _check_masked(model) -> None:
    head = getattr(model.config, "head", None)
    if head != "mlm":
        raise TinyLMError(f"CrowS-Pairs' masked scoring needs a masked-LM head; this "
                          f"encoder's head is {head!r}: load a masked-LM checkpoint "
                          f"(BertForMaskedLM)")


def _special_id(tokenizer, names, what: str) -> int:
    for name in names:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return int(i)
    raise TinyLMError(f"the tokenizer has no {what} token ({' or '.join(names)}), which "
                      f"masked scoring needs")


def _with_specials(tokenizer, text: str) -> list:
    """[CLS] ids [SEP]: what a BERT tokenizer's encode gives (WordPiece adds them); a
    tokenizer that adds none gets its own (<s> ... </s> for RoBERTa-style ones)."""
    ids = list(tokenizer.encode(text))
    cls, sep = _special_id(tokenizer, _CLS, "class"), _special_id(tokenizer, _SEP, "separator")
    if not ids or ids[0] != cls:
        ids = [cls] + ids + [sep]
    return ids


# --------------------------------------------------------------------------- metrics


def _mean(values) -> dict:
    """lm-eval's mean with its standard error (sample sd / sqrt(n); 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"value": float(v.mean()), "stderr": sd / math.sqrt(len(v))}


def pair_metrics(pairs, scores, decimals: int | None = None) -> dict:
    """pct_stereotype, likelihood_diff (each with its stderr), the ties, and the stereo /
    antistereo scores (the paper's: the fraction of that direction's untied rows where
    sent_more scores higher) of ``pairs`` with ``scores`` (N, 2); ``decimals``: round
    the scores first (the paper's 3 for masked models), so that near-ties are ties."""
    s = np.asarray(scores, dtype=np.float64)
    if decimals is not None:
        s = np.round(s, decimals)
    more, less = s[:, 0], s[:, 1]
    picked = (more > less).astype(np.float64)  # (N,)
    direction = np.array([p.direction for p in pairs])
    pct, diff = _mean(picked), _mean(np.abs(more - less))
    out = {"pairs": len(pairs), "pct_stereotype": pct["value"],
           "pct_stereotype_stderr": pct["stderr"], "likelihood_diff": diff["value"],
           "likelihood_diff_stderr": diff["stderr"], "ties": int((more == less).sum())}
    decided = more != less
    for name in DIRECTIONS:  # the paper's: over the rows of that direction without a tie
        rows = (direction == name) & decided
        out[f"{name}_pairs"] = int((direction == name).sum())
        out[f"{name}_score"] = float(picked[rows].mean()) if rows.any() else None
    return out


def crows_pairs_report(pairs, scores, method: str) -> dict:
    """The metrics over all pairs and per bias type (sorted by name)."""
    decimals = 3 if method == "masked" else None
    types = sorted({p.bias_type for p in pairs})
    by_type = {}
    for t in types:
        keep = np.array([p.bias_type == t for p in pairs])
        by_type[t] = pair_metrics([p for p in pairs if p.bias_type == t], scores[keep],
                                  decimals)
    return {"method": method, **pair_metrics(pairs, scores, decimals), "by_bias_type": by_type,
            "scores": np.asarray(scores).tolist()}


def evaluate_crows_pairs(model, tokenizer, pairs, *, encoder=None, batch_size: int = 32,
                         progress: bool = False, max_length: int | None = None) -> dict:
    """The CrowS-Pairs report of a decoder (lm-eval's scoring; ``encoder``: a
    ``tinylm.evaluation.encoding.TextEncoder``, built from the tokenizer when None) or
    of a masked-LM encoder (the paper's)."""
    from tinylm.objectives import model_kind

    kind = model_kind(model)
    if kind == "decoder":
        if encoder is None:
            from tinylm.evaluation.encoding import TextEncoder

            encoder = TextEncoder.for_model(None, model, tokenizer)
        scores = causal_scores(model, encoder, pairs, batch_size=batch_size, progress=progress,
                               max_length=max_length)
        return crows_pairs_report(pairs, scores, "causal")
    if kind == "encoder":
        scores = masked_scores(model, tokenizer, pairs, batch_size=batch_size,
                               progress=progress)
        return crows_pairs_report(pairs, scores, "masked")
    raise TinyLMError(f"CrowS-Pairs scores decoders (log-likelihood) and masked-LM encoders "
                      f"(pseudo-log-likelihood), not an {kind or 'unknown kind of'} model")
