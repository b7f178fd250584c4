"""`forge plot RUN [RUN ...]`: metrics.jsonl curves of one or several runs, side by side.

    forge plot runs/a runs/b --out compare.png --metric loss,val_loss,lr

One subplot per metric, one line per run (labelled with the run's folder name), x = training step.
RUN is a training out_dir (its metrics.jsonl is read) or a metrics.jsonl file. --metric takes any
numeric key of the lines (loss, val_loss, val_ppl, lr, grad_norm, tokens_per_s, tokens, elapsed_s,
MoE metrics); the default is those of loss, val_loss, lr, grad_norm, tokens_per_s that the runs hold.
The default --out is RUN/metrics.png for one run, ./metrics.png for several.

Training calls `write_loss_png(out_dir)` at each eval: OUT/loss.png, training and validation loss
of that run on one axes. matplotlib is imported only here, on use (the `forge[plot]` extra), and
drawn through its Agg canvas (no display, no pyplot global state).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

from forge.fsutil import atomic_file

DEFAULT_METRICS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s")
LABELS = {"loss": "train loss", "val_loss": "validation loss", "val_ppl": "validation perplexity",
          "lr": "learning rate", "grad_norm": "gradient norm", "tokens_per_s": "tokens / s",
          "tokens": "tokens seen", "elapsed_s": "elapsed (s)"}
INSTALL_HINT = "pip install 'forge[plot]'  (or: pip install matplotlib)"


class PlotError(ValueError):
    """A plot that cannot be drawn (no matplotlib, no metrics, unknown metric)."""


def _matplotlib():
    """(Figure, FigureCanvasAgg), or PlotError naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg


def read_run(path: str) -> tuple[str, list[dict]]:
    """(run name, metrics lines) of an out_dir or a metrics.jsonl file; lines cut by a crash are skipped."""
    from forge.train.metrics import METRICS_FILE
    file = os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise PlotError(f"{path!r}: no {METRICS_FILE} there (pass a training out_dir or a metrics.jsonl file)")
    records = []
    with open(file) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    folder = os.path.dirname(os.path.abspath(file))
    return os.path.basename(folder) or folder, records


def series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the lines holding a finite number under `metric`, in step order."""
    pts = sorted((r["step"], float(r[metric])) for r in records
                 if "step" in r and isinstance(r.get(metric), (int, float)) and not isinstance(r[metric], bool)
                 and math.isfinite(r[metric]))
    return [s for s, _ in pts], [v for _, v in pts]


def _unique_names(paths: list[str], names: list[str]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    return [n if names.count(n) == 1 else p for p, n in zip(paths, names)]


def plot_runs(paths: list[str], out: str, metrics: Optional[list[str]] = None) -> str:
    """Draw the runs' metrics into `out` (PNG); returns `out`. See module doc."""
    _save(runs_figure(paths, metrics), out)
    return out


def runs_figure(paths: list[str], metrics: Optional[list[str]] = None):
    """The matplotlib Figure of `plot_runs`: axes i = metrics[i], line j = run j (label: its name)."""
    runs = [read_run(p) for p in paths]
    names = _unique_names(paths, [n for n, _ in runs])
    present = {k for _, recs in runs for r in recs for k, v in r.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if m in present]
        if not metrics:
            raise PlotError(f"no metrics to plot in {paths} (empty metrics.jsonl?)")
    missing = [m for m in metrics if m not in present]
    if missing:
        raise PlotError(f"metric(s) {missing} are in none of the runs; available: {sorted(present)}")
    Figure, Canvas = _matplotlib()
    cols = 2 if len(metrics) == 4 else min(3, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows + 0.5), dpi=100, layout="constrained")
    Canvas(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        for name, (_, recs) in zip(names, runs):
            x, y = series(recs, metric)
            if x:
                ax.plot(x, y, label=name, marker="o" if len(x) <= 30 else None, markersize=3, linewidth=1.3)
        ax.set_title(LABELS.get(metric, metric))
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:len(metrics)]:               # a run may lack the first metric
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 4), title="run")
    return fig


def _save(fig, out: str) -> None:
    """Write the figure next to `out` and rename it into place (a viewer never sees half a PNG)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with atomic_file(out, mode=None, suffix=".png") as tmp:
        fig.savefig(tmp)


def write_loss_png(out_dir: str, name: str = "loss.png") -> Optional[str]:
    """OUT/loss.png: training and validation loss of the run in `out_dir` on one axes. Returns None
    when written or when matplotlib is not installed (nothing to do), else the error as a message:
    training never fails for its plot."""
    try:
        try:
            Figure, Canvas = _matplotlib()
        except PlotError:
            return None
        run, records = read_run(out_dir)
        fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
        Canvas(fig)
        ax = fig.subplots()
        for metric, style in (("loss", dict(linewidth=1.0, alpha=0.8)), ("val_loss", dict(marker="o", linewidth=1.6))):
            x, y = series(records, metric)
            if x:
                ax.plot(x, y, label=LABELS[metric], markersize=4, **style)
        ax.set_title(f"{run}: loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, os.path.join(out_dir, name))
        return None
    except Exception as e:      # noqa: BLE001 - a plot is a convenience, never a failed run
        return f"could not write {os.path.join(out_dir, name)}: {type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="forge plot", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog=f"needs matplotlib: {INSTALL_HINT}")
    p.add_argument("runs", nargs="+", metavar="RUN", help="training out_dir or metrics.jsonl file")
    p.add_argument("--out", help="PNG to write (default: RUN/metrics.png for one run, ./metrics.png for several)")
    p.add_argument("--metric", help=f"comma-separated metrics, one subplot each (default: those of "
                                    f"{','.join(DEFAULT_METRICS)} present)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or (os.path.join(args.runs[0], "metrics.png") if len(args.runs) == 1 and os.path.isdir(args.runs[0])
                       else "metrics.png")
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()] if args.metric else None
    try:
        plot_runs(args.runs, out, metrics)
    except PlotError as e:
        print(f"forge plot: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
