"""Training objectives: how windows of token ids become a batch, and a batch a loss.

    causal-lm        decoder (GPT-2, Llama)   predict every next token
    prefix-lm        decoder                  a random prefix is seen bidirectionally;
                                              the rest is predicted left to right
    masked-lm        encoder (BERT)           15% of the tokens are chosen; of those 80%
                                              become [MASK], 10% a random token, 10% stay;
                                              the chosen tokens are predicted
    span-corruption  encoder-decoder (T5)     15% of the tokens, in spans of mean length
                                              3, are replaced by sentinels in the input;
                                              the target spells out the dropped spans
    sft              decoder                  whole examples (tinylm.instruct); only the
                                              completion / assistant tokens are predicted

An objective is registered through the ``register_objectives`` hook (these four by
``tinylm.default_plugins.objectives``), so a plugin adds one the same way. Every
objective has the same four parts:

    obj = CausalLM(tokenizer)                    # reads the special-token ids it needs
    obj.check_model(model)                       # TinyLMError when the family does not fit
    L = obj.window_length(block_size)            # tokens per sample the data must supply
    batch = obj.make_batch(windows, rng)         # (B, L) ids -> dict of NumPy arrays
    loss = obj.loss(model, batch)                # a scalar Tensor (mean over predicted tokens)

``special_tokens(block_size)`` lists the tokens the tokenizer must have (a trained
tokenizer gets them added; a tokenizer file without them is an error naming them) and
``config_overrides()`` the model-config fields that must agree with the tokenizer
(pad, eos, decoder start ids). Batches are plain NumPy arrays drawn with the
``numpy.random.Generator`` the trainer passes in, so one seed gives the same batches.
"""

from __future__ import annotations

import inspect

import numpy as np

from tinylm.errors import TinyLMError

EOT = "<|endoftext|>"  # the separator between packed documents
IGNORE = -100  # cross-entropy ignores targets equal to this


class ObjectiveError(TinyLMError, ValueError):
    """An objective that does not fit the model family, the tokenizer or the options."""


# --------------------------------------------------------------------------- model kinds


def model_kind(model) -> str | None:
    """"decoder", "encoder" or "encoder-decoder" for a model, a model class or a
    registered architecture's builder: its ``kind`` attribute (each family class sets
    it, ``tinylm.models.Model.kind``; a plugin's builder function may too), else None."""
    return getattr(model, "kind", None)


_ADVICE = {
    "decoder": "use --objective causal-lm or prefix-lm",
    "encoder": "use --objective masked-lm",
    "encoder-decoder": "use --objective span-corruption",
}


# --------------------------------------------------------------------------- base


class Objective:
    """Base of the objectives. Subclasses set ``name`` and ``kinds`` and write
    ``make_batch`` and ``loss``; ``options`` are the keyword arguments they accept."""

    name = ""
    kinds: tuple = ("decoder",)  # the model kinds this objective trains
    options: dict = {}  # option name -> default
    examples = False  # True: trains on whole examples (tinylm.instruct), not token windows

    def __init__(self, tokenizer=None, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ObjectiveError(f"objective {self.name!r} has no option(s) {unknown}; "
                                 f"its options: {known}")
        for key, default in self.options.items():
            setattr(self, key, options.get(key, default))
        self.tokenizer = tokenizer
        # the ids it can emit: a GGUF tokenizer's stand-ins for missing bytes (n_vocab on)
        # never come out of encode
        self.vocab_size = None if tokenizer is None else \
            getattr(tokenizer, "n_vocab", tokenizer.vocab_size)

    # ------------------------------------------------------------------ fitting

    @classmethod
    def check_kind(cls, kind: str | None, family: str = "this model") -> None:
        """Raise ObjectiveError unless models of ``kind`` can be trained this way."""
        if kind in cls.kinds:
            return
        wants = " or ".join(cls.kinds)
        what = f"an {kind}" if kind and kind[0] in "ae" else f"a {kind or 'model of unknown kind'}"
        advice = _ADVICE.get(kind, "pick an objective made for its kind")
        raise ObjectiveError(
            f"objective {cls.name!r} trains {wants} models, but {family} is {what}; {advice}")

    def check_model(self, model) -> None:
        self.check_kind(model_kind(model), getattr(model.config, "architecture", "this model"))
        if self.vocab_size is not None and model.config.vocab_size < self.vocab_size:
            raise ObjectiveError(
                f"the tokenizer has {self.vocab_size} ids but the model's vocab_size is "
                f"{model.config.vocab_size}; build the model with vocab_size >= "
                f"{self.vocab_size}")

    @classmethod
    def special_tokens(cls, block_size: int, **options) -> list:
        """The special tokens this objective (with these options) needs in the
        tokenizer; EOT separates packed documents."""
        return [EOT]

    def config_overrides(self) -> dict:
        """Model-config fields that must match the tokenizer's ids."""
        return {}

    def window_length(self, block_size: int) -> int:
        """How many consecutive tokens one sample takes from the data."""
        return block_size + 1

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token) if self.tokenizer is not None else None
        if i is None:
            raise ObjectiveError(
                f"objective {self.name!r} needs the special token {token!r}, which the "
                f"tokenizer does not have; train the tokenizer with it "
                f"(tinylm train adds it when it trains the tokenizer)")
        return int(i)

    # ------------------------------------------------------------------ the work

    def make_batch(self, windows: np.ndarray, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict):
        raise NotImplementedError

    def n_targets(self, batch: dict) -> int:
        """How many tokens the batch's loss averages over (for tokens/s and weighting)."""
        return int((batch["targets"] != IGNORE).sum())


