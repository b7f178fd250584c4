"""forge.deepspeed_compat and the state Forge no longer keeps in hidden globals: the DeepSpeed
version check, the translation of Forge's parameter attributes into DeepSpeed's, the MoE aux-loss
scale held per model, the linear backend restored after a run, DS_ACCELERATOR left alone by
`import forge`, and JobConfig.validate() leaving the config as it is."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from forge import deepspeed_compat as compat
from forge import kernels
from forge.config import JobConfig, ModelConfig, MoEConfig, load_config
from forge.models import build_model
from forge.models.layers.moe import expert_params, set_aux_loss_scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _moe_model():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32,
                      moe=MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)).validate()
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("version, ok", [("0.19.0", True), ("0.19.8", True), ("0.19.8+abc", True),
                                         ("0.18.9", False), ("0.20.0", False), ("1.0.0", False)])
def test_version_check_accepts_the_tested_range_only(version, ok):
    if ok:
        assert compat.check_version(version) == version
    else:
        with pytest.raises(compat.DeepSpeedVersionError, match=r"deepspeed>=0\.19,<0\.20"):
            compat.check_version(version)


def test_the_installed_deepspeed_is_in_the_tested_range():
    import deepspeed
    assert compat.check_version() == deepspeed.__version__


@pytest.mark.parametrize("ep", [1, 2])
def test_deepspeed_attributes_come_from_forges(ep):
    """Model code marks experts (`expert`) and tp shards (`partition_dim`); the engine's
    translation gives DeepSpeed its names: experts, and only they, leave the full data-parallel
    reduction at ep > 1; at ep = 1 (and tp = 1) nothing is tagged."""
    model = _moe_model()
    assert not any(hasattr(p, n) for p in model.parameters()
                   for n in ("allreduce", "group_name", "tensor_model_parallel"))
    compat.tag_parameters(model, ep)
    experts = {id(p) for p in expert_params(model).values()}
    assert experts
    for p in model.parameters():
        if ep > 1 and id(p) in experts:
            assert p.allreduce is False and p.group_name == f"ep_size_{ep}"
        else:
            assert not hasattr(p, "allreduce") and not hasattr(p, "group_name")
        assert not hasattr(p, "tensor_model_parallel")      # tp = 1: no shard
    p = next(model.parameters())
    p.partition_dim = 0
    compat.tag_parameters(model, ep)
    assert p.tensor_model_parallel is True


def test_aux_loss_scale_belongs_to_its_model():
    """Scaling one model's auxiliary losses leaves another model's router gradient as it was."""
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    grads = []
    for scale_other in (1.0, 7.0):
        model, other = _moe_model(), _moe_model()
        set_aux_loss_scale(other, scale_other)
        model.train()
        model.loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "router" in n]))
    assert torch.equal(grads[0], grads[1])


def test_linear_backend_context_restores_on_error():
    previous = kernels.get_linear_backend()
    with pytest.raises(RuntimeError, match="inside"):
        with kernels.linear_backend("auto") as name:
            assert kernels.get_linear_backend() == name
            raise RuntimeError("inside")
    assert kernels.get_linear_backend() == previous


@pytest.mark.skipif(not kernels.onednn_available(), reason="needs a PyTorch build with mkldnn")
def test_train_restores_the_linear_backend(tmp_path, monkeypatch):
    from forge.train import trainer
    seen = []
    monkeypatch.setattr(trainer, "_train_locked", lambda *a, **k: seen.append(kernels.get_linear_backend()))
    cfg = load_config(None, ["train.linear_backend=onednn", f"train.out_dir={tmp_path}", "log.progress=false"])
    with kernels.linear_backend("aten"):
        trainer.train(cfg)
        assert seen == ["onednn"] and kernels.get_linear_backend() == "aten"


def test_import_forge_leaves_ds_accelerator_alone():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = ("import os, forge, forge.config, forge.models; before = os.environ.get('DS_ACCELERATOR'); "
            "from forge.deepspeed_compat import select_accelerator; select_accelerator(); "
            "import torch; print(before, os.environ.get('DS_ACCELERATOR'), torch.cuda.is_available())")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": ROOT}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == "None" and out[1] == ("None" if out[2] == "True" else "cpu")


def test_validate_leaves_the_config_as_it_is():
    cfg = JobConfig()
    assert cfg.validate() is cfg and cfg.data.seq_len is None
    full = cfg.resolved()
    assert full.data.seq_len == cfg.model.max_seq_len and cfg.data.seq_len is None
    assert load_config(None, []).data.seq_len == cfg.model.max_seq_len
