"""Mixture-of-experts measurements (a tool, not a test).

1. throughput: tokens/s (forward + backward, and forward only) of one MoE layer against a dense
   MLP of the same kind with the same active parameters per token (hidden = top_k * expert d_ff;
   the router's E*D extra parameters are not counted), on this machine's CPU or GPU.
2. all-to-all traffic: bytes each rank sends to other ranks per training step (forward + backward)
   for an MoE layer with ep ranks (gloo, CPU processes), against the count computed from the
   routing (exact) and the expectation for a uniform routing:
       per rank, per layer: 2 (dispatch + combine) x 2 (forward + backward) x rows_remote x D x bytes
       rows_remote = kept assignments whose expert lives on another rank  (~ N k (ep-1)/ep uniform)
   (the per-layer all-gather of 2E int64 counts is reported separately).

    python tools/bench_moe.py [--d-model 256 --experts 8 --top-k 2 --expert-ff 512 --tokens 4096]
                              [--ep 2] [--skip-throughput] [--skip-comm]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from forge.config import ModelConfig, MoEConfig  # noqa: E402


def layer_cfg(a, **moe) -> ModelConfig:
    """The MoE layer's config, resolved (the layer is built outside decoder_stages)."""
    cfg = ModelConfig(d_model=a.d_model, n_heads=4, d_ff=a.top_k * a.expert_ff, mlp=a.mlp,
                      moe=MoEConfig(n_experts=a.experts, top_k=a.top_k, d_ff=a.expert_ff, **moe))
    return cfg.validate().resolved()


def _init(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def _time(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def throughput(a):
    from forge.models.layers.mlp import MLP_REGISTRY
    from forge.models.layers.moe import MoE
    cfg = layer_cfg(a)
    dense = _init(MLP_REGISTRY[a.mlp](cfg))
    moe = _init(MoE(cfg))
    moe.train()
    x = torch.randn(1, a.tokens, a.d_model, requires_grad=True)
    active = lambda m: sum(p.numel() for n, p in m.named_parameters()  # noqa: E731
                           if not n.startswith("router")) * (a.top_k / a.experts if m is moe else 1)
    print(f"throughput  D={a.d_model}  E={a.experts}  top_k={a.top_k}  expert d_ff={a.expert_ff}  "
          f"tokens={a.tokens}  threads={torch.get_num_threads()}")
    print(f"  active parameters per token: dense {active(dense):,.0f}, MoE {active(moe):,.0f} "
          f"(+ router {a.experts * a.d_model:,})")
    # dense and MoE timed in alternation, `rounds` times; the median of each (robust to a shared machine)
    times = {name: ([], []) for name in ("dense MLP", "MoE")}
    for _ in range(a.rounds):
        for name, m in (("dense MLP", dense), ("MoE", moe)):
            def fwd_bwd():
                m(x).sum().backward()

            def fwd():
                with torch.no_grad():
                    m(x)
            times[name][0].append(_time(fwd_bwd, a.warmup, a.iters))
            times[name][1].append(_time(fwd, a.warmup, a.iters))
    rate = {name: [a.tokens / statistics.median(t) for t in ts] for name, ts in times.items()}
    for name, (tb, tf) in rate.items():
        print(f"  {name:10s} fwd+bwd {tb:12,.0f} tok/s    fwd {tf:12,.0f} tok/s   (median of {a.rounds})")
    d, m = rate["dense MLP"], rate["MoE"]
    print(f"  MoE / dense: fwd+bwd {m[0] / d[0]:.2f}x, fwd {m[1] / d[1]:.2f}x")


def _comm_worker(rank, world, a):
    import torch.distributed as dist

    from forge.models.layers import moe_dispatch
    from forge.models.layers.moe import MoE
    from forge.parallel.groups import build_groups
    g = build_groups(ep=world)
    torch.manual_seed(0)
    cfg = layer_cfg(a, capacity_factor=a.capacity_factor)
    layer = _init(MoE(cfg, g.context()))
    layer.train()
    x = torch.randn(1, a.tokens, a.d_model, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    with moe_dispatch.count_all_to_all() as comm:
        layer(x).sum().backward()
    measured, calls = comm["all_to_all_bytes"], comm["all_to_all_calls"]
    # exact count from the routing: kept assignments of this rank for experts on other ranks (sent),
    # and kept assignments of other ranks for my experts (received, then sent back)
    with torch.no_grad():
        _, _, idx, _ = layer.router(x.reshape(-1, a.d_model))
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=a.experts)
    if a.capacity_factor is not None:
        from forge.models.layers.moe_dispatch import capacity_for
        counts = counts.clamp(max=capacity_for(a.capacity_factor, a.tokens, a.top_k, a.experts))
    local = a.experts // world
    per_rank = counts.view(world, local).sum(1)
    everyone = [torch.empty_like(per_rank) for _ in range(world)]
    dist.all_gather(everyone, per_rank)
    sent = int(per_rank.sum() - per_rank[rank])
    received = int(sum(e[rank] for j, e in enumerate(everyone) if j != rank))
    elt = x.element_size()
    exact = 2 * (sent + received) * a.d_model * elt
    uniform = 4 * a.tokens * a.top_k * (world - 1) / world * a.d_model * elt
    gather = 2 * a.experts * 8 * (world - 1)
    if rank == 0:
        print(f"all-to-all  ep={world}  tokens/rank={a.tokens}  D={a.d_model}  E={a.experts}  top_k={a.top_k}  "
              f"fp32  capacity_factor={a.capacity_factor}")
    dist.barrier()
    print(f"  rank {rank}: {calls} all-to-alls, measured {measured:,} B/step; from the routing "
          f"{exact:,} B ({'equal' if measured == exact else 'DIFFERENT'}); uniform routing "
          f"{uniform:,.0f} B ({measured / uniform:.3f}x); + counts all-gather {gather} B", flush=True)


def comm(a):
    from tests.distributed import run_distributed
    run_distributed(_comm_worker, a.ep, a)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ff", type=int, default=512)
    p.add_argument("--mlp", default="glu", choices=["glu", "mlp"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-comm", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.skip_throughput:
        throughput(a)
    if not a.skip_comm:
        comm(a)


if __name__ == "__main__":
    main()
