"""``tinylm plot RUN_DIR``: draw a run's loss curves (RUN_DIR/metrics.jsonl) to a PNG.

    tinylm plot runs/demo                  # writes runs/demo/loss.png
    tinylm plot runs/a runs/b -o cmp.png   # several runs on one chart
    tinylm plot runs/demo -o charts/       # a folder: writes charts/loss.png

Needs matplotlib: ``pip install 'tinylm[plot]'``.
"""

from __future__ import annotations

import os

import click

from tinylm.atomic import atomic_open
from tinylm.errors import TinyLMError

DEFAULT_NAME = "loss.png"
FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def plot_runs(run_dirs, output, title=None) -> str:
    """Draw the training loss (thin) and validation loss (markers) of each run."""
    from tinylm.rundir import METRICS_FILE, read_metrics

    check_runs(run_dirs)  # bad input first: it is an error with or without matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TinyLMError("tinylm plot needs matplotlib: pip install 'tinylm[plot]' "
                          "(or pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for run in run_dirs:
        records = read_metrics(os.path.join(run, METRICS_FILE))
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        label = os.path.basename(os.path.normpath(run)) if len(run_dirs) > 1 else ""
        if train:
            ax.plot(*zip(*train), linewidth=1, alpha=0.7,
                    label=f"{label} train".strip())
        if val:
            ax.plot(*zip(*val), marker="o", linewidth=2, label=f"{label} val".strip())
        drawn += len(train) + len(val)
    if not drawn:
        raise TinyLMError(f"no loss values in {', '.join(run_dirs)} yet; train for at "
                          f"least --log-every steps first")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "tinylm: " + ", ".join(os.path.normpath(r) for r in run_dirs))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_open(output, "wb") as f:
            fig.savefig(f, dpi=120, format=_image_format(output))
    finally:
        plt.close(fig)
    return output


def check_runs(run_dirs) -> None:
    """A TinyLMError naming the first of ``run_dirs`` without a metrics.jsonl."""
    from tinylm.rundir import METRICS_FILE

    for run in run_dirs:
        if not os.path.exists(os.path.join(run, METRICS_FILE)):
            raise TinyLMError(f"{run} has no {METRICS_FILE}; is it the --out folder of a "
                              f"`tinylm train` run?")


def output_path(output, run_dir) -> str:
    """Where the chart goes: ``output`` (a folder: loss.png inside it), default
    RUN_DIR/loss.png; a missing folder or an unknown extension is a TinyLMError."""
    output = os.fspath(output) if output else os.path.join(run_dir, DEFAULT_NAME)
    if os.path.isdir(output):
        output = os.path.join(output, DEFAULT_NAME)
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise TinyLMError(f"cannot write {output}: the folder {os.path.dirname(output) or '.'} "
                          f"does not exist; create it, or pick another -o")
    _image_format(output)
    return output


def _image_format(output: str) -> str:
    ext = os.path.splitext(output)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise TinyLMError(f"cannot write {output}: -o must end in "
                          f"{', '.join('.' + f for f in FORMATS)} (or name a folder)")
    return ext


@click.command(name="plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", help="The image to write (.png, .pdf, .svg, .jpg), or a folder "
                                     "to write loss.png into [default: RUN_DIR/loss.png].")
@click.option("--title", help="The chart's title.")
def plot_command(run_dirs, output, title):
    """Draw the loss curves of RUN_DIRS (their metrics.jsonl) to a PNG."""
    check_runs(run_dirs)
    output = output_path(output, run_dirs[0])
    plot_runs(list(run_dirs), output, title)
    click.echo(f"wrote {output}", err=True)
