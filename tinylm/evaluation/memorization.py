"""Memorization audits: canaries and their exposure (the Secret Sharer, Carlini et al.
2019) and training-data extraction (Carlini et al. 2022, "Quantifying Memorization
Across Neural Language Models").

Canaries. A format such as ``"my pin is {d}{d}{d}{d}"`` defines a secret space R (here
the 10^4 PINs); ``insert_canaries`` puts random secrets of it into a training text,
each k times (``repeats``), and lists them in a manifest. After training, a canary's
log-perplexity Px (bits, -log2 P of its text after the shared context) is compared with
every other secret's:

    rank     = |{r in R : Px(r) <= Px(canary)}|          (1 for the likeliest)
    exposure = log2 |R| - log2 rank                       (0 .. log2 |R| bits)

computed exactly by scoring all of R when it is small (``exact_limit``), else estimated
from a random sample of R: the sample's log-perplexities are fitted by a skew-normal
(``tinylm.evaluation.skewnorm``) and exposure = -log2 CDF(Px(canary)). A secret the
model has not seen ranks about |R| / 2 (exposure ~1 bit); one it has memorized ranks 1
(log2 |R| bits). When R is scored whole, the skew-normal estimate (fitted to all of
R) is reported beside the exact exposure.

    fmt = SecretFormat.parse("my pin is {d}{d}{d}{d}")
    text, canaries = insert_canaries(text, fmt, [1, 10, 100], seed=0)
    report = canary_exposures(model, tokenizer, fmt, [c.text for c in canaries],
                              options=ExposureOptions(exact_limit=100_000, samples=5000))
    report.results[0].exposure

Scoring: every candidate is encoded with the context before it (``context``, "\\n"
by default: canaries are inserted as lines), the token prefix all candidates share is
the context of one ``tinylm.evaluation.loglik`` request per candidate, the rest its
continuation; requests go in chunks of ``batch_size`` (the shared context is computed
once per chunk and its KV cache copied to each row).

Extraction. A sequence of the training data is extractable with k tokens of context
when greedy decoding from its first k tokens gives its next ``suffix`` (50) tokens
exactly. ``sample_windows`` takes random non-overlapping (k + 50)-token windows of a
token stream; ``extraction`` decodes them in batches and counts exact matches (and how
many leading tokens matched). The same on held-out text is the baseline: a model that
generalises completes common phrases there too, one that memorized its training data
does far better on the training windows.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from tinylm.errors import TinyLMError
from tinylm.evaluation import skewnorm

# the placeholders of a secret format and the characters each stands for
SLOTS = {
    "d": "0123456789",
    "l": "abcdefghijklmnopqrstuvwxyz",
    "u": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "x": "0123456789abcdef",
    "a": "0123456789abcdefghijklmnopqrstuvwxyz",
}
_PLACEHOLDERS = ", ".join(f"{{{k}}}" for k in SLOTS)
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class SecretFormat:
    """A canary format: literal ``parts`` around ``len(parts) - 1`` slots, slot j
    filled by one character of ``alphabets[j]``. A secret is a row of slot indices
    (S,); many secrets are an (N, S) int64 array ("digits" in a mixed radix whose
    place values are the alphabets' sizes, the last slot the fastest)."""

    template: str
    parts: tuple
    alphabets: tuple

    @classmethod
    def parse(cls, template: str) -> "SecretFormat":
        """A format from text with placeholders {d} (digit), {l} / {u} (lower / upper
        case letter), {x} (hex digit), {a} (digit or lower case letter); ``{{`` and
        ``}}`` are literal braces."""
        parts, alphabets, literal, at = [], [], [], 0
        for m in _TOKEN.finditer(template):
            literal.append(template[at:m.start()])
            at = m.end()
            if m.group(0) in ("{{", "}}"):
                literal.append(m.group(0)[0])
            elif m.group(1) in SLOTS:
                parts.append("".join(literal))
                literal = []
                alphabets.append(SLOTS[m.group(1)])
            else:
                raise TinyLMError(f"the canary format {template!r} has {m.group(0)!r}; the "
                                  f"placeholders are {_PLACEHOLDERS} (write {{{{ and }}}} "
                                  f"for literal braces)")
        literal.append(template[at:])
        parts.append("".join(literal))
        if not alphabets:
            raise TinyLMError(f"the canary format {template!r} has no placeholder for the "
                              f"secret; put one or more of {_PLACEHOLDERS} in it")
        return cls(template, tuple(parts), tuple(alphabets))

    @property
    def size(self) -> int:
        """|R|, the number of secrets (a Python int: it may pass 2^63)."""
        return math.prod(len(a) for a in self.alphabets)

    @property
    def radices(self) -> np.ndarray:
        return np.array([len(a) for a in self.alphabets], dtype=np.int64)  # (S,)

    def all_digits(self) -> np.ndarray:
        """Every secret, (|R|, S), in order (``number`` of row i is i)."""
        numbers = np.arange(self.size, dtype=np.int64)  # (N,)
        place = np.cumprod(self.radices[::-1])[::-1]  # (S,) products from slot j on
        place = np.append(place[1:], 1)  # (S,) the place value of each slot
        return (numbers[:, None] // place[None, :]) % self.radices[None, :]

    def number(self, digits) -> np.ndarray:
        """The index of each secret (N, S) in ``all_digits`` order, (N,)."""
        digits = np.atleast_2d(np.asarray(digits, dtype=np.int64))
        out = np.zeros(len(digits), dtype=np.int64)
        for j, r in enumerate(self.radices):
            out = out * r + digits[:, j]
        return out

    def sample(self, n: int, rng) -> np.ndarray:
        """``n`` secrets drawn uniformly (with replacement), (n, S)."""
        return rng.integers(0, self.radices[None, :], size=(n, len(self.alphabets)))

    def render(self, digits) -> list:
        """The canary text of each secret (N, S)."""
        digits = np.atleast_2d(np.asarray(digits, dtype=np.int64))
        text = np.full(len(digits), self.parts[0], dtype=object)
        for j, alphabet in enumerate(self.alphabets):
            chars = np.array(list(alphabet), dtype=object)[digits[:, j]]  # (N,)
            text = text + chars + self.parts[j + 1]
        return text.tolist()

    def digits_of(self, text: str) -> np.ndarray:
        """The secret (S,) whose canary text is ``text``; text of another shape is a
        TinyLMError."""
        pattern = "".join(re.escape(p) + (f"([{re.escape(a)}])" if j < len(self.alphabets)
                                          else "")
                          for j, (p, a) in enumerate(zip(self.parts, self.alphabets + ("",))))
        m = re.fullmatch(pattern, text)
        if m is None:
            raise TinyLMError(f"{text!r} is not a canary of the format {self.template!r}; "
                              f"check the manifest's format and canaries")
        return np.array([a.index(c) for a, c in zip(self.alphabets, m.groups())],
                        dtype=np.int64)

    def secret(self, text: str) -> str:
        """The characters that fill the slots of a canary text."""
        return "".join(a[i] for a, i in zip(self.alphabets, self.digits_of(text)))


# --------------------------------------------------------------------------- insertion


@dataclass(frozen=True)
class Canary:
    """One inserted canary: its text, its secret (the slots' characters) and how many
    times it went into the data."""

    text: str
    secret: str
    repeats: int


def insert_canaries(text: str, fmt: SecretFormat, repeats, *, seed: int = 0,
                    fraction: float = 1.0) -> tuple:
    """(new text, [Canary]): one distinct random secret per entry of ``repeats``,
    inserted that many times as lines of their own, at random line boundaries among
    those in the first ``fraction`` of ``text`` (by characters: keep canaries out of
    the validation split a trainer holds out at the end). A text not ending in a
    newline gets one."""
    repeats = [int(k) for k in repeats]
    if not repeats or min(repeats) < 1:
        raise TinyLMError(f"--repeats takes counts >= 1, got {repeats}")
    if not 0 < fraction <= 1:
        raise TinyLMError(f"the fraction of the text to insert into must be in (0, 1], "
                          f"got {fraction}")
    if len(repeats) > fmt.size:
        raise TinyLMError(f"{len(repeats)} canaries do not fit the {fmt.size} secrets of "
                          f"{fmt.template!r}; add placeholders or insert fewer")
    rng = np.random.default_rng(seed)
    digits = _distinct_secrets(fmt, len(repeats), rng)
    texts = fmt.render(digits)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += "\n"
    starts = np.concatenate([[0], np.cumsum([len(line) for line in lines])])  # (n + 1,)
    slots = int(np.searchsorted(starts, fraction * starts[-1], side="right"))  # boundaries
    owner = np.repeat(np.arange(len(repeats)), repeats)  # (total,) which canary
    where = rng.integers(0, max(slots, 1), size=len(owner))  # (total,) before line `where`
    order = np.lexsort((rng.random(len(owner)), where))
    inserted = [[] for _ in range(len(lines) + 1)]
    for i in order:
        inserted[where[i]].append(texts[owner[i]] + "\n")
    out = []
    for i, line in enumerate(lines):
        out.extend(inserted[i])
        out.append(line)
    out.extend(inserted[len(lines)])
    canaries = [Canary(t, fmt.secret(t), k) for t, k in zip(texts, repeats)]
    return "".join(out), canaries


def _distinct_secrets(fmt: SecretFormat, n: int, rng) -> np.ndarray:
    """``n`` distinct random secrets (n, S)."""
    if fmt.size <= 4 * n:
        pick = rng.permutation(fmt.size)[:n]
        return fmt.all_digits()[pick]
    while True:
        digits = fmt.sample(n, rng)
        if len(np.unique(digits, axis=0)) == n:
            return digits


def manifest(fmt: SecretFormat, canaries, *, seed: int, data=None, context: str = "\n") -> dict:
    """The JSON record of an insertion, read back by ``read_manifest``."""
    return {"format": fmt.template, "secret_space": str(fmt.size), "context": context,
            "seed": seed, "data": data, "canaries": [asdict(c) for c in canaries]}


def read_manifest(data: dict, path: str = "the manifest") -> tuple:
    """(SecretFormat, [Canary], context) of a manifest dict; a missing or malformed
    field is a TinyLMError naming it."""
    if not isinstance(data, dict) or not isinstance(data.get("format"), str):
        raise TinyLMError(f"{path} has no canary 'format'; pass the manifest "
                          f"`tinylm audit canaries insert` wrote")
    fmt = SecretFormat.parse(data["format"])
    rows = data.get("canaries")
    if not isinstance(rows, list) or not rows:
        raise TinyLMError(f"{path} lists no 'canaries'; pass the manifest `tinylm audit "
                          f"canaries insert` wrote")
    canaries = []
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise TinyLMError(f"{path}: a canary without its 'text': {row!r}")
        k = row.get("repeats")
        canaries.append(Canary(row["text"], fmt.secret(row["text"]),
                               int(k) if isinstance(k, int) else 0))
    context = data.get("context", "\n")
    if not isinstance(context, str):
        raise TinyLMError(f"{path}: 'context' must be text, got {context!r}")
    return fmt, canaries, context


# --------------------------------------------------------------------------- scoring


def text_logprobs(model, tokenizer, texts, *, context: str = "\n", batch_size: int = 256,
                  progress: bool = False) -> np.ndarray:
    """log p (nats, float64) of each text after ``context``, (N,): every ``context +
    text`` encoded, the tokens all of them start with taken as the shared context
    (each text keeps at least one token to score), the rest scored. A text the
    tokenizer cannot encode (a character level one that never saw a digit) has
    probability 0: -inf."""
    from tinylm.evaluation.loglik import score_requests

    ids = [_encode_or_none(tokenizer, context + t) for t in texts]
    known = [i for i, r in enumerate(ids) if r is not None]
    out = np.full(len(ids), -np.inf)
    if not known:
        return out
    shared = _shared_prefix([ids[i] for i in known])
    chunks = range(0, len(known), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, unit="batch", desc="secrets", dynamic_ncols=True)
    for start in chunks:
        rows = known[start:start + batch_size]
        requests = [(ids[i][:shared], ids[i][shared:]) for i in rows]
        out[rows] = [lp.sum() for lp, _ in score_requests(model, requests, batch_size)]
    return out


def _encode_or_none(tokenizer, text: str):
    from tinylm.tokenizers import TokenizerError

    try:
        return tokenizer.encode(text)
    except TokenizerError:
        return None


def _shared_prefix(ids) -> int:
    """How many leading tokens every row of ``ids`` has in common, leaving each at
    least one token; none in common is a TinyLMError."""
    shared = min(len(r) for r in ids) - 1
    first = np.asarray(ids[0])
    for r in ids[1:]:
        differ = np.flatnonzero(first[:shared] != np.asarray(r[:shared]))
        shared = int(differ[0]) if differ.size else shared
    if shared < 1:
        raise TinyLMError("the secrets share no leading token to condition on; set the "
                          "manifest's 'context' to the text before each canary in the data "
                          "('\\n' when they are lines of their own)")
    return shared


@dataclass
class Exposure:
    """One canary's result: its log-perplexity (bits), rank among the scored secrets
    (None when estimated), exposure (exact, or the estimate when R was sampled) and the
    skew-normal estimate."""

    text: str
    repeats: int
    log_perplexity: float
    rank: int | None
    exposure: float
    estimated_exposure: float | None  # None: R too small (or flat) for a fit


@dataclass
class ExposureReport:
    """The exposures of a format's canaries; ``scores``: the log-perplexities (bits) of
    the secrets scored (all of R for "exact", the sample for "estimated"); ``fit``:
    the skew-normal (xi, omega, alpha) fitted to them."""

    format: str
    space_size: int
    method: str
    results: list
    scores: np.ndarray = field(repr=False)
    fit: tuple | None

    def to_dict(self) -> dict:
        return {"format": self.format, "secret_space": self.space_size,
                "log2_secret_space": math.log2(self.space_size), "method": self.method,
                "n_scored": int(len(self.scores)),
                "fit": None if self.fit is None else dict(zip(("xi", "omega", "alpha"),
                                                              self.fit)),
                "canaries": [asdict(r) for r in self.results]}


def exact_ranks(scores, canary_scores) -> np.ndarray:
    """rank of each canary log-perplexity among ``scores`` (all of R, the canaries
    included): how many are <= it, (C,)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    return np.searchsorted(scores, np.asarray(canary_scores, dtype=np.float64), side="right")


def estimated_exposure(sample, canary_scores) -> tuple:
    """(-log2 Pr[a random secret's score <= each canary's] (C,), the skew-normal fit
    (xi, omega, alpha)): the distribution of ``sample`` (log-perplexities, bits) is a
    skew-normal fitted to its finite values, times the fraction of them that is finite
    (a secret the tokenizer cannot write has an infinite log-perplexity)."""
    sample = np.asarray(sample, dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    fit = skewnorm.fit_moments(finite)
    log_cdf = skewnorm.logcdf(canary_scores, *fit) + math.log(len(finite) / len(sample))
    return -log_cdf / math.log(2), fit


@dataclass(frozen=True)
class ExposureOptions:
    """How ``canary_exposures`` scores: all of R when |R| <= ``exact_limit``, else
    ``samples`` random secrets (``seed``); each text after ``context``; ``batch_size``
    secrets per forward; a progress bar with ``progress``."""

    exact_limit: int = 100_000
    samples: int = 5000
    seed: int = 0
    context: str = "\n"
    batch_size: int = 256
    progress: bool = False


def canary_exposures(model, tokenizer, fmt: SecretFormat, canaries, *, repeats=None,
                     options: ExposureOptions = ExposureOptions()) -> ExposureReport:
    """The exposure of each canary text of ``fmt`` (``repeats``: how often each was
    inserted, for the report): exact over all of R when it is small enough, else
    estimated from a sample (``options``)."""
    o = options
    digits = np.stack([fmt.digits_of(c) for c in canaries])  # (C, S)
    for c in canaries:
        if _encode_or_none(tokenizer, o.context + c) is None:
            raise TinyLMError(f"the model's tokenizer cannot encode the canary {c!r}; was "
                              f"the model trained on the text it was inserted into?")
    exact = fmt.size <= o.exact_limit
    if exact:
        candidates = fmt.all_digits()
    else:
        candidates = fmt.sample(int(o.samples), np.random.default_rng(o.seed))
    texts = fmt.render(candidates) + ([] if exact else list(canaries))
    bits = -text_logprobs(model, tokenizer, texts, context=o.context, batch_size=o.batch_size,
                          progress=o.progress) / math.log(2)
    if exact:
        scores, mine = bits, bits[fmt.number(digits)]
        ranks = exact_ranks(scores, mine)
        exposure = math.log2(fmt.size) - np.log2(ranks)
    else:
        scores, mine = bits[:len(candidates)], bits[len(candidates):]
    try:
        estimate, fit = estimated_exposure(scores, mine)
    except TinyLMError:
        if not exact:
            raise
        estimate, fit = [None] * len(canaries), None  # R too small or flat to fit: exact only
    if not exact:
        ranks, exposure = [None] * len(canaries), estimate
    repeats = list(repeats) if repeats is not None else [0] * len(canaries)
    results = [Exposure(c, int(k), float(b), None if r is None else int(r), float(e),
                        None if est is None else float(est))
               for c, k, b, r, e, est in zip(canaries, repeats, mine, ranks, exposure,
                                             estimate)]
    return ExposureReport(fmt.template, fmt.size, "exact" if exact else "estimated", results,
                          scores, None if fit is None else tuple(float(v) for v in fit))


# --------------------------------------------------------------------------- extraction


def sample_windows(ids, n: int, length: int, *, seed: int = 0, what: str = "the text"):
    """Up to ``n`` random non-overlapping windows of ``length`` tokens of the token
    stream ``ids``, (m, length) int64 (m = n unless the stream holds fewer)."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if len(ids) < length:
        raise TinyLMError(f"{what} has {len(ids)} tokens, fewer than the {length} a "
                          f"sequence takes (prefix + suffix); give more text or shorten them")
    rng = np.random.default_rng(seed)
    offset = int(rng.integers(0, len(ids) % length + 1))
    count = (len(ids) - offset) // length
    starts = offset + length * rng.permutation(count)[:n]  # (m,)
    return ids[starts[:, None] + np.arange(length)[None, :]]  # (m, length)


@dataclass
class Extraction:
    """Greedy continuations of windows (m, prefix + suffix): per window whether all
    ``suffix`` tokens came out exactly (``exact`` (m,) bool) and how many leading ones
    did (``matched`` (m,) int)."""

    prefix: int
    suffix: int
    exact: np.ndarray = field(repr=False)
    matched: np.ndarray = field(repr=False)

    @property
    def rate(self) -> float:
        """The fraction of windows extracted exactly."""
        return float(self.exact.mean()) if len(self.exact) else 0.0

    def to_dict(self) -> dict:
        return {"sequences": int(len(self.exact)), "prefix_tokens": self.prefix,
                "suffix_tokens": self.suffix, "extracted": int(self.exact.sum()),
                "extraction_rate": self.rate,
                "mean_matched_tokens": float(self.matched.mean()) if len(self.matched) else 0.0,
                "matched_tokens": self.matched.tolist()}


def extraction(model, windows, prefix: int, *, batch_size: int = 32,
               progress: bool = False) -> Extraction:
    """Prompt with the first ``prefix`` tokens of each window (m, prefix + suffix),
    decode the rest greedily (no end-of-sequence stop) and compare."""
    from tinylm.generate import generate

    windows = np.asarray(windows, dtype=np.int64)
    suffix = windows.shape[1] - prefix
    if prefix < 1 or suffix < 1:
        raise TinyLMError(f"a window of {windows.shape[1]} tokens cannot be split into a "
                          f"prefix of {prefix} and a suffix of at least 1")
    chunks = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, unit="batch", desc="extraction", dynamic_ncols=True)
    generated = np.zeros((len(windows), suffix), dtype=np.int64)
    for start in chunks:
        rows = windows[start:start + batch_size, :prefix]
        out = generate(model, rows.tolist(), suffix, temperature=0.0, eos_id=())
        generated[start:start + len(rows)] = np.array(out.tokens, dtype=np.int64)
    same = generated == windows[:, prefix:]  # (m, suffix)
    exact = same.all(axis=1)
    matched = np.where(exact, suffix, np.argmin(same, axis=1))  # leading matches
    return Extraction(prefix, suffix, exact, matched)


def extraction_audit(model, tokenizer, train_text: str, heldout_text: str, *,
                     prefix: int = 50, suffix: int = 50, samples: int = 100, seed: int = 0,
                     batch_size: int = 32, progress: bool = False) -> dict:
    """{"train": Extraction, "heldout": Extraction} over ``samples`` windows of each
    text (encoded with ``tokenizer``)."""
    out = {}
    for name, text in (("train", train_text), ("heldout", heldout_text)):
        windows = sample_windows(tokenizer.encode(text), samples, prefix + suffix, seed=seed,
                                 what=f"the {name} text")
        out[name] = extraction(model, windows, prefix, batch_size=batch_size,
                               progress=progress)
    return out
