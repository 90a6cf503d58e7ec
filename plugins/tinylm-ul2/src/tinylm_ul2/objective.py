"""The "ul2" objective: UL2's mixture of denoisers for T5 and decoder models.

Each row of a batch draws one denoiser (``tinylm_ul2.denoisers``) with the mixture
``weights`` (default: all equal, as the paper's appendix code samples its tasks), uses
the first L_d tokens of its window (L_d: as many as fit, per denoiser, as the
appendix code splits the text for each one to fill its inputs), and becomes

    encoder-decoder (T5)   ids     [X] The <extra_id_0> walks in <extra_id_1> park </s> <pad> ...
                           targets <extra_id_0> cute dog <extra_id_1> the </s> -100 ...
                           attention_mask over the ids (0 on the padding)

    decoder (GPT-2, Llama) one sequence  [X] The <s0> walks in <s1> park | <s0> cute dog
                           <s1> the <|endoftext|>, cut to block_size + 1 and shifted by one
                           (ids, next-token targets); only the targets part is predicted
                           (-100 elsewhere), and it is a PREFIX LM: the mode token and the
                           corrupted input attend bidirectionally (``prefix_length``), the
                           decoder-only form of the UL2 paper (``prefix_lm=False``: plain
                           causal attention)

The S denoiser's inputs are the window's first part and its targets the rest (no
sentinels). Mode tokens ``[R]``, ``[S]``, ``[X]`` (``mode_tokens``; "" for none) start
the inputs, as the paper's paradigm tokens; UL2 20B's checkpoint spells them [NLU],
[S2S], [NLG]. Every batch has the same shapes (ids (B, block_size); T5 targets (B, the
longest any denoiser makes)), so step times do not depend on which denoisers were drawn.
"""

from __future__ import annotations

import inspect

import numpy as np

from tinylm.objectives import (
    EOT, IGNORE, Objective, ObjectiveError, SpanCorruption, model_kind,
)

from tinylm_ul2.denoisers import PAPER_MIXTURE, longest_window, noise_masks, parse
from tinylm_ul2.denoisers import spans_to_sentinels

ENC_DEC, DECODER = "encoder-decoder", "decoder"


