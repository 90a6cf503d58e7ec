"""Rollouts for RL: a group of sampled completions per prompt, laid out as TRL lays them
out, and the per-token log-probabilities of a model on them.

    completions = sample_groups(model, prompt_ids, G, max_new_tokens=256, temperature=1.0,
                                eos_ids={0}, rng=rng)        # B*G lists of new ids
    batch = layout([p for p in prompt_ids for _ in range(G)], completions, pad_id=0)
    logp = token_logps(model, batch, temperature=1.0)    # Tensor (R, C), with gradients
    old = token_logps_array(model, batch, 1.0)           # (R, C) NumPy, no graph, eval mode

Sampling is ``tinylm.generate.generate`` (the KV-cache sampler, every row of the
batch at once) drawing from the ``numpy.random.Generator`` handed in: the Trainer's
seeded objective generator, saved with every checkpoint, so a resumed run draws the
same completions. Each prompt is repeated G times, consecutively (TRL's
``RepeatSampler``); a completion ends after its first end-of-sequence token (kept)
or at ``max_new_tokens``.

A batch of R = B*G rows (``layout``), as TRL's ``_generate_and_score_completions``
builds it: the prompts left-padded to the longest, P columns, the completions
right-padded to the longest, C columns, side by side::

    ids              (R, P+C) int64  prompt | completion, padded with pad_id
    attention_mask   (R, P+C) int64  1 = token, 0 = padding
    positions        (R, P+C) int64  each row's tokens numbered from 0 (padding repeats
                                     a neighbour's): as the sampler numbered them, so the
                                     training forward gives the sampler's logits (TRL
                                     passes no position ids: a Hugging Face model then
                                     numbers the left padding too; equal without it)
    completion_ids   (R, C)   int64
    completion_mask  (R, C)   float  1 on the completion's tokens (eos included), 0 after
    targets          (R, C)   int64  completion_ids, IGNORE where the mask is 0
    prompt_width     int             P
    n_tokens         int             tokens that are not padding

Log-probabilities are those of the sampling distribution, softmax(logits /
temperature), as TRL's fused LM head computes them (``temperature=``).
"""

from __future__ import annotations

import base64

import numpy as np

from tinylm.objectives import IGNORE
from tinylm.sampling import SamplingConfig


# --------------------------------------------------------------------------- sampling


def sample_groups(model, prompt_ids, num_generations: int, *, max_new_tokens: int,
                  temperature: float, eos_ids, rng: np.random.Generator) -> list:
    """``num_generations`` completions of each prompt (lists of ids), prompt by prompt:
    rows [p0, p0, ..., p1, p1, ...]."""
    from tinylm.generate import generate

    rows = [list(p) for p in prompt_ids for _ in range(num_generations)]
    out = generate(model, rows, max_new_tokens, sampling=SamplingConfig(temperature=temperature),
                   eos_id=tuple(eos_ids), seed=rng)
    return out.tokens


def layout(prompt_rows, completions, pad_id: int) -> dict:
    """The batch of the module docstring from R prompt rows (a prompt once per
    completion) and R completions (lists of ids, at least one each)."""
    R = len(prompt_rows)
    P = max(len(p) for p in prompt_rows)
    C = max(len(c) for c in completions)
    p_len = np.array([len(p) for p in prompt_rows])  # (R,)
    c_len = np.array([len(c) for c in completions])  # (R,)
    prompt = np.full((R, P), pad_id, dtype=np.int64)
    completion = np.full((R, C), pad_id, dtype=np.int64)
    p_real = np.arange(P)[None, :] >= (P - p_len)[:, None]  # (R, P) left padding
    c_real = np.arange(C)[None, :] < c_len[:, None]  # (R, C) right padding
    prompt[p_real] = np.concatenate([np.asarray(p, np.int64) for p in prompt_rows])
    completion[c_real] = np.concatenate([np.asarray(c, np.int64) for c in completions])
    mask = np.concatenate([p_real, c_real], axis=1).astype(np.int64)  # (R, P+C)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (R, P+C)
    return {"ids": np.concatenate([prompt, completion], axis=1), "attention_mask": mask,
            "positions": positions, "completion_ids": completion,
            "completion_mask": c_real.astype(np.float64),
            "targets": np.where(c_real, completion, IGNORE), "prompt_width": int(P),
            "n_tokens": int(mask.sum())}


