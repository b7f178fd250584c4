"""`forge eval`: the validation loss of a checkpoint equals the trainer's val_loss logged for it,
`--data` shards against a loss recomputed sample by sample, and clear errors for bad input."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from forge.config import load_config
from forge.evaluate import main
from forge.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run (4 steps) that evaluates and saves at steps 2 and 4."""
    root = tmp_path_factory.mktemp("eval_run")
    cache = str(root / "cache")
    cfg = load_config(None, [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32",
        "data.seq_len=32", f"data.cache_dir={cache}", "train.micro_batch_size=4", "train.max_steps=4",
        "optim.lr=3e-3", "optim.warmup_steps=1", "train.log_interval=1", "train.eval_interval=2",
        "train.eval_steps=3", "train.save_interval=2", f"train.out_dir={root / 'run'}", "log.progress=false"])
    result = train(cfg)
    return result, cache


def _json(argv, capsys):
    code = main(argv + ["--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_eval_equals_the_trainers_val_loss(run, capsys):
    result, _ = run
    logged = {r["step"]: r["val_loss"] for r in result.metrics if "val_loss" in r}
    with open(os.path.join(result.out_dir, "metrics.jsonl")) as f:
        in_file = {r["step"]: r["val_loss"] for r in map(json.loads, f) if "val_loss" in r}
    assert set(logged) == {2, 4} and in_file == logged
    for step in (2, 4):
        res = _json([os.path.join(result.out_dir, "checkpoints", f"step_{step:08d}")], capsys)
        assert res["step"] == step and res["batches"] == 3 and res["split"] == "valid"
        assert abs(res["loss"] - logged[step]) < 1e-6, (step, res["loss"], logged[step])
        assert res["ppl"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)
    newest = _json([result.out_dir], capsys)                   # the run dir: its newest checkpoint
    assert newest["step"] == 4 and abs(newest["loss"] - logged[4]) < 1e-6
    # other batch settings are other numbers (the flags are applied)
    other = _json([result.out_dir, "--max-batches", "1", "--batch-size", "2"], capsys)
    assert other["batches"] == 1 and other["sequences"] == 2 and other["loss"] != newest["loss"]
    two = _json([result.out_dir, "--dp", "2", "--max-batches", "1", "--batch-size", "2"], capsys)
    assert two["sequences"] == 4                               # ranks 0 and 1: samples 0-1 and 2-3


def test_eval_data_flag_against_a_per_sample_recomputation(run, capsys, tmp_path):
    """A model folder without a run config, `--data` shards: the whole valid split, which at
    batch size 1 is every sample once in dataset order (epoch 0 of the loader)."""
    from forge.data import build_data
    from forge.models.io import load_model_folder, model_config_dict, save_model_folder
    result, cache = run
    step_model = os.path.join(result.out_dir, "checkpoints", "step_00000004", "model")
    model, mcfg = load_model_folder(step_model)
    save_model_folder(model, model_config_dict(mcfg), str(tmp_path / "bare"),
                      tokenizer_dir=os.path.join(result.out_dir, "tokenizer"))
    shards = os.path.join(cache, "shakespeare_char", "val")
    res = _json([str(tmp_path / "bare"), "--data", shards, "--batch-size", "1"], capsys)
    assert res["run_config"] is None
    cfg = load_config(None, ["data.dataset=indexed", f"data.paths=[{shards}]", "data.seq_len=32"])
    valid = build_data(cfg.data, seed=cfg.train.seed, work_dir=str(tmp_path)).valid
    assert res["batches"] == len(valid) > 0
    with torch.no_grad():
        nll = [F.cross_entropy(model(torch.from_numpy(valid[i][None, :-1]))[0],
                               torch.from_numpy(valid[i][1:])).item() for i in range(len(valid))]
    assert abs(res["loss"] - sum(nll) / len(nll)) < 1e-6


def test_eval_clear_errors(run, capsys, tmp_path):
    from forge.models.io import load_model_folder, model_config_dict, save_model_folder
    result, _ = run
    step_model = os.path.join(result.out_dir, "checkpoints", "step_00000004", "model")
    model, mcfg = load_model_folder(step_model)
    save_model_folder(model, model_config_dict(mcfg), str(tmp_path / "bare"),
                      tokenizer_dir=os.path.join(result.out_dir, "tokenizer"))

    def err(argv):
        code = main(argv)
        return code, capsys.readouterr().err

    code, e = err([str(tmp_path / "bare")])
    assert code == 2 and "--data" in e and "Traceback" not in e
    code, e = err([result.out_dir, "--split", "test"])
    assert code == 2 and "--split test" in e
    code, e = err([str(tmp_path / "missing")])
    assert code == 2 and "does not exist" in e
    code, e = err([result.out_dir, "--data", str(tmp_path / "nodata")])
    assert code == 2 and "nodata" in e
    for flag, value in (("--max-batches", "0"), ("--batch-size", "-1"), ("--split", "train")):
        with pytest.raises(SystemExit) as ex:
            main([result.out_dir, flag, value])
        assert ex.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


LAYOUTS = [(2, dict(zero_stage=1)), (2, dict(tp=2)), (2, dict(pp=2))]     # (world, parallel): dp 2, tp 2, pp 2


@pytest.mark.slow
@pytest.mark.parametrize("world,parallel", LAYOUTS, ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items())
                         if isinstance(v, dict) else str(v))
def test_eval_equals_val_loss_of_a_parallel_run(tmp_path, capsys, world, parallel):
    """A checkpoint written under dp 2 (ZeRO 1), tp 2 or pp 2 (grad_accum 2, so the pipeline's
    eval rounds 3 batches down to 2), evaluated in one process: the val_loss its run logged."""
    from tests.distributed import run_distributed
    from tests.test_parallel_layouts import _train
    out = tmp_path / "run"
    over = ["model.preset=tiny-llama", "model.max_seq_len=32", "data.seq_len=32", f"data.cache_dir={tmp_path / 'c'}",
            "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=2", "train.eval_interval=2",
            "train.eval_steps=3", "train.save_interval=2", "train.log_interval=1", "optim.lr=2e-3",
            "optim.warmup_steps=1", f"train.out_dir={out}", "log.progress=false"]
    over += [f"parallel.{k}={v}" for k, v in parallel.items()]
    run_distributed(_train, world, over)
    with open(out / "metrics.jsonl") as f:
        logged = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
    res = _json([str(out)], capsys)
    assert res["dp"] == (2 if "zero_stage" in parallel else 1)
    assert res["batches"] == (2 if "pp" in parallel else 3)
    assert len(logged) == 1 and abs(res["loss"] - logged[0]) < 1e-6, (res["loss"], logged)