# --------------------------------------------------------------------------- causal LM


class CausalLM(Objective):
    """Next-token prediction: ids = window[:-1], targets = window[1:]."""

    name = "causal-lm"
    kinds = ("decoder",)

    def make_batch(self, windows, rng) -> dict:
        windows = np.asarray(windows, dtype=np.int64)
        return {"ids": windows[:, :-1], "targets": windows[:, 1:]}  # (B, T) each

    def loss(self, model, batch):
        return model(batch["ids"], targets=batch["targets"]).loss


# --------------------------------------------------------------------------- prefix LM


class PrefixLM(Objective):
    """A causal decoder whose attention is bidirectional over a prefix (the T5 paper's
    "prefix LM"): each row is cut at a random point P (1 <= P < T, uniform); query t
    sees key s when s <= t or s < P, and only the tokens after the prefix are
    predicted (targets before position P - 1 are ignored).

    The mask, for T = 5 and P = 2 (1 = may attend)::

        1 1 0 0 0
        1 1 0 0 0
        1 1 1 0 0
        1 1 1 1 0
        1 1 1 1 1
    """

    name = "prefix-lm"
    kinds = ("decoder",)

    def check_model(self, model) -> None:
        super().check_model(model)
        if "prefix_length" not in inspect.signature(model.forward).parameters:
            raise ObjectiveError(f"objective 'prefix-lm' needs a model whose forward takes "
                                 f"prefix_length=; {type(model).__name__} does not")

    def make_batch(self, windows, rng) -> dict:
        windows = np.asarray(windows, dtype=np.int64)
        B, T = windows.shape[0], windows.shape[1] - 1
        if T < 2:
            raise ObjectiveError("prefix-lm needs a block size of at least 2")
        prefix = rng.integers(1, T, size=B)  # (B,) in [1, T-1]
        targets = windows[:, 1:].copy()  # (B, T)
        targets[np.arange(T)[None, :] < (prefix[:, None] - 1)] = IGNORE
        return {"ids": windows[:, :-1], "targets": targets, "prefix_length": prefix}

    def loss(self, model, batch):
        return model(batch["ids"], targets=batch["targets"],
                     prefix_length=batch["prefix_length"]).loss


def prefix_lm_mask(prefix_length, T: int) -> np.ndarray:
    """The (B, T, T) boolean mask a prefix LM attends with (True = may attend)."""
    prefix = np.asarray(prefix_length)[:, None, None]  # (B, 1, 1)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    return (s <= t)[None] | (s < prefix)  # (B, T, T)


# --------------------------------------------------------------------------- masked LM


