"""``tinylm audit``: memorization and bias audits of a model.

    tinylm audit canaries insert --format "my pin is {d}{d}{d}{d}" --repeats 1,10,100 \\
        --data in.txt --out out.txt          # then: tinylm train --data out.txt ...
    tinylm audit exposure --model runs/demo --canaries out.txt.canaries.json --report audit/
    tinylm audit extraction --model runs/demo --train in.txt --heldout other.txt --report audit/
    tinylm audit crows-pairs --model hf/gpt2 --data crows_pairs_anonymized.csv

exposure: the Secret Sharer's exposure of each canary of the manifest (exact over the
whole secret space when it has at most --exact-limit secrets, else the skew-normal
estimate from --samples of them); extraction: the fraction of --train and --heldout
sequences whose next --suffix tokens greedy decoding reproduces from their first
--prefix (``tinylm.evaluation.memorization``). --report DIR writes the result as JSON,
a Markdown summary and a plot (matplotlib). crows-pairs: CrowS-Pairs' bias metrics,
scored as lm-evaluation-harness does for a decoder and as the paper does for a
masked-LM encoder (``tinylm.evaluation.bias``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import click

from tinylm.commands.eval_harness import encoding_options, report_options
from tinylm.commands.generate import model_options
from tinylm.commands.options import option_group, writable_file, writable_folder


@click.group(name="audit")
def audit_group():
    """Audit a model: canary exposure, training-data extraction, CrowS-Pairs bias."""


@dataclass(frozen=True)
class AuditOutput:
    """--json, --report, --progress: where a memorization audit's results go."""

    as_json: bool = False
    report_dir: str | None = None
    progress: bool = True

    def emit(self, name: str, data: dict, table: str, markdown, plot) -> None:
        """Write the --report folder (``markdown(data)``, ``plot``: see
        ``tinylm.evaluation.audit_report``), then print the table or the JSON."""
        if self.report_dir:
            from tinylm.evaluation.audit_report import write_report

            paths, note = write_report(self.report_dir, name, data, markdown(data), plot)
            click.echo(f"wrote {', '.join(paths)}", err=True)
            if note:
                click.echo(note, err=True)
        click.echo(json.dumps(data, indent=1, ensure_ascii=False) if self.as_json else table)


audit_output_options = option_group(
    "output", AuditOutput,
    click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
                 callback=writable_folder,
                 help="Write NAME.json, NAME.md and NAME.png (the plot needs matplotlib) "
                      "into this folder."),
    click.option("--progress/--no-progress", default=True, show_default=True))

# --------------------------------------------------------------------------- canaries


@audit_group.group(name="canaries")
def canaries_group():
    """Canaries: random secrets put into training data, to measure their exposure."""


def _repeats(ctx, param, value):
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of counts "
                                 f"(1,10,100)", ctx=ctx, param=param) from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("give counts >= 1, e.g. 1,10,100", ctx=ctx, param=param)
    return counts


@canaries_group.command(name="insert")
@click.option("--format", "template", required=True,
              help="The canary with placeholders for the secret: {d} digit, {l} / {u} lower "
                   "/ upper case letter, {x} hex digit, {a} digit or letter "
                   "(\"my pin is {d}{d}{d}{d}\").")
@click.option("--repeats", default="1,10,100", show_default=True, callback=_repeats,
              help="One canary per count, inserted that many times.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The training text to insert them into.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=writable_file,
              help="Where the text with the canaries goes.")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False), default=None,
              callback=writable_file,
              help="The canaries' record, for `tinylm audit exposure` [default: "
                   "OUT.canaries.json].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=0.9,
              show_default=True,
              help="Insert only into the first FRACTION of the text (by characters): "
                   "`tinylm train` holds out the last --val-fraction (0.1) for validation.")
