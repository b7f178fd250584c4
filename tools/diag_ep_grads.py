"""Per-parameter gradients of step 1 under expert parallelism, ZeRO 0 against ZeRO 1/2 and against
one process (a diagnostic that prints a table; not a test).

Each run is `forge train` on tiny-mixtral (4 steps of 8 sequences, fp32, no clipping) whose engine
is wrapped so that, just before the optimizer step that closes step 1, every rank reads the
reduced full gradient of each of its parameters (deepspeed.utils.safe_get_full_grad, which
reassembles ZeRO 1/2 partitions), gathers the experts over the expert-parallel group and rank 0
saves the full set. The single-process reference runs the micro batches of an expert-parallel
group together (see tests/test_parallel_layouts.py).

    python tools/diag_ep_grads.py                 # ep=2 with ZeRO 0, 1, 2 on 2 processes
    python tools/diag_ep_grads.py --world 4 --zero 0 1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _overrides(out, cache, micro, ga, extra=(), **parallel):
    return [f"model.preset={PRESET}", "model.max_seq_len=32", "model.dropout=0.0", "data.seq_len=32",
            f"data.cache_dir={cache}", "train.max_steps=4", f"train.micro_batch_size={micro}",
            f"train.grad_accum={ga}", "train.eval_interval=0", "train.save_interval=0", "train.log_interval=1",
            "train.precision=fp32", "optim.lr=2e-3", "optim.warmup_steps=1", "optim.schedule=constant",
            "optim.grad_clip=0", f"train.out_dir={out}", "log.progress=false"] + \
        [f"parallel.{k}={v}" for k, v in parallel.items()] + list(extra)


PRESET, EXTRA = "tiny-mixtral", []


def _capture(rank, world, overrides, path):
    import forge.train.trainer as trainer
    from deepspeed.utils import safe_get_full_grad
    from forge.config import load_config
    from forge.models.layers.moe import gather_experts
    real = trainer.create_engine

    def create_engine(cfg, model, groups):
        engine = real(cfg, model, groups)
        step = engine.step
        calls = [0]

        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == cfg.train.grad_accum:          # the boundary of step 1
                grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
                grads = gather_experts(grads, engine.module, groups.ep_group) if groups.ep > 1 else grads
                if groups.rank == 0:
                    torch.save(grads, path)
            return step(*a, **k)
        engine.step = wrapped
        return engine
    trainer.create_engine = create_engine
    try:
        trainer.train(load_config(None, overrides))
    finally:
        trainer.create_engine = real


def grads_of(world, micro, ga, **parallel):
    from tests.distributed import run_distributed
    out = tempfile.mkdtemp(prefix="diag-")
    path = os.path.join(out, "grads.pt")
    over = _overrides(out, CACHE, micro, ga, EXTRA if world > 1 else (), **parallel)
    if world == 1:
        _capture(0, 1, over, path)
    else:
        run_distributed(_capture, world, over, path)
    return torch.load(path)


def compare(name, a, b):
    rows = []
    for k in a:
        err = ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item()
        ratio = (a[k].norm() / b[k].norm().clamp_min(1e-30)).item()
        rows.append((err, ratio, k))
    bad = [r for r in rows if r[0] > 1e-5]
    print(f"\n{name}: {len(bad)} of {len(rows)} parameters differ by more than 1e-5 relative")
    for err, ratio, k in sorted(bad, reverse=True)[:12]:
        print(f"  {k:45s} rel.err {err:.2e}  norm ratio {ratio:.4f}")


def main():
    global CACHE, PRESET, EXTRA
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="tiny-mixtral")
    ap.add_argument("extra", nargs="*", help="more key=value overrides for the parallel runs")
    args = ap.parse_args()
    PRESET, EXTRA = args.preset, args.extra
    from forge.config import load_config
    from forge.data import build_data
    CACHE = tempfile.mkdtemp(prefix="diag-data-")
    cfg = load_config(None, ["data.seq_len=32", "model.max_seq_len=32", f"data.cache_dir={CACHE}"])
    build_data(cfg.data, seed=cfg.train.seed, work_dir=CACHE, rank=0, world_size=1)
    dp = args.world
    micro = 2
    ga = 8 // (micro * dp)
    ref = grads_of(1, micro * args.ep, 8 // (micro * args.ep))
    runs = {z: grads_of(args.world, micro, ga, ep=args.ep, zero_stage=z) for z in args.zero}
    for z, g in runs.items():
        compare(f"ep={args.ep} world={args.world} ZeRO {z} vs one process", g, ref)
    if 0 in runs:
        for z, g in runs.items():
            if z:
                compare(f"ZeRO {z} vs ZeRO 0", g, runs[0])


if __name__ == "__main__":
    main()
