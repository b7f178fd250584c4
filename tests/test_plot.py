"""forge plot: curves of several runs from their metrics.jsonl, errors, and OUT/loss.png."""
from __future__ import annotations

import json
import sys

import pytest

from forge.plot import PlotError, main, read_run, runs_figure, write_loss_png

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(folder, n_steps: int, scale: float, cut_last_line: bool = False):
    """A metrics.jsonl as training writes it: loss/lr every step, val_loss every 2 steps."""
    folder.mkdir(parents=True)
    lines = []
    for s in range(1, n_steps + 1):
        lines.append(json.dumps({"step": s, "loss": scale / s, "lr": 1e-3 * s, "grad_norm": 1.0, "tokens_per_s": 100.0}))
        if s % 2 == 0:
            lines.append(json.dumps({"step": s, "val_loss": scale / s + 0.1, "val_ppl": 2.0}))
    text = "\n".join(lines) + "\n"
    if cut_last_line:
        text += '{"step": 99, "loss'                     # a line cut by a crash
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_figure_has_one_axes_per_metric_and_one_line_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    a = make_run(tmp_path / "run_a", 6, 4.0, cut_last_line=True)
    b = make_run(tmp_path / "run_b", 4, 8.0)
    fig = runs_figure([str(a), str(b)], ["loss", "val_loss", "lr"])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["train loss", "validation loss", "learning rate"]
    assert all(ax.get_xlabel() == "step" for ax in axes)
    for ax, metric in zip(axes, ["loss", "val_loss", "lr"]):
        assert [line.get_label() for line in ax.lines] == ["run_a", "run_b"]
        for line, (folder, n, scale) in zip(ax.lines, [(a, 6, 4.0), (b, 4, 8.0)]):
            steps = list(range(1, n + 1)) if metric != "val_loss" else list(range(2, n + 1, 2))
            expect = {"loss": [scale / s for s in steps], "val_loss": [scale / s + 0.1 for s in steps],
                      "lr": [1e-3 * s for s in steps]}[metric]
            assert list(line.get_xdata()) == steps
            assert list(line.get_ydata()) == pytest.approx(expect)
    legend_labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_labels == ["run_a", "run_b"]


def test_cli_writes_png_and_names_unknown_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = make_run(tmp_path / "a", 4, 1.0)
    b = make_run(tmp_path / "x" / "a", 4, 2.0)                         # same folder name: paths label them
    out = tmp_path / "cmp.png"
    assert main([str(a), str(b), "--out", str(out), "--metric", "loss,grad_norm"]) == 0
    assert out.read_bytes()[:8] == PNG
    assert main([str(a)]) == 0 and (a / "metrics.png").read_bytes()[:8] == PNG      # default --out
    assert main([str(a), "--metric", "loss,perplexity"]) == 2
    err = capsys.readouterr().err
    assert "['perplexity']" in err and "val_loss" in err                 # names what is available
    assert main([str(tmp_path / "nowhere")]) == 2


def test_missing_matplotlib_is_a_clear_error_and_no_failed_run(tmp_path, monkeypatch, capsys):
    a = make_run(tmp_path / "a", 4, 1.0)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)                  # import matplotlib -> ImportError
    assert main([str(a)]) == 2
    assert "pip install 'forge[plot]'" in capsys.readouterr().err
    assert write_loss_png(str(a)) is None and not (a / "loss.png").exists()


def test_loss_png_reports_errors_instead_of_raising(tmp_path):
    pytest.importorskip("matplotlib")
    a = make_run(tmp_path / "a", 4, 1.0)
    assert write_loss_png(str(a)) is None and (a / "loss.png").read_bytes()[:8] == PNG
    message = write_loss_png(str(tmp_path / "missing"))
    assert message and "could not write" in message
    with pytest.raises(PlotError):
        read_run(str(tmp_path / "missing"))