class MaskedLM(Objective):
    """BERT's masked LM: each token is chosen with probability ``mask_prob`` (special
    tokens never); a chosen token becomes [MASK] with probability 0.8, a random
    ordinary token with 0.1, and stays with 0.1. Only chosen tokens are predicted;
    a row with none chosen gets one, so no row is wasted."""

    name = "masked-lm"
    kinds = ("encoder",)
    options = {"mask_prob": 0.15, "replace_prob": 0.8, "random_prob": 0.1}
    MASK = "[MASK]"

    def __init__(self, tokenizer=None, **options):
        super().__init__(tokenizer, **options)
        if not 0 < self.mask_prob < 1 or not 0 <= self.replace_prob + self.random_prob <= 1:
            raise ObjectiveError("masked-lm needs 0 < mask_prob < 1 and "
                                 "replace_prob + random_prob <= 1")
        if tokenizer is not None:
            self.mask_id = self._id(self.MASK)
            special = {int(i) for i in getattr(tokenizer, "special_tokens", {}).values()}
            self.special_ids = np.array(sorted(special), dtype=np.int64)
            self.ordinary_ids = np.array([i for i in range(tokenizer.vocab_size)
                                          if i not in special], dtype=np.int64)

    def check_model(self, model) -> None:
        super().check_model(model)
        head = getattr(model.config, "head", "mlm")
        if head != "mlm":
            raise ObjectiveError(f"masked-lm needs a BERT with head = 'mlm', this one has "
                                 f"head = {head!r}")

    @classmethod
    def special_tokens(cls, block_size: int, **options) -> list:
        return [EOT, cls.MASK]

    def window_length(self, block_size: int) -> int:
        return block_size

    def make_batch(self, windows, rng) -> dict:
        ids = np.array(windows, dtype=np.int64)  # (B, T), a copy we may edit
        B, T = ids.shape
        maskable = ~np.isin(ids, self.special_ids)  # (B, T)
        chosen = (rng.random((B, T)) < self.mask_prob) & maskable
        empty = ~chosen.any(axis=1) & maskable.any(axis=1)
        if empty.any():  # one chosen token in each row that drew none
            scores = rng.random((int(empty.sum()), T)) * maskable[empty]
            chosen[np.flatnonzero(empty), scores.argmax(axis=1)] = True
        targets = np.where(chosen, ids, IGNORE)
        u = rng.random((B, T))
        to_mask = chosen & (u < self.replace_prob)
        to_random = chosen & (u >= self.replace_prob) & (u < self.replace_prob + self.random_prob)
        ids[to_mask] = self.mask_id
        ids[to_random] = self.ordinary_ids[rng.integers(0, len(self.ordinary_ids),
                                                        size=int(to_random.sum()))]
        return {"ids": ids, "targets": targets}

    def loss(self, model, batch):
        return model(batch["ids"], targets=batch["targets"]).loss


