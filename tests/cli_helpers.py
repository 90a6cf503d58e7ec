"""Driving the `tinylm` command line in tests: run it, and check a failure is one line."""

from __future__ import annotations

from click.testing import CliRunner

from tinylm.cli import cli


def run(*args, input=None):
    """``tinylm ARGS`` through Click's test runner (paths may be Path objects)."""
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, prog_name="tinylm")


def run_ok(*args, input=None):
    """``run(*args)`` that must succeed (exit 0); its result. A failure shows the
    output and the exception."""
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def one_error_line(result, *fragments) -> str:
    """Exit code 2, exactly one `Error:` line on stderr (Click's usage errors put their
    `Usage:` lines above it; tinylm's own errors are that line alone) holding every
    fragment (case-insensitive), and no traceback anywhere. Returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), errors[0]
    return errors[0]


def gguf_variants(tmp, hf):
    """variant(name, fields): a copy of a q8_0 GGUF export of the model in folder ``hf``
    with those metadata fields (GGUFValue) replaced, written under ``tmp``."""
    from tinylm.formats.gguf import read_gguf, write_gguf

    good = tmp / "good.gguf"
    assert run("quantize", hf, "--to", "q8_0", "-o", good).exit_code == 0
    f = read_gguf(good)

    def variant(name, fields):
        kept = {k: v for k, v in f.fields.items() if k != "general.alignment"}
        write_gguf(tmp / name, {**kept, **fields}, dict(f.tensors))
        return tmp / name

    return variant
