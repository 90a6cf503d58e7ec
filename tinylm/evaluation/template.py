"""The ``{{ ... }}`` templates of lm-evaluation-harness task files, rendered on one document.

    render("Question: {{question}}\\nAnswer:", {"question": "2+2?"})   # 'Question: 2+2?\\nAnswer:'
    render("{{choices.text}}", doc)                  # "['a', 'b']" (a list renders as str())

lm-eval renders ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` with Jinja2
(undefined names are errors, a trailing newline is kept, a ``regex_replace`` filter).
When ``jinja2`` is installed (transformers brings it) the same happens here, in Jinja's
sandbox: a task file can call a string's or a list's methods (``question.strip()``,
``choices.label.index(answerKey)``) but cannot reach Python beyond them. Without
``jinja2`` the common templates still render: each ``{{ expr }}`` may be a field, its
``.name`` / ``[0]`` / ``['key']`` parts and a final ``.strip()``; anything else says to
install jinja2.
"""

from __future__ import annotations

import functools
import re

from tinylm.errors import TinyLMError

_EXPR = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)
_PART = re.compile(r"\.([A-Za-z_]\w*)|\[\s*(-?\d+)\s*\]|\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]")
_NAME = re.compile(r"[A-Za-z_]\w*")


class TemplateError(TinyLMError):
    """A task template that does not render on a document."""


def render(template: str, doc: dict) -> str:
    """``template`` with each ``{{ expr }}`` replaced by its value on ``doc`` (str() of it)."""
    env = _jinja_env()
    if env is None:
        return _render_simple(template, doc)
    import jinja2

    try:
        return env.from_string(template).render(**doc)
    except jinja2.TemplateError as e:
        raise TemplateError(f"template {template!r} does not render on a document with "
                            f"fields {sorted(doc)}: {e}") from None
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise TemplateError(f"template {template!r} failed on a document with fields "
                            f"{sorted(doc)}: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=1)
def _jinja_env():
    try:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import SandboxedEnvironment
    except ImportError:
        return None
    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(
        pattern, repl, s, count=count)
    return env


def _render_simple(template: str, doc: dict) -> str:
    """The jinja2-free subset: fields, their parts, and ``.strip()``."""
    if "{%" in template or "{#" in template:
        raise TemplateError(f"template {template!r} uses Jinja statements; "
                            f"`pip install jinja2` to render it")
    return _EXPR.sub(lambda m: str(_value(m.group(1), doc, template)), template)


def _value(expr: str, doc: dict, template: str):
    strip = expr.endswith(".strip()")
    if strip:
        expr = expr[: -len(".strip()")].rstrip()
    head = _NAME.match(expr)
    if head is None or "(" in expr or "|" in expr:  # a call, a filter: Jinja's
        raise _unsupported(expr, template)
    if head.group(0) not in doc:
        raise TemplateError(f"template {template!r} names {head.group(0)!r}, which the "
                            f"document does not have (fields: {sorted(doc)})")
    value, pos = doc[head.group(0)], head.end()
    while pos < len(expr):
        m = _PART.match(expr, pos)
        if m is None:
            raise _unsupported(expr, template)
        attr, index, key1, key2 = m.groups()
        key = attr if attr is not None else key1 if key1 is not None else key2
        try:
            value = value[int(index)] if index is not None else value[key]
        except (KeyError, IndexError, TypeError):
            raise TemplateError(f"template {template!r}: {expr!r} does not exist in the "
                                f"document") from None
        pos = m.end()
    return str(value).strip() if strip else value


def _unsupported(expr, template):
    return TemplateError(f"template {template!r}: {{{{ {expr} }}}} needs Jinja; "
                         f"`pip install jinja2` to render it")
