"""Shared by the config dataclasses (``tinylm.models.config``, ``tinylm.train``,
``tinylm.sampling``): the TOML module, a TOML/JSON file reader (``read_config_data``),
the type and finiteness checks of a dataclass's fields, and the check for unknown field
names."""

from __future__ import annotations

import dataclasses
import math

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


def read_config_data(path, error=ConfigError, kind: str | None = None):
    """What a TOML (``.toml``, or ``kind="TOML"``) or JSON (any other name) config file
    holds. Each way it can fail is one ``error`` line saying what to do: missing, a
    folder, unreadable, not
    UTF-8 text (a binary file: "'utf-8' codec can't decode byte 0xff" said nothing of
    what to give), or not valid TOML/JSON."""
    import json
    import os

    path = os.fspath(path)
    kind = kind or ("TOML" if path.endswith(".toml") else "JSON")
    try:
        if kind == "TOML":
            tomllib = toml_module("; or write the config as JSON")
            with open(path, "rb") as f:
                return tomllib.load(f)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"config file not found: {path}; check the path") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder; give a .toml or .json config file") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not a {kind} config: byte {e.start} is not UTF-8 text (a "
                    f"binary file?); give a .toml or .json config file") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}; check its permissions") from None
    except ValueError as e:  # TOMLDecodeError and JSONDecodeError
        raise error(f"cannot parse {path}: {e}; fix the {kind} there") from None


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


def non_finite_problems(obj) -> list:
    """The fields of the dataclass ``obj`` holding NaN or an infinity, also inside dict
    and list fields (``positional_options``, a training config's ``[model]`` table):
    no setting that takes a float means anything at those values."""
    problems = []

    def visit(name, value):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{name} must be a finite number, got {value}")
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(name, item)

    for f in dataclasses.fields(obj):
        visit(f.name, getattr(obj, f.name))
    return problems


def check_known_fields(cls, data, noun: str, advice: str = "") -> None:
    """Raise ``ConfigError`` if ``data`` (a mapping, or keyword arguments) names a
    field that the dataclass ``cls`` lacks; the message lists its fields, calling
    them ``noun``s ("sampling option"), then ``advice``."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {noun}(s) {', '.join(unknown)}; the {noun}s are "
                          f"{', '.join(names)}{advice}")
