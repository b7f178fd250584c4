"""Run reporting: human-readable numbers, schedule warnings, the start-of-run layout, the
end-of-run summary (console and OUT/summary.json), plain log lines with ETA, OUT/loss.png."""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys

import pytest

from forge.config import OptimConfig, load_config
from forge.train.metrics import human, human_duration
from forge.train.schedule import lr_at, schedule_warnings
from tests.test_train import tiny

SUFFIX = {"": 1, "k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


@pytest.mark.parametrize("v", [0, 7, 950, 999, 999.9, 1000, 1049, 15440, 99_950, 999_999, 1.2e6, 3.45e9, 12.34, 5e13])
def test_human_reads_back_as_the_value(v):
    """human(v) parsed back (mantissa x suffix) is v to 3 significant figures, with a mantissa < 1000."""
    m = re.fullmatch(r"(-?[\d.]+)([kMBT]?)", human(v))
    assert m, human(v)
    mant = float(m.group(1))
    assert mant < 1000 or m.group(2) == "T"
    assert mant * SUFFIX[m.group(2)] == pytest.approx(v, rel=5e-3, abs=0.5)
    assert human(15440) == "15.4k" and human(1_200_000) == "1.2M"


def test_human_duration():
    assert [human_duration(s) for s in (0, 45, 185, 3725, 183600)] == ["0s", "45s", "3m05s", "1h02m", "2d03h"]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedule_warnings_say_exactly_what_lr_at_does_not_reach(schedule):
    """Over a grid of (warmup, max_steps, decay_frac), checked against the lr_at values themselves:
    a warning about the peak iff a warmup runs (W > 0; without one the decay starts from the peak at
    t = 0) and max_t lr_at(t) < optim.lr; about the decay iff lr_at(max_steps) is
    not min_lr (cosine, wsd); about a shortened wsd decay iff fewer steps after warmup run below the
    peak than round(decay_frac * max_steps); no warning when everything fits."""
    for W, N, frac in itertools.product([0, 1, 5, 19, 20, 21, 100], [1, 10, 20, 40], [0.0, 0.2, 0.9]):
        o = OptimConfig(lr=1.0, min_lr=0.0123, schedule=schedule, warmup_steps=W, decay_frac=frac)
        lrs = [lr_at(t, o, N) for t in range(1, N + 1)]
        text = " ".join(schedule_warnings(o, N))
        peak_missed = W > 0 and max(lrs) < o.lr - 1e-12
        no_decay = schedule != "constant" and abs(lrs[-1] - o.min_lr) > 1e-12
        short = schedule == "wsd" and not peak_missed and not no_decay and \
            sum(1 for t, lr in enumerate(lrs, 1) if t > W and lr < o.lr - 1e-12) < round(frac * N)
        case = (W, N, frac, text)
        assert ("never reaches" in text) == peak_missed, case
        assert ("decay never runs" in text) == no_decay, case
        assert ("wsd decays over" in text) == short, case
        assert bool(text) == (peak_missed or no_decay or short), case


def test_the_issue_case_warns():
    cfg = load_config(None, ["model.preset=tiny-llama", "train.max_steps=20"])
    (w,) = schedule_warnings(cfg.optim, 20)
    assert "optim.warmup_steps=100 > train.max_steps=20" in w


def test_summary_console_lines_and_loss_png(tmp_path, data_cache, capsys):
    """A run stopped at step 4 then resumed to 8: summary.json agrees with metrics.jsonl (best and
    last val over both calls, ppl = exp), tokens = steps x micro batch x seq_len, the checkpoint
    exists; the plain log lines carry tok/s, tokens, elapsed and eta; loss.png is a PNG; the
    summary's `forge plot` command runs."""
    from forge.plot import main as plot_main
    from forge.train.trainer import train
    out = tmp_path / "run"
    cfg = tiny(out, data_cache, "train.eval_interval=2", "train.save_interval=4")
    first = train(cfg, stop_at=4)
    assert first.summary["status"] == "stopped at step 4"
    assert any("train.resume=auto" in c for c in first.summary["next"])
    capsys.readouterr()
    cfg.train.resume = "auto"
    r = train(cfg)
    console = capsys.readouterr()
    s = json.loads((out / "summary.json").read_text())
    assert s == r.summary
    vals = [(x["step"], x["val_loss"]) for x in map(json.loads, open(out / "metrics.jsonl")) if "val_loss" in x]
    assert [v[0] for v in vals] == [2, 4, 6, 8]
    best = min(vals, key=lambda v: v[1])
    assert (s["best_val_step"], s["best_val_loss"]) == best
    assert (s["last_val_step"], s["last_val_loss"]) == vals[-1]
    assert s["best_val_ppl"] == pytest.approx(math.exp(best[1]))
    assert s["status"] == "completed" and s["step"] == 8 and s["start_step"] == 4
    assert s["tokens"] == 8 * 4 * 32 and s["tokens_run"] == 4 * 4 * 32
    assert os.path.isfile(os.path.join(s["checkpoint"], "COMPLETE")) or os.path.isdir(s["checkpoint"])
    assert s["checkpoint"].endswith("8") and s["parameters"] > 0
    assert "run summary:" in console.out and f"best {best[1]:.4f}" in console.out
    (line,) = [x for x in console.err.splitlines() if x.startswith("step 5/8")]
    assert re.search(r"tok/s \| [\d.]+k? tokens \| elapsed \d+s \| eta \d+", line), line
    assert re.search(r"step 6: val_loss [\d.]+ \| val_ppl [\d.]+", console.err)
    assert "parameters:" in console.err and "layout: world 1 = tp 1 x pp 1 x dp 1" in console.err
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_cmd = [c for c in s["next"] if c.startswith("forge plot")][0].split()[2:]
    assert plot_main(plot_cmd) == 0 and (out / "metrics.png").is_file()


def _layout_worker(rank, world, overrides, out_file):
    from forge.parallel.groups import build_groups
    from forge.train import distributed as dist
    from forge.train.summary import layout_lines, rank_param_count
    from forge.train.trainer import build_rank_model
    cfg = load_config(None, overrides)
    dist.init_distributed()
    groups = build_groups(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    counts = dist.gather_object(rank_param_count(build_rank_model(cfg, groups)))
    if rank == 0:
        from forge.models.transformer import build_model
        total = build_model(cfg.model, device="meta").num_params()
        with open(out_file, "w") as f:
            json.dump({"counts": counts, "total": total, "lines": layout_lines(total, counts, groups, cfg)}, f)


@pytest.mark.slow
def test_layout_lines_at_tp2_count_each_ranks_share(tmp_path):
    """At tp=2 each rank holds its tp shards: the per-rank counts equal forge plan's per-rank
    `params` (an independent count from meta-device builds), the total is the whole model's, and
    the layout line names the split."""
    from tests.distributed import run_distributed
    over = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", "model.vocab_size=80",
            "parallel.tp=2", f"train.out_dir={tmp_path}"]
    run_distributed(_layout_worker, 2, over, str(tmp_path / "layout.json"))
    got = json.loads((tmp_path / "layout.json").read_text())
    # forge plan in its own process: it refuses to run where torch.distributed is initialised
    plan_json = subprocess.run([sys.executable, "-m", "forge", "plan", *over, "--world", "2", "--json"],
                               capture_output=True, text=True, check=True).stdout
    expected = {r["rank"]: r["params"] for r in json.loads(plan_json)["ranks"]}
    assert got["counts"] == [expected[0], expected[1]]
    assert max(got["counts"]) < got["total"] < sum(got["counts"])       # shards, plus replicated norms
    assert f"{human(got['total'])} in all" in got["lines"][0]
    assert "world 2 = tp 2 x pp 1 x dp 1" in got["lines"][1]
