"""bf16 and fp16 (dynamic loss scaling) train like fp32, at ZeRO 0 and ZeRO 1.

DeepSpeed's CPU accelerator declines fp16, but autocast, the GradScaler and DeepSpeed's ZeRO fp16
optimizer run on CPU tensors; the tests declare fp16 supported so that the loss-scaling paths
(autocast + GradScaler at ZeRO 0, DeepSpeed's ZeRO optimizer at stage 1) run here. The losses of
the first steps must stay within low-precision roundoff (1e-3 relative) of an fp32 run, the
reported grad norms within 2%, and the weights within a small fraction of the total update
lr * steps. DeepSpeed 0.19's own ZeRO-0 fp16 optimizer failed this by far (its engine never
scaled the loss that its step() unscaled: updates 65536x too small; its zero-gradient priming
step put the bias corrections one step off: step-2 loss 7.5e-3 relative behind fp32), and so
did MoE auxiliary losses left out of the loss scale."""
import json

import pytest
import torch

STEPS = 4


def _run(tmp_path, precision, zero_stage, preset="tiny-llama"):
    from forge.config import load_config
    from forge.train.trainer import train
    cfg = load_config(None, [
        f"model.preset={preset}", "model.max_seq_len=32", "model.dropout=0.0", "data.seq_len=32",
        f"data.cache_dir={tmp_path / 'data'}", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
        "train.grad_accum=2", "train.eval_interval=0", "train.save_interval=0", "train.log_interval=1",
        f"train.precision={precision}", "optim.lr=2e-3", "optim.warmup_steps=1", "optim.schedule=constant",
        "optim.grad_clip=1.0", f"parallel.zero_stage={zero_stage}", f"train.out_dir={tmp_path / precision}",
        "log.progress=false"])
    result = train(cfg)
    from forge.models.io import read_weights
    import glob
    path = sorted(glob.glob(str(tmp_path / precision / "checkpoints" / "step_*" / "model")))[-1]
    return result.losses, result.grad_norms, read_weights(path)


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    from deepspeed.accelerator import get_accelerator
    acc = type(get_accelerator())
    monkeypatch.setattr(acc, "is_fp16_supported", lambda self: True)
    monkeypatch.setattr(acc, "supported_dtypes", lambda self: [torch.float, torch.half, torch.bfloat16])


@pytest.mark.parametrize("precision, zero_stage, preset", [
    ("fp16", 0, "tiny-llama"), ("fp16", 1, "tiny-llama"), ("bf16", 0, "tiny-llama"),
    ("fp16", 0, "tiny-mixtral"), ("fp16", 1, "tiny-mixtral")])    # aux losses scaled with the loss
def test_low_precision_matches_fp32(tmp_path, fp16_on_cpu, one_thread, precision, zero_stage, preset):
    ref_losses, ref_norms, ref_weights = _run(tmp_path, "fp32", zero_stage, preset)
    losses, norms, weights = _run(tmp_path, precision, zero_stage, preset)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-3 * b, (losses, ref_losses)
    for a, b in zip(norms, ref_norms):        # reported unscaled, like fp32's
        assert abs(a - b) <= 2e-2 * b, (norms, ref_norms)
    moved = torch.cat([(weights[k].float() - ref_weights[k]).flatten() for k in ref_weights])
    # the weights are stored in fp16/bf16 (roundoff 5e-4 / 4e-3 relative); updates total lr * steps
    assert moved.abs().mean() < 0.05 * 2e-3 * STEPS, moved.abs().mean()


def test_fp16_refused_where_deepspeed_has_no_fp16():
    from forge.config import ConfigError, load_config
    from forge.train.engine import check_supported
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().is_fp16_supported():
        pytest.skip("this accelerator supports fp16")
    cfg = load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a GPU"):
        check_supported(cfg)