# --------------------------------------------------------------------------- span corruption


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple:
    """(noise tokens, noise spans) for a sequence of ``length`` tokens, as T5's
    ``random_spans_noise_mask`` computes them."""
    n_noise = int(round(length * noise_density))
    n_noise = min(max(n_noise, 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span)), 1)
    return n_noise, n_spans


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's noise mask (True = dropped): ``n_spans`` noise spans of random lengths
    (each >= 1) alternating with as many non-noise spans, starting with non-noise.

    Both kinds are cut into ``n_spans`` segments by T5's ``_random_segmentation``:
    a random permutation of (segments - 1) ones among zeros marks where a new segment
    starts. E.g. length 20, density 0.15: 3 noise tokens in 1 span.
    """
    n_noise, n_spans = span_counts(length, noise_density, mean_span)
    n_keep = length - n_noise

    def segmentation(n_items, n_segments):
        marks = np.zeros(n_items - 1, dtype=np.int64)
        marks[: n_segments - 1] = 1
        marks = np.concatenate([[0], rng.permutation(marks)])
        segment_id = np.cumsum(marks)  # (n_items,)
        return np.bincount(segment_id, minlength=n_segments)  # lengths, each >= 1

    noise_lengths = segmentation(n_noise, n_spans)
    keep_lengths = segmentation(n_keep, n_spans)
    lengths = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # keep, noise, ...
    is_noise = np.tile([False, True], n_spans)
    return np.repeat(is_noise, lengths)  # (length,)


class SpanCorruption(Objective):
    """T5's span corruption: the input keeps the non-noise tokens, each noise span
    replaced by one sentinel (<extra_id_0>, <extra_id_1>, ... in order), then </s>;
    the target is each sentinel followed by the span it hides, then </s>.

        window   The cute dog walks in the park
        input    The <extra_id_0> walks in <extra_id_1> park </s>
        target   <extra_id_0> cute dog <extra_id_1> the </s>

    The window is as long as possible while the input fits ``block_size`` (T5's
    ``compute_input_and_target_lengths``); every row then has the same input and
    target lengths, so no padding is needed."""

    name = "span-corruption"
    kinds = ("encoder-decoder",)
    options = {"noise_density": 0.15, "mean_span": 3.0}
    PAD, EOS = "<pad>", "</s>"

    def __init__(self, tokenizer=None, **options):
        super().__init__(tokenizer, **options)
        if not 0 < self.noise_density < 1 or self.mean_span < 1:
            raise ObjectiveError("span-corruption needs 0 < noise_density < 1 and "
                                 "mean_span >= 1")
        if tokenizer is not None:
            self.pad_id, self.eos_id = self._id(self.PAD), self._id(self.EOS)

    @staticmethod
    def sentinel(i: int) -> str:
        return f"<extra_id_{i}>"

    def lengths(self, raw_length: int) -> tuple:
        """(input length, target length) for a window of ``raw_length`` tokens."""
        n_noise, n_spans = span_counts(raw_length, self.noise_density, self.mean_span)
        return raw_length - n_noise + n_spans + 1, n_noise + n_spans + 1

    def window_length(self, block_size: int) -> int:
        if block_size < 4:
            raise ObjectiveError("span-corruption needs a block size of at least 4")
        raw = block_size
        while self.lengths(raw + 1)[0] <= block_size:
            raw += 1
        while raw > 2 and self.lengths(raw)[0] > block_size:
            raw -= 1
        return raw

    @classmethod
    def special_tokens(cls, block_size: int, **options) -> list:
        probe = cls(None, **options)
        n_spans = span_counts(probe.window_length(block_size), probe.noise_density,
                              probe.mean_span)[1]
        return [EOT, cls.PAD, cls.EOS] + [cls.sentinel(i) for i in range(n_spans)]

    def config_overrides(self) -> dict:
        return {"pad_token_id": self.pad_id, "eos_token_id": self.eos_id,
                "decoder_start_token_id": self.pad_id}

    def make_batch(self, windows, rng) -> dict:
        windows = np.asarray(windows, dtype=np.int64)
        B, L = windows.shape
        n_spans = span_counts(L, self.noise_density, self.mean_span)[1]
        sentinels = np.array([self._id(self.sentinel(i)) for i in range(n_spans)])
        noise = np.stack([random_spans_noise_mask(L, self.noise_density, self.mean_span, rng)
                          for _ in range(B)])  # (B, L)
        eos = np.full((B, 1), self.eos_id)
        inputs = _spans_to_sentinels(windows, noise, sentinels)  # keep0 s0 keep1 s1 ...
        targets = _spans_to_sentinels(windows, ~noise, sentinels)  # s0 noise0 s1 noise1 ...
        return {"ids": np.concatenate([inputs, eos], axis=1),
                "targets": np.concatenate([targets, eos], axis=1)}

    def loss(self, model, batch):
        return model(batch["ids"], targets=batch["targets"]).loss


def _spans_to_sentinels(windows, mask, sentinels):
    """T5's ``noise_span_to_unique_sentinel``, row by row: the first token of each
    span of ``mask`` becomes the next sentinel, the rest of the span is dropped.
    Every row has the same number of masked tokens and spans, so the same length."""
    B = windows.shape[0]
    first = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]  # (B, L) a span starts here
    number = np.cumsum(first, axis=1) - 1  # (B, L) which span (where first)
    tokens = np.where(first, sentinels[np.maximum(number, 0)], windows)
    keep = ~mask | first
    return tokens[keep].reshape(B, -1)  # row-major: each row's tokens in order


# --------------------------------------------------------------------------- SFT


class SFT(Objective):
    """Supervised fine-tuning on whole examples (``tinylm.instruct``, ``tinylm
    finetune``): the batch arrives built by the example batcher, ``ids`` (B, T) and
    ``targets`` (B, T) with IGNORE on the prompt tokens (TRL's completion-only and
    assistant-only masks) and the padding, and ``positions`` (B, T) for packed rows
    (each example's positions start at 0). The loss is the mean cross-entropy over
    the trained targets, so a prompt token's logits get exactly zero gradient."""

    name = "sft"
    kinds = ("decoder",)
    examples = True

    def make_batch(self, rows, rng) -> dict:
        if not isinstance(rows, dict) or "targets" not in rows:
            raise ObjectiveError("objective 'sft' trains on instruction examples (prompt + "
                                 "completion, chat messages): use `tinylm finetune --data "
                                 "FILE.jsonl`, not a stream of text windows")
        return rows

    def loss(self, model, batch):
        return model(batch["ids"], targets=batch["targets"],
                     positions=batch.get("positions")).loss


BUILTIN = {cls.name: cls for cls in (CausalLM, PrefixLM, MaskedLM, SpanCorruption, SFT)}

DEFAULT_FOR_KIND = {"decoder": "causal-lm", "encoder": "masked-lm",
                    "encoder-decoder": "span-corruption"}

