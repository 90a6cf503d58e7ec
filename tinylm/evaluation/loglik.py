"""Log-likelihoods of continuations, the way lm-evaluation-harness scores them.

    scores = continuation_logprobs(model, [(ctx_ids, choice_ids) for choice_ids in choices])
    # [(sum of log p(continuation | context), is_greedy), ...]
    per_token = token_logprobs(model, [ids], prefix_token=eos)   # rolling windows

A request is (context_ids, continuation_ids); its score is the sum over the
continuation tokens of log p(token | everything before it), and ``is_greedy`` says
whether every continuation token is the argmax there (lm-eval's second value).

Shared contexts are computed once. A multiple-choice question asks the same context
with C continuations; lm-eval runs context + choice C times. Here the requests are
grouped by context, each context goes through the model once (a batch of G contexts,
right-padded: causal attention keeps the padding out of every real position), the
KV cache is copied to one row per request (``KVCache.reorder``), and the
continuations (all but their last token, right-padded) go through in one more
forward, with an attention mask that hides the context padding. The first
continuation token is scored by the context pass's last logits.

Too long: like lm-eval, (context + continuation) keeps its last ``max_length + 1``
tokens (the first of them is input only); a continuation longer than ``max_length``
is an error. ``max_length`` defaults to the model's ``max_positions``.

Log-probabilities are float64 (``logits[tok] - logsumexp(logits)`` over the float32
logits), so a sum over many tokens loses nothing to float32 rounding.
"""

from __future__ import annotations

import numpy as np

from tinylm import backend
from tinylm.autograd import no_grad
from tinylm.errors import TinyLMError
from tinylm.models.logits_at import logits_at
from tinylm.nn import KVCache


def continuation_logprobs(model, requests, batch_size: int = 32, progress: bool = False,
                          max_length: int | None = None):
    """[(log p(continuation | context) summed, is_greedy)] for ``requests`` =
    [(context_ids, continuation_ids)], in order. ``batch_size``: requests (rows) per
    forward; a context's requests always go together."""
    out = score_requests(model, requests, batch_size, progress, max_length)
    return [(float(lp.sum()), bool(greedy)) for lp, greedy in out]


def token_logprobs(model, ids_list, prefix_token: int, batch_size: int = 32,
                   progress: bool = False, max_length: int | None = None):
    """Per-token log-probabilities (len(ids),) float64 of each sequence in ``ids_list``,
    from lm-eval's rolling windows (``rolling_windows``): the first token is predicted
    from ``prefix_token`` (the tokenizer's BOS, else EOS), and a sequence longer than
    the model is cut into disjoint windows of ``max_length`` predicted tokens, each
    conditioned on the token before it (lm-eval's ``context_len=1``)."""
    L = model_window(model, max_length)
    requests, owner = [], []
    for i, ids in enumerate(ids_list):
        for window in rolling_windows(list(ids), prefix_token, L):
            requests.append(window)
            owner.append(i)
    scored = score_requests(model, requests, batch_size, progress, L)
    pieces = [[] for _ in ids_list]
    for i, (lp, _) in zip(owner, scored):
        pieces[i].append(lp)
    return [np.concatenate(p) if p else np.zeros(0) for p in pieces]


