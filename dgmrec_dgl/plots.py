"""Training curves of run folders: loss terms per epoch and valid Recall@20 at validations (from ``log.jsonl``).

One run: every loss term on its own line (log scale) and the validation curve with the best epoch marked.
Several runs: the total loss and the validation curve of each run, overlaid.
"""

from __future__ import annotations

import json
import os

from .compare import _save_figure
from .errors import DataError

CURVES_FILE = "curves.png"
METRIC = "recall@20"


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    """The epoch records of ``RUN/log.jsonl``."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        raise DataError(path, "file", "does not exist", "pass a run folder written by `dgmrec-dgl train`")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _best_epoch(run_dir) -> int | None:
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh).get("best_epoch")


def _labels(run_dirs: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in run_dirs]


def plot_curves(run_dirs, out: str | os.PathLike) -> str:
    """Draw the curves of one or several run folders into the PNG ``out`` (written atomically); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dirs = [os.fspath(d) for d in run_dirs]
    logs = [read_log(d) for d in run_dirs]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    positive = True
    for run_dir, label, records in zip(run_dirs, _labels(run_dirs), logs):
        epochs = [r["epoch"] for r in records]
        if len(run_dirs) == 1:
            terms = list(dict.fromkeys(name for r in records for name in r.get("loss", {})))
            for name in terms:
                values = [r["loss"].get(name, float("nan")) for r in records]
                positive &= all(v > 0 for v in values if v == v)
                loss_ax.plot(epochs, values, marker=".", label=name)
        else:
            values = [sum(r.get("loss", {}).values()) for r in records]
            positive &= all(v > 0 for v in values)
            loss_ax.plot(epochs, values, marker=".", label=label)
        checked = [(r["epoch"], r["valid"][METRIC]) for r in records if METRIC in r.get("valid", {})]
        if checked:
            line, = metric_ax.plot(*zip(*checked), marker="o", label=label)
            best = _best_epoch(run_dir)
            best_value = dict(checked).get(best)
            if best_value is not None:
                metric_ax.plot([best], [best_value], marker="*", markersize=16, color=line.get_color(),
                               linestyle="none", label=f"best epoch {best}" + ("" if len(run_dirs) == 1
                                                                               else f" ({label})"))
    loss_ax.set_yscale("log" if positive else "symlog", **({} if positive else {"linthresh": 1e-4}))
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss (batch mean)" if len(run_dirs) == 1 else "total loss (batch mean)")
    loss_ax.set_title("training loss" + (" terms" if len(run_dirs) == 1 else ""), fontsize=10)
    metric_ax.set_xlabel("epoch")
    metric_ax.set_ylabel(f"valid {METRIC}")
    metric_ax.set_title(f"valid {METRIC} at validations", fontsize=10)
    for ax in (loss_ax, metric_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not metric_ax.lines:
        metric_ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=metric_ax.transAxes)
    fig.suptitle(_labels(run_dirs)[0] if len(run_dirs) == 1 else f"{len(run_dirs)} runs", fontsize=11)
    fig.tight_layout()
    _save_figure(fig, out)
    plt.close(fig)
    return os.fspath(out)


def write_curves(run_dir: str | os.PathLike) -> str:
    """``RUN/curves.png`` of one run; returns its path."""
    return plot_curves([run_dir], os.path.join(run_dir, CURVES_FILE))