def insert_command(template, repeats, data, out, manifest_path, seed, fraction):
    """Insert random secrets of --format into --data, each --repeats times."""
    from tinylm.atomic import write_atomic
    from tinylm.evaluation.memorization import SecretFormat, insert_canaries, manifest
    from tinylm.tokenizers.formats import read_text_file

    fmt = SecretFormat.parse(template)
    if os.path.abspath(out) == os.path.abspath(data):
        raise click.UsageError("--out must not be --data: write the canaried copy elsewhere")
    text, canaries = insert_canaries(read_text_file(data), fmt, repeats, seed=seed,
                                     fraction=fraction)
    manifest_path = manifest_path or f"{out}.canaries.json"
    record = manifest(fmt, canaries, seed=seed, data=os.path.abspath(data))
    write_atomic(out, text)
    write_atomic(manifest_path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    for c in canaries:
        click.echo(f"{c.repeats:>6} x {c.text}")
    click.echo(f"wrote {out} and {manifest_path} (|R| = {fmt.size} secrets)", err=True)


# --------------------------------------------------------------------------- exposure


@audit_group.command(name="exposure")
@model_options
@click.option("--canaries", "manifest_path", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="The manifest `tinylm audit canaries insert` wrote.")
@click.option("--exact-limit", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="Score every secret when there are at most this many; else estimate.")
@click.option("--samples", type=click.IntRange(min=3), default=5000, show_default=True,
              help="Secrets to sample for the skew-normal estimate.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Secrets per forward.")
@audit_output_options
def exposure_command(model, manifest_path, exact_limit, samples, seed, batch_size,
                     output: AuditOutput):
    """The exposure of each canary of a manifest in --model."""
    from tinylm.evaluation.memorization import ExposureOptions, canary_exposures, read_manifest
    from tinylm.tokenizers.formats import read_json

    fmt, canaries, context = read_manifest(read_json(manifest_path), manifest_path)
    options = ExposureOptions(exact_limit, samples, seed, context, batch_size, output.progress)
    net, tokenizer = model.load()
    with model.precision():
        report = canary_exposures(net, tokenizer, fmt, [c.text for c in canaries],
                                  repeats=[c.repeats for c in canaries], options=options)
    data = {"model": model.path, "manifest": manifest_path, **report.to_dict()}
    from tinylm.evaluation.audit_report import exposure_markdown, exposure_plot

    output.emit("exposure", data, exposure_table(data), exposure_markdown,
                exposure_plot(data, report.scores))


def exposure_table(data: dict) -> str:
    lines = [f"format {data['format']!r}: |R| = {data['secret_space']} "
             f"({data['log2_secret_space']:.2f} bits), {data['method']} over "
             f"{data['n_scored']} secrets",
             f"{'canary':<30} {'inserted':>8} {'log-ppl':>8} {'rank':>7} {'exposure':>9} "
             f"{'estimate':>9}"]
    for c in data["canaries"]:
        rank = "-" if c["rank"] is None else c["rank"]
        estimate = c["estimated_exposure"]
        estimate = "-" if estimate is None else f"{estimate:.2f}"
        lines.append(f"{c['text']:<30} {c['repeats']:>8} {c['log_perplexity']:>8.2f} "
                     f"{rank:>7} {c['exposure']:>9.2f} {estimate:>9}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- extraction


@audit_group.command(name="extraction")
@model_options
@click.option("--train", "train_file", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Text the model was trained on.")
@click.option("--heldout", "heldout_file", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Text of the same kind it was not trained on (the baseline).")
@click.option("--prefix", type=click.IntRange(min=1), default=50, show_default=True,
              help="Tokens of each sequence to prompt with (k).")
@click.option("--suffix", type=click.IntRange(min=1), default=50, show_default=True,
              help="Tokens to reproduce exactly.")
@click.option("--samples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Sequences of each text (non-overlapping, at random).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@audit_output_options
def extraction_command(model, train_file, heldout_file, prefix, suffix, samples, seed,
                       batch_size, output: AuditOutput):
    """How much of --train (against --heldout) greedy decoding reproduces verbatim."""
    from tinylm.evaluation.memorization import extraction_audit
    from tinylm.tokenizers.formats import read_text_file

    net, tokenizer = model.load()
    limit = getattr(getattr(net, "config", None), "max_positions", None)
    if limit is not None and prefix + suffix - 1 > limit:
        from tinylm.errors import TinyLMError

        raise TinyLMError(f"--prefix {prefix} + --suffix {suffix} tokens do not fit the "
                          f"model's {limit} positions: greedy decoding would slide past the "
                          f"prefix; give --prefix + --suffix at most {limit + 1}")
    with model.precision():
        results = extraction_audit(net, tokenizer, read_text_file(train_file),
                                   read_text_file(heldout_file), prefix=prefix,
                                   suffix=suffix, samples=samples, seed=seed,
                                   batch_size=batch_size, progress=output.progress)
    data = {"model": model.path, "train": train_file, "heldout": heldout_file,
            "results": {name: r.to_dict() for name, r in results.items()}}
    from tinylm.evaluation.audit_report import extraction_markdown, extraction_plot

    output.emit("extraction", data, extraction_table(data), extraction_markdown,
                extraction_plot(data))


def extraction_table(data: dict) -> str:
    lines = [f"{'text':<8} {'sequences':>9} {'prefix':>6} {'suffix':>6} {'extracted':>9} "
             f"{'rate':>6} {'matched':>8}"]
    for name, r in data["results"].items():
        lines.append(f"{name:<8} {r['sequences']:>9} {r['prefix_tokens']:>6} "
                     f"{r['suffix_tokens']:>6} {r['extracted']:>9} "
                     f"{r['extraction_rate']:>6.3f} {r['mean_matched_tokens']:>8.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- crows-pairs


@audit_group.command(name="crows-pairs")
@model_options
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A CrowS-Pairs CSV (sent_more, sent_less, stereo_antistereo, bias_type).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N pairs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@encoding_options
@report_options
def crows_pairs_command(model, data, limit, batch_size, encoding, report):
    """CrowS-Pairs: pct_stereotype and likelihood_diff, overall and per bias type."""
    from tinylm.evaluation.bias import evaluate_crows_pairs, read_crows_pairs
    from tinylm.objectives import model_kind

    pairs = read_crows_pairs(data)[:limit]
    net, tokenizer = model.load()
    encoding.check(net)
    encoder = (encoding.encoder(model, net, tokenizer) if model_kind(net) == "decoder"
               else None)
    with model.precision():
        result = evaluate_crows_pairs(net, tokenizer, pairs, encoder=encoder,
                                      batch_size=batch_size, progress=report.progress,
                                      max_length=encoding.max_length)
    full = {"model": model.path, "data": data, **result}
    summary = {k: v for k, v in full.items() if k != "scores"}
    report.emit(full, crows_pairs_table(summary), summary)


def crows_pairs_table(report: dict) -> str:
    rows = [("all", report)] + list(report["by_bias_type"].items())
    lines = [f"CrowS-Pairs ({report['method']} scoring), {report['pairs']} pairs",
             f"{'bias type':<22} {'pairs':>5} {'pct_stereotype':>14} {'stderr':>7} "
             f"{'likelihood_diff':>15} {'stderr':>7}"]
    for name, r in rows:
        lines.append(f"{name:<22} {r['pairs']:>5} {r['pct_stereotype']:>14.4f} "
                     f"{r['pct_stereotype_stderr']:>7.4f} {r['likelihood_diff']:>15.4f} "
                     f"{r['likelihood_diff_stderr']:>7.4f}")
    return "\n".join(lines)
