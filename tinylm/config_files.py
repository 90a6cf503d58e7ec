"""Shared by the model config (``tinylm.models.config``) and the training config
(``tinylm.train``): the TOML reader, and the type check of a dataclass's fields."""

from __future__ import annotations

import dataclasses

from tinylm.errors import ConfigError


def toml_module(advice: str = ""):
    """``tomllib`` (or ``tomli`` on Python 3.10); ``advice`` ends the error if neither is there."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as e:
            raise ConfigError("reading TOML on Python 3.10 needs `pip install tomli`"
                              + advice) from e
    return tomllib


def field_type_problems(obj, types: dict) -> list:
    """Check each field of the dataclass ``obj`` against its annotation (a string like
    ``"int | None"``), ``types`` mapping each annotation name to the Python types it
    accepts (names not in it are not checked); a bool is not an int here. Returns the
    problems found; an int in a float field is turned into a float."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in types.get(k, ()))
        bad_bool = isinstance(value, bool) and bool not in allowed
        if allowed and (not isinstance(value, allowed) or bad_bool):
            problems.append(f"{f.name} must be {f.type}, got {value!r}")
        elif "float" in kinds and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, f.name, float(value))
    return problems
