"""forge train on a mixture-of-experts model: the MoE metrics reach metrics.jsonl, the
aux-loss-free biases move, and the run resumes."""
import json

import pytest

from forge.config import load_config
from forge.train.trainer import train


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def test_moe_training_logs_router_metrics(tmp_path, cache_dir):
    cfg = load_config(None, ["model.preset=tiny-mixtral", "model.max_seq_len=32", "data.seq_len=32",
                             f"data.cache_dir={cache_dir}", "model.moe.aux_loss_coef=0.01",
                             "model.moe.z_loss_coef=0.001", "model.moe.capacity_factor=1.0",
                             "model.moe.bias_update_rate=0.01", "train.max_steps=6", "train.micro_batch_size=4",
                             "train.grad_accum=2", "train.log_interval=2", "train.eval_interval=0",
                             "train.save_interval=0", f"train.out_dir={tmp_path / 'run'}", "log.progress=false",
                             "optim.lr=3e-3", "optim.warmup_steps=1"])
    result = train(cfg)
    assert result.losses[-1] < result.losses[0]
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in l]
    for line in lines:
        assert line["moe/aux_loss"] >= 1.0 - 1e-6            # E * sum f P >= 1, with equality when balanced
        assert 0.0 <= line["moe/dropped_frac"] <= 1.0
        assert line["moe/load_max_over_mean"] >= 1.0
    from forge.models.io import read_weights
    sd = read_weights(str(tmp_path / "run" / "checkpoints" / "step_00000006" / "model"))
    biases = [v for k, v in sd.items() if k.endswith("router.expert_bias")]
    assert biases and any(b.abs().sum() > 0 for b in biases)  # balancing moved them


@pytest.mark.parametrize("overrides, fragment", [
    (["parallel.ep=2", "parallel.zero_stage=3"], "parallel.zero_stage 0, 1 or 2"),   # JobConfig.validate
    (["parallel.ep=2", "parallel.pp=2", "parallel.zero_stage=2"], "ZeRO stages 0 and 1"),
])
def test_unsupported_moe_layouts_are_refused_before_work(overrides, fragment):
    from forge.config import ConfigError
    from forge.train.engine import check_supported
    with pytest.raises(ConfigError, match=fragment):
        check_supported(load_config(None, ["model.preset=tiny-mixtral"] + overrides), world=4)