def rolling_windows(tokens: list, prefix_token: int, max_length: int):
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` made disjoint
    (``make_disjoint_window``): [(context, continuation)] whose continuations tile
    ``tokens``. The first window predicts tokens[:L] from [prefix_token]; each later one
    predicts the next (up to) L tokens from the token before them, the last window
    from as many earlier tokens as fit (L + 1 - its length)."""
    L = max_length
    if not tokens:
        return []
    first = min(L, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, L)
        end = done + n
        context = tokens[end - L - 1: end - 1]  # L tokens of input
        windows.append((context[: len(context) - (n - 1)], tokens[done:end]))
        done = end
    return windows


def score_requests(model, requests, batch_size: int = 32, progress: bool = False,
                   max_length: int | None = None):
    """[(per-token log-probs (len(continuation),) float64, is_greedy)] for
    ``requests`` = [(context_ids, continuation_ids)], in order; contexts shared by
    several requests are computed once (see the module docstring)."""
    L = model_window(model, max_length)
    groups = _groups([_truncate(ctx, cont, L) for ctx, cont in requests])
    results = [None] * len(requests)
    bar = _bar(len(requests), progress)
    with no_grad():
        for batch in _batches(groups, max(1, int(batch_size))):
            for index, scored in zip((i for _, members in batch for i, _ in members),
                                     _score_batch(model, batch)):
                results[index] = scored
            if bar is not None:
                bar.update(sum(len(m) for _, m in batch))
    if bar is not None:
        bar.close()
    return results


# --------------------------------------------------------------------------- grouping


def model_window(model, max_length=None) -> int:
    """``max_length``, else the model's ``max_positions`` (the window lm-eval uses)."""
    if max_length is not None:
        return int(max_length)
    return int(getattr(model.config, "max_positions", 2048))


def _truncate(ctx, cont, L):
    """(context, continuation) as lists; when together they exceed L + 1 tokens the
    context loses its first tokens, as in lm-eval (the last L + 1 are kept)."""
    ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
    if not cont:
        raise TinyLMError("a continuation to score has no tokens; give at least one")
    if not ctx:
        raise TinyLMError("a context to score has no tokens; start it with the BOS/EOS token")
    if len(cont) > L:
        raise TinyLMError(f"a continuation of {len(cont)} tokens does not fit the model's "
                          f"{L} positions; shorten it or pass a larger max_length")
    whole = (ctx + cont)[-(L + 1):]
    return whole[: len(whole) - len(cont)], cont


def _groups(pairs):
    """[(context, [(request index, continuation)])], one entry per distinct context,
    longest first (less padding per batch, and any memory error comes first)."""
    by_context: dict = {}
    for i, (ctx, cont) in enumerate(pairs):
        by_context.setdefault(tuple(ctx), []).append((i, cont))
    groups = list(by_context.items())
    groups.sort(key=lambda g: -(len(g[0]) + max(len(c) for _, c in g[1])))
    return groups


def _batches(groups, batch_size):
    """Consecutive groups with at most ``batch_size`` requests together (a bigger group
    goes alone)."""
    batch, rows = [], 0
    for group in groups:
        n = len(group[1])
        if batch and rows + n > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(group)
        rows += n
    if batch:
        yield batch


def _bar(total, progress):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="req", desc="log-likelihoods", dynamic_ncols=True)


# --------------------------------------------------------------------------- scoring


def _score_batch(model, batch):
    """The scores of a batch of groups, in the order of their members: one forward over
    the G contexts, one over every request's continuation (minus its last token)."""
    xp = next(iter(model.parameters())).xp
    n = np.array([len(ctx) for ctx, _ in batch])  # (G,)
    G, N = len(batch), int(n.max())
    ids = np.zeros((G, N), dtype=np.int64)
    for g, (ctx, _) in enumerate(batch):
        ids[g, : n[g]] = ctx
    cache = KVCache()
    last = _logits(model, xp.asarray(ids), cache, at=xp.asarray(n - 1))  # (G, V)
    row_group = np.array([g for g, (_, m) in enumerate(batch) for _ in m])  # (R,)
    conts = [cont for _, members in batch for _, cont in members]
    lengths = np.array([len(c) for c in conts])  # (R,)
    R, M = len(conts), int(lengths.max())
    targets = np.zeros((R, M), dtype=np.int64)
    for r, cont in enumerate(conts):
        targets[r, : lengths[r]] = cont
    lp, greedy = _pick(last[xp.asarray(row_group)][:, None], xp.asarray(targets[:, :1]))
    if M > 1:
        logits = _continue(model, cache, row_group, n[row_group], targets[:, : M - 1],
                           lengths)  # (R, M-1, V)
        rest = _pick(logits, xp.asarray(targets[:, 1:]))
        lp, greedy = (xp.concatenate(pair, axis=1) for pair in zip((lp, greedy), rest))
    lp, greedy = backend.to_numpy(lp), backend.to_numpy(greedy)  # (R, M)
    valid = np.arange(M)[None, :] < lengths[:, None]  # (R, M)
    return [(lp[r, : lengths[r]], bool(greedy[r][valid[r]].all())) for r in range(R)]


def _continue(model, cache, row_group, ctx_len, inputs, lengths):
    """Logits (R, M-1, V) of the continuations' inputs (R, M-1) fed after their
    context rows in ``cache``, copied to one row per request (``row_group`` (R,): the
    context row of each; ``ctx_len`` (R,): that context's length). Keys at the
    context's padding and after each continuation's own end are masked out."""
    xp = next(iter(model.parameters())).xp
    R, T = inputs.shape
    cache.reorder(xp.asarray(row_group))
    N = cache.length
    keep = np.zeros((R, N + T), dtype=np.int64)
    keep[:, :N] = np.arange(N)[None, :] < ctx_len[:, None]  # (R, N) real context keys
    keep[:, N:] = np.arange(T)[None, :] < (lengths - 1)[:, None]  # (R, T) real inputs
    limit = model_window(model, None)
    positions = np.minimum(ctx_len[:, None] + np.arange(T)[None, :], limit - 1)  # (R, T)
    return _logits(model, xp.asarray(inputs), cache, attention_mask=xp.asarray(keep),
                   positions=xp.asarray(positions))


def _logits(model, ids, cache, at=None, **kwargs):
    """The model's logits (B, T, V) for ``ids`` (B, T), or only at column ``at[b]`` of
    each row (B, V): for a plain decoder without the vocabulary projection of the
    positions nobody reads (``logits_at``; for a context of a hundred tokens that is
    most of the lm_head's work)."""
    if at is not None:
        return logits_at(model, ids, at, cache=cache, **kwargs)  # (B, V)
    return model(ids, cache=cache, **kwargs).logits.data  # (B, T, V)


def _pick(logits, targets):
    """(log p(targets) (R, M) float64, targets are the argmax (R, M) bool) from
    logits (R, M, V), which this overwrites: a log-softmax over the whole vocabulary
    would be a second (R, M, V) array, and only M entries of each row are wanted. The
    exponentials are summed in float64."""
    xp = backend.get_array_module(logits)
    greedy = logits.argmax(axis=-1) == targets  # (R, M)
    logits -= logits.max(axis=-1, keepdims=True)  # (R, M, V), max 0
    picked = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (R, M)
    picked = picked.astype(np.float64)
    xp.exp(logits, out=logits)
    lse = xp.log(logits.sum(axis=-1, dtype=np.float64))  # (R, M)
    return picked - lse, greedy
