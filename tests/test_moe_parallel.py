"""Mixture of experts across processes (gloo, 2 CPU ranks) against one process.

ep=2: each rank holds 2 of 4 experts and its own half of the global batch; tokens travel by
all-to-all. 5 AdamW steps with dense gradients averaged over the data-parallel group and expert
gradients summed over the expert-data-parallel group and divided by the data-parallel size (what
DeepSpeed does), aux + z losses on, aux-loss-free bias on (loads summed over the data-parallel
group): losses, metrics, biases and final parameters equal one process holding all experts and
seeing the whole batch, within 1e-5 relative (fp32, dropless; parameters per tensor in 2-norm). With a capacity factor each rank
drops on its own tokens: equal to one process running each half alone.

tp=2 (and + sequence parallelism): logits, loss and every gradient of an MoE model with shared
experts and biases equal one process, as for the dense families in test_tensor_parallel.py.
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist

from forge.config import ModelConfig, MoEConfig
from tests.distributed import run_distributed

V = 64


def _cfg(**moe):
    return ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                       moe=MoEConfig(**{**dict(n_experts=4, top_k=2, first_dense=1, n_shared_experts=1,
                                               shared_d_ff=16, shared_gate=True), **moe})).validate()


def _init(model):
    with torch.no_grad():                              # non-trivial norms, a router with a spread
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            if "router" in n:
                p.normal_(0, 0.3)


def _ep_check(rank, world):
    from forge.models import build_model
    from forge.models.io import load_state_dict_strict, unique_state_dict
    from forge.models.layers.moe import (MoE, expert_params, gather_experts, moe_metrics, shard_experts,
                                         update_moe_biases)
    from forge.deepspeed_compat import tag_parameters
    from forge.parallel.groups import build_groups

    g = build_groups(ep=world)
    assert g.dp == 2 and g.ep == 2
    cfg = _cfg(aux_loss_coef=0.05, z_loss_coef=1e-3, bias_update_rate=1e-3)
    torch.manual_seed(0)
    full = build_model(cfg)
    _init(full)
    model = build_model(cfg, g.context())
    load_state_dict_strict(model, shard_experts(unique_state_dict(full), model, g.ep_group), "ep")
    assert model.layers["1"].mlp.experts.w_gate.weight.shape[0] == 2
    experts = expert_params(model)
    tag_parameters(model, g.ep)             # what the engine does before deepspeed.initialize
    assert experts and all(p.group_name == "ep_size_2" and p.allreduce is False for p in experts.values())

    ids = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(1))
    mine = ids[2 * rank:2 * rank + 2]
    opt_ref = torch.optim.AdamW(full.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    full.train()
    model.train()
    for step in range(5):
        ref = full.loss(full(ids[:, :-1]), ids[:, 1:])
        ref.backward()
        ref_met = moe_metrics(full)
        loss = model.loss(model(mine[:, :-1]), mine[:, 1:])
        loss.backward()
        met = moe_metrics(model)
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad, group=g.edp_group if n in experts else g.dp_group)
            p.grad.div_(g.dp)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=g.dp_group)
        torch.testing.assert_close(mean_loss / g.dp, ref.detach(), rtol=1e-5, atol=0, msg=f"loss, step {step}")
        # group-wide loads are the whole batch's; the aux loss (local P) averages to the global one
        assert met["moe/tokens_per_expert_max"] == ref_met["moe/tokens_per_expert_max"]
        aux = torch.tensor(met["moe/aux_loss"], dtype=torch.float64)
        dist.all_reduce(aux, group=g.dp_group)
        assert abs(aux.item() / 2 - ref_met["moe/aux_loss"]) < 1e-5
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
        update_moe_biases(full)
        update_moe_biases(model, g.dp_group)
    # gradients agree to ~1e-7; AdamW amplifies that roundoff where a coordinate's m / sqrt(v) is
    # small, so parameters are compared per tensor: |p_ep - p_ref| <= 1e-5 |p_ref| (2-norms)
    state = gather_experts({n: p.detach() for n, p in model.named_parameters()}, model, g.ep_group)
    for n, p in full.named_parameters():
        rel = ((state[n] - p.detach()).norm() / p.detach().norm()).item()
        assert rel <= 1e-5, f"parameter {n}: relative difference {rel:.2e}"
    for (n, b), (_, rb) in zip(model.named_buffers(), full.named_buffers()):
        assert torch.equal(b, rb), n
    assert full.layers["1"].mlp.router.expert_bias.abs().sum() > 0      # the bias did move

    # capacity: each rank drops among its own tokens == one process on each half alone
    cfg = _cfg(capacity_factor=0.75)
    torch.manual_seed(3)
    layer_full = MoE(cfg.resolved())
    with torch.no_grad():
        for p in layer_full.parameters():
            p.normal_(0, 0.3)
    layer = MoE(cfg.resolved(), g.context())
    sd = shard_experts(layer_full.state_dict(), layer_full, g.ep_group)
    layer.load_state_dict({k: v for k, v in sd.items()})
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(4))
    layer_full.train()
    layer.train()
    ref = layer_full(x[2 * rank:2 * rank + 2])
    ref_drop = layer_full.metrics()["dropped_frac"]
    out = layer(x[2 * rank:2 * rank + 2])
    assert layer.metrics()["dropped_frac"] == ref_drop > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _tp_check(rank, world):
    from forge.models import build_model
    from forge.models.io import load_state_dict_strict, unique_state_dict
    from forge.parallel.groups import build_groups
    from forge.parallel.mappings import gather_from
    from forge.parallel.sharding import gather_tensors, shard_state_dict

    g = build_groups(tp=world)
    base = _cfg(aux_loss_coef=0.05, z_loss_coef=1e-3, router="sigmoid")
    for name, cfg, sp in [("tp2", base, False), ("tp2-sp", base, True),
                          ("tp2-mlp-bias", dataclasses.replace(base, mlp="mlp", mlp_bias=True,
                                                               activation="gelu"), False),
                          ("tp2-sp-mlp-bias", dataclasses.replace(base, mlp="mlp", mlp_bias=True,
                                                                  activation="gelu"), True),
                          # gpt-oss's pieces: router bias, clamped quick_gelu GLU with biases, sinks
                          ("tp2-sp-gpt-oss", dataclasses.replace(
                              base, mlp_bias=True, activation="quick_gelu", glu_limit=0.05, glu_up_offset=1.0,
                              attention_sinks=True, moe=dataclasses.replace(base.moe, router_bias=True)), True)]:
        torch.manual_seed(0)
        full = build_model(cfg)
        _init(full)
        model = build_model(cfg, g.context(sp))
        load_state_dict_strict(model, shard_state_dict(unique_state_dict(full), model, g.tp_group), name)
        full.train()
        model.train()
        ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
        ref_logits = full(ids[:, :-1])
        ref_loss = full.loss(ref_logits, ids[:, 1:])
        ref_loss.backward()
        logits = model(ids[:, :-1])
        loss = model.loss(logits, ids[:, 1:])
        loss.backward()
        torch.testing.assert_close(gather_from(logits, -1, g.tp_group), ref_logits, atol=1e-5, rtol=1e-5,
                                   msg=f"{name}: logits")
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, msg=f"{name}: loss")
        grads = gather_tensors({n: p.grad for n, p in model.named_parameters()}, model, g.tp_group, V)
        for n, p in full.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=f"{name}: grad of {n}")


def _check(rank, world):
    torch.manual_seed(0)
    _ep_check(rank, world)
    _tp_check(rank, world)


@pytest.mark.slow
def test_moe_expert_and_tensor_parallel_match_single_process():
    run_distributed(_check, 2)