class UL2(Objective):
    """UL2's mixture of denoisers (see the module docstring).

    Options: ``denoisers`` (a spec, default the paper's seven:
    ``R:3:0.15,R:8:0.15,S:0.25,X:3:0.5,X:8:0.5,X:64:0.15,X:64:0.5``), ``weights``
    (one number per denoiser, a list or "1,1,2,...", normalised; "" = equal),
    ``mode_tokens`` ("[R],[S],[X]"; "" = none) and ``prefix_lm`` (decoders: the inputs
    attend bidirectionally)."""

    name = "ul2"
    kinds = (ENC_DEC, DECODER)
    options = {"denoisers": PAPER_MIXTURE, "weights": "", "mode_tokens": "[R],[S],[X]",
               "prefix_lm": True}
    PAD, EOS = SpanCorruption.PAD, SpanCorruption.EOS

    def __init__(self, tokenizer=None, **options):
        super().__init__(tokenizer, **options)
        self.specs = parse(self.denoisers)
        self.p = _weights(self.weights, len(self.specs))
        self.modes = _mode_tokens(self.mode_tokens)
        self.kind = None  # set by check_model: which form the batches take
        self.block_size = None  # set by window_length
        self._lengths, self._ids_for = {}, None  # caches

    # ------------------------------------------------------------------ lengths

    def lengths(self, block_size: int, kind: str) -> list:
        """[L_d]: the longest window each denoiser can use with ``block_size`` in the
        form of ``kind`` (its inputs fit the encoder, or the whole sequence the decoder)."""
        if (block_size, kind) in self._lengths:
            return self._lengths[(block_size, kind)]
        m = 1 if self.modes else 0
        out = []
        for d in self.specs:
            if kind == ENC_DEC:  # mode + inputs + </s> <= block
                fits = lambda L, d=d: m + d.piece_lengths(L)[0] + 1 <= block_size  # noqa: E731
            else:  # mode + inputs + targets + EOT <= block + 1
                fits = lambda L, d=d: m + d.sequence_length(L) <= block_size  # noqa: E731
            L = longest_window(fits, 4 * block_size + 8)
            if L < 2:
                raise ObjectiveError(f"ul2: block size {block_size} leaves no room for "
                                     f"denoiser {d}; raise --block-size")
            out.append(L)
        self._lengths[(block_size, kind)] = out
        return out

    def window_length(self, block_size: int) -> int:
        if block_size < 8:
            raise ObjectiveError("ul2 needs a block size of at least 8")
        self.block_size = block_size
        kinds = [self.kind] if self.kind else list(self.kinds)  # the model is not known yet
        return max(max(self.lengths(block_size, k)) for k in kinds)

    def n_sentinels(self, block_size: int) -> int:
        """The most sentinels any row can need, in either form."""
        return max(d.counts(L)[1] if d.kind != "S" else 0
                   for kind in self.kinds
                   for d, L in zip(self.specs, self.lengths(block_size, kind)))

    @classmethod
    def special_tokens(cls, block_size: int, **options) -> list:
        probe = cls(None, **options)
        used = sorted({d.kind for d in probe.specs})
        modes = [probe.modes[k] for k in used] if probe.modes else []
        sentinels = [SpanCorruption.sentinel(i) for i in range(probe.n_sentinels(block_size))]
        return [EOT, cls.PAD, cls.EOS] + modes + sentinels

    def config_overrides(self) -> dict:
        t = self.tokenizer
        if t is None or t.token_to_id(self.PAD) is None or t.token_to_id(self.EOS) is None:
            return {}  # a decoder's tokenizer may have neither; T5's check_model asks
        pad, eos = self._id(self.PAD), self._id(self.EOS)
        return {"pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": pad}

    # ------------------------------------------------------------------ fitting

    def check_model(self, model) -> None:
        super().check_model(model)
        kind = model_kind(model)
        if kind == DECODER and self.prefix_lm and \
                "prefix_length" not in inspect.signature(model.forward).parameters:
            raise ObjectiveError(f"ul2 on a decoder attends bidirectionally over the inputs, "
                                 f"but {type(model).__name__}.forward takes no prefix_length=; "
                                 f"set objective_options.prefix_lm = false")
        self.kind = kind
        self._ids()

    def _ids(self) -> None:
        """The token ids the batches use (a TinyLMError naming a missing token), for
        this kind and block size."""
        key = (self.kind, self.block_size)
        if self._ids_for == key:
            return
        self.eot_id = self._id(EOT)
        if self.kind == ENC_DEC:
            self.pad_id, self.eos_id = self._id(self.PAD), self._id(self.EOS)
        self.mode_ids = {k: self._id(t) for k, t in self.modes.items()
                         if any(d.kind == k for d in self.specs)}
        n = self.n_sentinels(self.block_size) if self.block_size else 0
        self.sentinel_ids = np.array([self._id(SpanCorruption.sentinel(i)) for i in range(n)],
                                     dtype=np.int64)
        self._ids_for = key

    # ------------------------------------------------------------------ batches

    def make_batch(self, windows, rng) -> dict:
        windows = np.asarray(windows, dtype=np.int64)
        if self.kind is None or self.block_size is None:
            raise ObjectiveError("ul2: call window_length(block_size) and check_model(model) "
                                 "before make_batch (the Trainer does)")
        self._ids()
        lengths = self.lengths(self.block_size, self.kind)
        if windows.shape[1] < max(lengths):
            raise ObjectiveError(f"ul2: windows of {windows.shape[1]} tokens, it needs "
                                 f"{max(lengths)} (window_length({self.block_size}))")
        B = windows.shape[0]
        choice = rng.choice(len(self.specs), size=B, p=self.p)  # (B,) a denoiser per row
        parts = [None] * len(self.specs)
        for i in np.unique(choice):  # a loop over the (few) denoisers, not the rows
            rows = np.flatnonzero(choice == i)
            parts[i] = (rows, *self._denoise(i, windows[rows, : lengths[i]], rng))
        assemble = self._encoder_decoder if self.kind == ENC_DEC else self._decoder
        batch = assemble(B, [p for p in parts if p is not None], lengths)
        batch["denoiser"] = choice
        return batch

    def _denoise(self, i: int, x: np.ndarray, rng) -> tuple:
        """(inputs, their lengths, targets, their lengths, mode id) of the rows ``x``
        (n, L) for denoiser ``i``: arrays (n, w) padded with -1 where a row is shorter."""
        d, (n, L) = self.specs[i], x.shape
        mode = self.mode_ids.get(d.kind) if self.modes else None
        if d.kind == "S":
            cut = rng.integers(1, L, size=n) if d.rate is None else \
                np.full(n, L - d.counts(L)[0])  # (n,) the prefix length
            j = np.arange(L)[None, :]
            inputs = np.where(j < cut[:, None], x, -1)
            src = np.minimum(cut[:, None] + j, L - 1)
            targets = np.where(cut[:, None] + j < L, np.take_along_axis(x, src, axis=1), -1)
            return inputs, cut, targets, L - cut, mode
        noise = noise_masks(n, L, d, rng)  # (n, L)
        inputs = spans_to_sentinels(x, noise, self.sentinel_ids)  # keep0 s0 keep1 s1 ...
        targets = spans_to_sentinels(x, ~noise, self.sentinel_ids)  # s0 noise0 s1 noise1 ...
        full = lambda a: np.full(n, a.shape[1])  # noqa: E731
        return inputs, full(inputs), targets, full(targets), mode

    def _encoder_decoder(self, B, parts, lengths) -> dict:
        width = max(self.specs[i].piece_lengths(L)[1] for i, L in enumerate(lengths)) + 1
        ids = np.full((B, self.block_size), self.pad_id, np.int64)
        mask = np.zeros((B, self.block_size), bool)
        targets = np.full((B, width), IGNORE, np.int64)
        for rows, inputs, n_in, targs, n_t, mode in parts:
            pieces = ([_const(len(rows), mode)] if mode is not None else []) + \
                [(inputs, n_in), _const(len(rows), self.eos_id)]
            ids[rows], total = _join(pieces, self.block_size, self.pad_id)
            mask[rows] = np.arange(self.block_size)[None, :] < total[:, None]
            targets[rows] = _join([(targs, n_t), _const(len(rows), self.eos_id)], width,
                                  IGNORE)[0]
        return {"ids": ids, "targets": targets, "attention_mask": mask}

    def _decoder(self, B, parts, lengths) -> dict:
        T = self.block_size
        ids = np.full((B, T), self.eot_id, np.int64)
        targets = np.full((B, T), IGNORE, np.int64)
        prefix = np.zeros(B, np.int64)
        for rows, inputs, n_in, targs, n_t, mode in parts:
            n = len(rows)
            head = ([_const(n, mode)] if mode is not None else []) + [(inputs, n_in)]
            seq, total = _join(head + [(targs, n_t), _const(n, self.eot_id)], T + 1, self.eot_id)
            start = (1 if mode is not None else 0) + n_in  # (n,) where the targets begin
            t = np.arange(T)[None, :]
            predicted = (t >= start[:, None] - 1) & (t < total[:, None] - 1)
            ids[rows] = seq[:, :T]
            targets[rows] = np.where(predicted, seq[:, 1:], IGNORE)
            prefix[rows] = start
        batch = {"ids": ids, "targets": targets}
        if self.prefix_lm:
            batch["prefix_length"] = prefix
        return batch

    def loss(self, model, batch):
        if self.kind == ENC_DEC:
            return model(batch["ids"], targets=batch["targets"],
                         attention_mask=batch["attention_mask"]).loss
        if "prefix_length" in batch:
            return model(batch["ids"], targets=batch["targets"],
                         prefix_length=batch["prefix_length"]).loss
        return model(batch["ids"], targets=batch["targets"]).loss