def test_fp16_pipeline_at_zero0_refused():
    from forge.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="parallel.zero_stage=1"):     # refused by load_config's validate
        load_config(None, ["train.precision=fp16", "parallel.pp=2", "parallel.zero_stage=0"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("zero_stage, pp, autocast", [(0, 1, True), (1, 1, False), (1, 2, False)])
def test_low_precision_runs_as_autocast_at_zero0_without_a_pipeline(precision, zero_stage, pp, autocast):
    """bf16/fp16 at ZeRO 0 (no pipeline): fp32 weights under DeepSpeed's torch_autocast, no
    DeepSpeed low-precision optimizer; elsewhere DeepSpeed's bf16/fp16 optimizers."""
    from forge.config import load_config
    from forge.train.engine import build_ds_config, manual_clipping
    cfg = load_config(None, [f"train.precision={precision}", f"parallel.zero_stage={zero_stage}", f"parallel.pp={pp}"])
    ds = build_ds_config(cfg, dp_size=1)
    assert ds["torch_autocast"]["enabled"] is autocast
    if autocast:
        assert ds["torch_autocast"]["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert ds[precision]["enabled"] is not autocast
    assert manual_clipping(cfg) is autocast


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_engine_steps_fp32_weights_with_plain_adamw(tmp_path, fp16_on_cpu, one_thread, monkeypatch,
                                                            precision):
    from forge.train import trainer
    engines = []
    create = trainer.create_engine
    monkeypatch.setattr(trainer, "create_engine", lambda *a, **k: engines.append(create(*a, **k)) or engines[-1])
    _run(tmp_path, precision, 0)
    assert isinstance(engines[0].optimizer, torch.optim.AdamW)
    assert all(p.dtype == torch.float32 for p in engines[0].module.parameters())
    assert (engines[0].torch_autocast_z0_gradscaler is not None) is (precision == "fp16")


@pytest.mark.slow
@pytest.mark.parametrize("world, dp, parallel", [(2, 1, dict(tp=2)), (2, 2, dict(zero_stage=0))],
                         ids=["tp2", "dp2"])
def test_bf16_autocast_layouts_match_one_process(tmp_path, world, dp, parallel):
    """bf16 autocast at ZeRO 0 under tensor and data parallelism (gloo) against one bf16 process:
    the first losses within bf16 roundoff of the differently split matmuls."""
    from tests.distributed import run_distributed
    from tests.test_parallel_layouts import _train, job

    def losses(out, world, dp, **par):
        over = [o.replace("train.precision=fp32", "train.precision=bf16")
                for o in job(str(out), str(tmp_path / "data"), "tiny-llama", dp, **par)]
        if world > 1:
            run_distributed(_train, world, over)
        else:
            _train(0, 1, over)
        return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    ref = losses(tmp_path / "ref", 1, 1)
    mine = losses(tmp_path / "layout", world, dp, **parallel)
    assert len(mine) == len(ref)
    for a, b in zip(mine, ref):
        assert abs(a - b) <= 2e-3 * b, (mine, ref)


def test_checkpoint_of_deepspeeds_zero0_bf16_optimizer_is_refused_with_a_clear_error():
    """A checkpoint written when bf16 at ZeRO 0 used DeepSpeed's bf16 optimizer (no
    optimizer_layout in its state) cannot resume under autocast: a CheckpointError that says so,
    not a KeyError from deep inside DeepSpeed."""
    from forge.config import load_config
    from forge.train.checkpoint import CheckpointError, check_compatible
    cfg = load_config(None, ["train.precision=bf16"])
    old = {"config": cfg.to_dict(), "dp_size": 1}
    with pytest.raises(CheckpointError, match="deepspeed-bf16.*fp32-weights"):
        check_compatible(old, cfg, 1, "ckpt")
    assert check_compatible({**old, "optimizer_layout": "fp32-weights"}, cfg, 1, "ckpt") == []
    z1 = load_config(None, ["train.precision=bf16", "parallel.zero_stage=1"])
    assert check_compatible({"config": z1.to_dict(), "dp_size": 1}, z1, 1, "ckpt") == []
