"""``tinylm plot RUN_DIR``: draw a run's loss curves (RUN_DIR/metrics.jsonl) to a PNG.

    tinylm plot runs/demo                  # writes runs/demo/loss.png
    tinylm plot runs/a runs/b -o cmp.png   # several runs on one chart
    tinylm plot runs/demo -o charts/       # a folder: writes charts/loss.png

An alignment run's chart has a panel per kind of metric it logged under the loss: the
reward (RL's mean ``reward`` with its ``reward_std`` band, DPO's ``rewards/margins``, a
reward model's ``mean_reward``) and the ``kl`` to the reference model.

Needs matplotlib: ``pip install 'tinylm[plot]'``.
"""

from __future__ import annotations

import os

import click

from tinylm.atomic import atomic_open
from tinylm.errors import TinyLMError

DEFAULT_NAME = "loss.png"
FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")
# the panels below the loss: (y label, the metrics.jsonl keys it draws)
PANELS = (("reward", ("reward", "rewards/margins", "mean_reward")),
          ("KL to the reference", ("kl",)))


def series(records, key: str) -> list:
    """(step, value) of every record of the training steps that has ``key``."""
    return [(r["step"], r[key]) for r in records if key in r and "loss" in r]


def _label(runs: dict, run: str, what: str) -> str:
    """A curve's legend: what it is, after the run's name when there are several."""
    return f"{os.path.basename(os.path.normpath(run))} {what}" if len(runs) > 1 else what


def _draw_loss(ax, runs: dict) -> int:
    """The training loss (thin) and validation loss (markers) of each run ({run:
    records}); returns the points drawn."""
    drawn = 0
    for run, records in runs.items():
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), linewidth=1, alpha=0.7, label=_label(runs, run, "train"))
        if val:
            ax.plot(*zip(*val), marker="o", linewidth=2, label=_label(runs, run, "val"))
        drawn += len(train) + len(val)
    ax.set_ylabel("loss (nats/token)")
    return drawn


def _draw_panel(ax, runs: dict, keys) -> int:
    """Draw ``keys`` of each run ({run: records}) on ``ax`` (the reward with its
    reward_std band); returns the points drawn."""
    drawn = 0
    for run, records in runs.items():
        for key in keys:
            points = series(records, key)
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, linewidth=1.5, label=_label(runs, run, key))
            spread = dict(series(records, "reward_std")) if key == "reward" else {}
            if spread and len(spread) == len(points):
                std = [spread[s] for s in steps]
                ax.fill_between(steps, [v - d for v, d in zip(values, std)],
                                [v + d for v, d in zip(values, std)], alpha=0.15)
            drawn += len(points)
    return drawn


def plot_runs(run_dirs, output, title=None) -> str:
    """Draw the training loss (thin) and validation loss (markers) of each run, and the
    reward and KL panels of the runs that logged them (``PANELS``)."""
    from tinylm.rundir import METRICS_FILE, read_metrics

    check_runs(run_dirs)  # bad input first: it is an error with or without matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TinyLMError("tinylm plot needs matplotlib: pip install 'tinylm[plot]' "
                          "(or pip install matplotlib)") from None
    runs = {run: read_metrics(os.path.join(run, METRICS_FILE)) for run in run_dirs}
    panels = [(name, keys) for name, keys in PANELS
              if any(series(records, k) for records in runs.values() for k in keys)]
    fig, axes = plt.subplots(1 + len(panels), 1, sharex=True, squeeze=False,
                             figsize=(8, 5 + 2.5 * len(panels)))
    try:
        if not _draw_loss(axes[0][0], runs):
            raise TinyLMError(f"no loss values in {', '.join(run_dirs)} yet; train for at "
                              f"least --log-every steps first")
        axes[0][0].set_title(title or "tinylm: " + ", ".join(os.path.normpath(r)
                                                             for r in run_dirs))
        for (name, keys), (ax,) in zip(panels, axes[1:]):
            _draw_panel(ax, runs, keys)
            ax.set_ylabel(name)
        for (ax,) in axes:
            ax.grid(True, alpha=0.3)
            ax.legend()
        axes[-1][0].set_xlabel("step")
        fig.tight_layout()
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