# --------------------------------------------------------------------------- helpers


def _weights(weights, n: int) -> np.ndarray:
    """The mixture probabilities: ``weights`` (a list or "1,2,...", "" = equal) normalised."""
    if weights in ("", None):
        return np.full(n, 1.0 / n)
    try:
        w = np.array([float(v) for v in (weights.split(",") if isinstance(weights, str)
                                         else weights)], dtype=np.float64)
    except (TypeError, ValueError):
        raise ObjectiveError(f"ul2 weights {weights!r}: give one number per denoiser, "
                             f"e.g. \"1,1,2\"") from None
    if len(w) != n or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ObjectiveError(f"ul2 weights {weights!r}: {n} non-negative numbers, one per "
                             f"denoiser, not all zero")
    return w / w.sum()


def _mode_tokens(spec) -> dict:
    """{"R": "[R]", "S": "[S]", "X": "[X]"} from "[R],[S],[X]" ("" = no mode tokens)."""
    if spec in ("", None):
        return {}
    tokens = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    if len(tokens) != 3 or not all(isinstance(t, str) and t for t in tokens):
        raise ObjectiveError(f"ul2 mode_tokens {spec!r}: three tokens for R, S and X, "
                             f"e.g. \"[R],[S],[X]\" (or \"\" for none)")
    return dict(zip(("R", "S", "X"), tokens))


def _const(n: int, value: int) -> tuple:
    """A one-token piece for ``_join``: (n, 1) of ``value``, each of length 1."""
    return np.full((n, 1), value, np.int64), np.ones(n, np.int64)


def _join(pieces, width: int, fill: int) -> tuple:
    """Each row's pieces one after another, then ``fill``: (rows (n, width), total
    lengths (n,)). ``pieces``: [(values (n, w), lengths (n,))], the first ``lengths``
    of each row used. Vectorised over rows (a loop over the few pieces)."""
    n = pieces[0][0].shape[0]
    out = np.full((n, width), fill, np.int64)
    start = np.zeros(n, np.int64)
    t = np.arange(width)[None, :]
    for values, count in pieces:
        k = t - start[:, None]  # (n, width) the index into this piece
        inside = (k >= 0) & (k < count[:, None])
        src = np.take_along_axis(values, np.clip(k, 0, values.shape[1] - 1), axis=1)
        out = np.where(inside, src, out)
        start = start + count
    if np.any(start > width):
        raise ObjectiveError(f"ul2: a row of {int(start.max())} tokens does not fit {width} "
                             f"(a bug: the window lengths should prevent it)")
    return out, start
