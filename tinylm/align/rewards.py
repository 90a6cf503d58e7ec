"""Reward functions for RL (GRPO, RLOO): the built-ins, and calling any of them safely.

A reward function has TRL's signature (``GRPOTrainer``'s ``reward_funcs``)::

    def f(prompts, completions, completion_ids, **fields) -> list[float]

``prompts`` and ``completions`` hold one entry per completion (a prompt repeats once
per completion of its group): text, or, for a conversational prompt (a list of chat
messages), the messages and ``[{"role": "assistant", "content": text}]``, as TRL
passes them. ``completion_ids`` are the completions' token ids; ``fields`` are the
prompt records' other fields (``answer=[...]``), one value per completion. The
function returns one finite number per completion. Reward functions are plugins
(``register_reward_functions``): `tinylm align grpo --reward NAME` looks one up by name,
and a plugin's is used exactly as these built-ins (registered by
``tinylm.default_plugins.rewards``):

    exact-match    1.0 when the completion's final answer equals the record's "answer"
                   (or "solution", TRL's name) field, else 0.0 (``final_answer``)
    think-format   1.0 when the completion is "<think>...</think>" then the answer
                   (TRL's ``think_format_reward``, the same pattern), else 0.0
    regex          1.0 when the whole completion (stripped) matches the record's
                   "pattern" field (a Python regular expression), else 0.0

``score`` calls the functions of a run; a function that raises, returns something
other than one finite number per completion (NaN, None, a string, too few) is a
``RewardError`` that names the function and shows the prompt and completion at fault.
"""

from __future__ import annotations

import math
import numbers
import re

import numpy as np

from tinylm.errors import TinyLMError


class RewardError(TinyLMError, ValueError):
    """A reward function that failed, or returned something that is not one finite
    number per completion."""


# --------------------------------------------------------------------------- text of a completion


def content(item) -> str:
    """The text of a completion or prompt: itself, or the last message's content when
    it is conversational (a list of {"role", "content"} messages)."""
    if isinstance(item, str):
        return item
    if isinstance(item, (list, tuple)) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content", ""))
    return str(item)


# --------------------------------------------------------------------------- exact match

_BOXED = re.compile(r"\\boxed\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces counted), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[starts[-1]:i - 1] if depth == 0 else None


def final_answer(text: str) -> str:
    """The final answer of a completion: what follows the last "####" (GSM8K's
    marker), else the content of the last ``\\boxed{}``, else what follows the last
    "answer is" / "Answer:", else the whole text; stripped."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = list(re.finditer(r"(?i)\banswer(?:\s+is|\s*:)", text))
    if m:
        return text[m[-1].end():].strip()
    return text.strip()


def _normal(answer: str) -> str:
    """Lower case, single spaces, no surrounding "$" or trailing period."""
    answer = " ".join(str(answer).split()).strip().strip("$").strip()
    return answer.rstrip(".").strip().lower()


def _as_number(text: str):
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def answers_match(completion: str, answer) -> bool:
    """Whether the final answer of ``completion`` equals ``answer``: as numbers when
    the answer is one (the completion's first number in its final answer; 1,000 = 1000
    = 1000.0), else as normalised text (``_normal``)."""
    want, got = _normal(answer), _normal(final_answer(completion))
    number = _as_number(want)
    if number is not None:
        found = _NUMBER.search(got)
        value = _as_number(found.group()) if found else None
        return value is not None and math.isclose(value, number, rel_tol=1e-9, abs_tol=1e-12)
    return got == want


def exact_match(prompts, completions, answer=None, solution=None, **fields) -> list:
    """1.0 where the completion's final answer equals the record's ``answer`` (or
    ``solution``), else 0.0."""
    gold = answer if answer is not None else solution
    if gold is None:
        raise RewardError("the exact-match reward compares with each prompt record's "
                          "'answer' (or 'solution') field; the records have neither: add "
                          "one to every record")
    return [float(answers_match(content(c), g)) for c, g in zip(completions, gold)]


# --------------------------------------------------------------------------- format rewards

THINK_PATTERN = r"^<think>(?!.*<think>)(.*?)</think>.*$"  # TRL's think_format_reward


def think_format(prompts, completions, **fields) -> list:
    """1.0 where the completion is <think>reasoning</think> then anything (one <think>
    only), else 0.0: TRL's ``think_format_reward``."""
    return [1.0 if re.match(THINK_PATTERN, content(c), re.DOTALL | re.MULTILINE) else 0.0
            for c in completions]


def regex_match(prompts, completions, pattern=None, **fields) -> list:
    """1.0 where the stripped completion matches the record's ``pattern`` field as a
    whole (``re.fullmatch``, "." matching newlines too), else 0.0."""
    if pattern is None:
        raise RewardError("the regex reward matches each completion against its prompt "
                          "record's 'pattern' field; the records have none: add one")
    out = []
    for c, p in zip(completions, pattern):
        try:
            out.append(1.0 if re.fullmatch(p, content(c).strip(), re.DOTALL) else 0.0)
        except (re.error, TypeError) as e:
            raise RewardError(f"the regex reward's 'pattern' {p!r} is not a regular "
                              f"expression ({e}); fix it in the prompt records") from None
    return out


# --------------------------------------------------------------------------- calling them


def _show(item, limit: int = 160) -> str:
    text = repr(content(item) if not isinstance(item, str) else item)
    return text if len(text) <= limit else text[:limit] + "..."


def _where(prompts, completions, i: int) -> str:
    return f"the prompt {_show(prompts[i])} and completion {_show(completions[i])}"


def _call(name: str, fn, prompts, completions, ids, fields: dict) -> list:
    """``fn``'s rewards for these completions; when the batched call raises, each
    completion is scored alone to find the prompt it fails on."""
    try:
        return fn(prompts=prompts, completions=completions, completion_ids=ids, **fields)
    except RewardError as e:
        raise RewardError(f"reward function {name!r}: {e}") from None
    except Exception as e:  # a user's function: anything may come out of it
        failure = e
    for i in range(len(prompts)):
        one = {k: v[i:i + 1] for k, v in fields.items()}
        try:
            fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
               completion_ids=ids[i:i + 1], **one)
        except Exception as e:
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}, on "
                              f"{_where(prompts, completions, i)}; fix the function") from None
    raise RewardError(f"reward function {name!r} raised {type(failure).__name__}: {failure} "
                      f"on a batch starting with {_where(prompts, completions, 0)}; fix the "
                      f"function") from None


def _check(name: str, values, prompts, completions) -> np.ndarray:
    n = len(prompts)
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else \
            type(values).__name__
        raise RewardError(f"reward function {name!r} returned {got} for {n} completions; "
                          f"return a list with one number per completion")
    for i, v in enumerate(values):
        ok = isinstance(v, numbers.Real) and math.isfinite(float(v))
        if not ok:
            raise RewardError(f"reward function {name!r} returned {v!r} for "
                              f"{_where(prompts, completions, i)}; return a finite number "
                              f"for every completion")
    return np.asarray(values, dtype=np.float64)


def score(functions: dict, prompts, completions, completion_ids, fields: dict) -> np.ndarray:
    """(N, F) float64 rewards of N completions from each of the F ``functions``
    ({name: callable}) in order; ``fields``: {name: list of N values}."""
    prompts, completions = list(prompts), list(completions)
    ids = [list(map(int, r)) for r in completion_ids]
    columns = [_check(name, _call(name, fn, prompts, completions, ids, fields), prompts,
                      completions) for name, fn in functions.items()]
    return np.stack(columns, axis=1) if columns else np.zeros((len(prompts), 0))
