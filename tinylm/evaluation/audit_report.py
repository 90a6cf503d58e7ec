"""The report of a memorization audit: a JSON file, a Markdown summary and a plot.

    data = exposure_report.to_dict()
    write_report("audit/", "exposure", data, exposure_markdown(data),
                 exposure_plot(data, exposure_report.scores))   # plot: pyplot -> figure

The plot needs matplotlib (``pip install 'tinylm[plot]'``); without it the JSON and
the Markdown are still written and ``write_report`` returns a note saying how to get
the plot. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from tinylm.atomic import atomic_open, write_atomic
from tinylm.errors import TinyLMError

NO_MATPLOTLIB = ("no plot: matplotlib is not installed; pip install 'tinylm[plot]' (or "
                 "pip install matplotlib) and run the audit again")


def write_report(folder, name: str, data: dict, markdown: str, plot) -> tuple:
    """(the paths written, a note or None): FOLDER/NAME.json, FOLDER/NAME.md and, when
    matplotlib is there, FOLDER/NAME.png drawn by ``plot(path)``."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise TinyLMError(f"cannot create the report folder {folder}: {e.strerror or e}; "
                          f"pick another --report") from None
    paths = [os.path.join(folder, f"{name}.json"), os.path.join(folder, f"{name}.md")]
    write_atomic(paths[0], json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    image = os.path.join(folder, f"{name}.png")
    plt = _pyplot()
    note = None
    if plt is None:
        note = NO_MATPLOTLIB
    else:
        fig = plot(plt)
        try:
            with atomic_open(image, "wb") as f:
                fig.savefig(f, dpi=120, format="png")
        finally:
            plt.close(fig)
        paths.append(image)
        markdown += f"\n![{name}]({name}.png)\n"
    write_atomic(paths[1], markdown)
    return paths, note


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# --------------------------------------------------------------------------- exposure


def exposure_markdown(report: dict) -> str:
    """A table of the canaries of ``ExposureReport.to_dict()``."""
    bits = report["log2_secret_space"]
    lines = [f"# Canary exposure\n",
             f"Format `{report['format']}`: |R| = {report['secret_space']} secrets "
             f"(log2 |R| = {bits:.2f} bits, the largest exposure); {report['method']} over "
             f"{report['n_scored']} scored secrets.\n",
             "| canary | inserted | log-perplexity (bits) | rank | exposure | estimate |",
             "|---|---:|---:|---:|---:|---:|"]
    for c in report["canaries"]:
        rank = "-" if c["rank"] is None else str(c["rank"])
        lines.append(f"| `{c['text']}` | {c['repeats']} | {c['log_perplexity']:.2f} | {rank} "
                     f"| {c['exposure']:.2f} | {_number(c['estimated_exposure'])} |")
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def exposure_plot(report, scores):
    """A figure-drawing function for ``write_report``: exposure per canary (by how often
    it was inserted) beside the distribution of the scored secrets' log-perplexities
    with each canary marked."""

    def draw(plt):
        data = report
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        canaries = data["canaries"]
        labels = [f"x{c['repeats']}" if c["repeats"] else c["text"][-12:] for c in canaries]
        x = np.arange(len(canaries))
        left.bar(x - 0.2, [c["exposure"] for c in canaries], 0.4, label=data["method"])
        left.bar(x + 0.2, [c["estimated_exposure"] or 0.0 for c in canaries], 0.4,
                 label="skew-normal estimate", alpha=0.7)
        left.axhline(data["log2_secret_space"], color="k", linestyle="--", linewidth=1,
                     label="log2 |R|")
        left.set_xticks(x, labels)
        left.set_xlabel("canary (times inserted)")
        left.set_ylabel("exposure (bits)")
        left.legend(fontsize=8)
        finite = scores[np.isfinite(scores)]
        right.hist(finite, bins=min(80, max(10, int(math.sqrt(len(finite))))), color="0.6")
        for i, (c, label) in enumerate(zip(canaries, labels)):
            right.axvline(c["log_perplexity"], color=f"C{i + 1}", linestyle="--",
                          label=f"{label}: {c['log_perplexity']:.1f}")
        right.set_xlabel("log-perplexity (bits)")
        right.set_ylabel("secrets")
        right.legend(fontsize=8)
        fig.suptitle(f"tinylm audit exposure: {data['format']}")
        fig.tight_layout()
        return fig

    return draw


# --------------------------------------------------------------------------- extraction


def extraction_markdown(report: dict) -> str:
    """A table of the train / held-out extraction rates."""
    lines = ["# Extraction\n",
             "Greedy continuation of a sequence's first k tokens; extracted = the next "
             "tokens all reproduced exactly (Carlini et al. 2022).\n",
             "| text | sequences | prefix | suffix | extracted | rate | mean matched |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['sequences']} | {r['prefix_tokens']} | "
                     f"{r['suffix_tokens']} | {r['extracted']} | {r['extraction_rate']:.3f} | "
                     f"{r['mean_matched_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


def extraction_plot(report: dict):
    """A figure-drawing function: the extraction rates, and how many leading suffix
    tokens matched (the fraction of sequences matching at least n)."""

    def draw(plt):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        names = list(report["results"])
        rates = [report["results"][n]["extraction_rate"] for n in names]
        bars = left.bar(names, rates, color=["C3", "C0"][: len(names)])
        left.bar_label(bars, [f"{r:.3f}" for r in rates])
        left.set_ylim(0, 1.05)
        left.set_ylabel("extraction rate")
        for name in names:
            r = report["results"][name]
            matched = np.asarray(r["matched_tokens"])
            n = np.arange(r["suffix_tokens"] + 1)
            right.step(n, (matched[None, :] >= n[:, None]).mean(axis=1), where="post",
                       label=name)
        right.set_xlabel("leading suffix tokens reproduced (n)")
        right.set_ylabel("fraction of sequences with >= n")
        right.legend()
        fig.suptitle("tinylm audit extraction")
        fig.tight_layout()
        return fig

    return draw