def mask_truncated(batch: dict, eos_ids, pad_id: int) -> None:
    """TRL's ``mask_truncated_completions``: a completion that did not end with an
    end-of-sequence (or pad) token gets a zero mask (no loss, no gradient), in place."""
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    last = ids[np.arange(len(ids)), np.maximum(mask.sum(axis=1).astype(np.int64) - 1, 0)]
    ended = np.isin(last, np.array(sorted({*eos_ids, pad_id}), dtype=np.int64))  # (R,)
    batch["completion_mask"] = mask * ended[:, None]
    batch["targets"] = np.where(batch["completion_mask"] > 0, ids, IGNORE)


# --------------------------------------------------------------------------- log-probabilities


def completion_logits(model, batch: dict, temperature: float = 1.0):
    """The logits (R, C, V) Tensor that predict the completion tokens, divided by
    ``temperature``: the positions P-1 .. P+C-2 of the whole rows."""
    P, C = batch["prompt_width"], batch["completion_ids"].shape[1]
    out = model(batch["ids"], attention_mask=batch["attention_mask"],
                positions=batch["positions"])
    logits = out.logits[:, P - 1:P + C - 1]  # (R, C, V)
    return logits if temperature == 1.0 else logits * (1.0 / temperature)


def token_logps(model, batch: dict, temperature: float = 1.0, logits=None):
    """log p(completion token | everything before it), (R, C) Tensor with gradients, 0
    where the completion mask is 0 (TRL's labels -100 there)."""
    from tinylm.ops import cross_entropy

    if logits is None:
        logits = completion_logits(model, batch, temperature)
    return -cross_entropy(logits, logits.xp.asarray(batch["targets"]), reduction="none")


def token_logps_array(model, batch: dict, temperature: float = 1.0) -> np.ndarray:
    """``token_logps`` as a float64 NumPy array, computed in eval mode without a graph
    (the old policy's and the reference's log-probabilities)."""
    from tinylm import backend
    from tinylm.generate import inference

    with inference(model):
        return backend.to_numpy(token_logps(model, batch, temperature).data).astype(np.float64)


ENTROPY_CHUNK = 1 << 22  # logits per piece of the entropy (16 MB of float32)


def entropy(logits) -> np.ndarray:
    """(R, C) float64 entropy of softmax(logits) per position, from a logits Tensor's
    data (for the metrics: no graph), on its device in its dtype, a few rows at a time
    so that no second (R, C, V) array is made."""
    from tinylm import backend
    from tinylm.ops.nn import log_softmax_array

    x = logits.data  # (R, C, V)
    xp = backend.get_array_module(x)
    rows = max(1, ENTROPY_CHUNK // max(x.shape[1] * x.shape[2], 1))
    out = np.zeros(x.shape[:2], dtype=np.float64)
    for start in range(0, x.shape[0], rows):  # pieces of rows, not a loop over tokens
        logp = log_softmax_array(x[start:start + rows])  # (r, C, V)
        h = -(xp.exp(logp) * xp.where(xp.isinf(logp), 0, logp)).sum(axis=-1)
        out[start:start + rows] = backend.to_numpy(h)
    return out


# --------------------------------------------------------------------------- checkpoints


def encode(batch: dict) -> dict:
    """A rollout batch as JSON-ready values, exactly: each array as its dtype, shape
    and little-endian bytes in base64; numbers, strings and lists as they are."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            a = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
            out[key] = {"array": a.dtype.str, "shape": list(a.shape),
                        "data": base64.b64encode(a.tobytes()).decode("ascii")}
        elif isinstance(value, dict):
            out[key] = {"dict": encode(value)}
        else:
            out[key] = value
    return out


def decode(saved: dict) -> dict:
    """The batch ``encode`` wrote, bit for bit."""
    out = {}
    for key, value in saved.items():
        if isinstance(value, dict) and "array" in value:
            raw = base64.b64decode(value["data"])
            out[key] = np.frombuffer(raw, dtype=np.dtype(value["array"])).reshape(
                value["shape"]).astype(np.dtype(value["array"]).newbyteorder("="))
        elif isinstance(value, dict) and "dict" in value:
            out[key] = decode(value["dict"])
        else:
            out[key] = value
    return out
