"""Measurements for parallel training (a tool that prints figures; not a test).

1. Model-state bytes per parameter per rank under ZeRO 0-3 at dp=2 (gloo, CPU, bf16 mixed
   precision as in the ZeRO paper; at ZeRO 0 Forge runs bf16 as autocast over fp32 weights, 4 + 4 + 8
   bytes), next to the paper's 16, 4 + 12/N, 2 + 14/N and 16/N. Measured
   as the unique storage of every tensor reachable from the DeepSpeed engine (module parameters
   and their gradients or partitions, optimizer master weights and moments, and any buffers the
   engine keeps) after a backward pass that follows one optimizer step, per parameter.
2. The DeepSpeed engine's overhead: tokens/s of `forge train`'s engine step (ZeRO 0, fp32) against
   a plain PyTorch loop (forward, backward, clip, AdamW) on the same model in one process.

    python tools/bench_parallel.py [--d-model 256 --layers 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tensor_bytes(root, max_depth: int = 6) -> int:
    """Bytes of the unique storages of all tensors reachable from `root` through attributes,
    lists, tuples and dicts (modules included)."""
    seen_obj, seen_storage, total = set(), set(), 0

    def visit(obj, depth):
        nonlocal total
        if depth > max_depth or id(obj) in seen_obj:
            return
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            for t in (obj, getattr(obj, "grad", None), getattr(obj, "ds_tensor", None)):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    s = t.untyped_storage()
                    if s.data_ptr() not in seen_storage and s.nbytes():
                        seen_storage.add(s.data_ptr())
                        total += s.nbytes()
            return
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            items = list(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "forge"):
            items = list(vars(obj).values())
        else:
            return
        for item in items:
            visit(item, depth + 1)

    visit(root, 0)
    return total


def _zero_worker(rank, world, stage, args, out):
    from forge.config import load_config
    from forge.models import build_model
    from forge.parallel.groups import build_groups
    from forge.train.engine import create_engine
    from forge.train import distributed as fdist
    fdist.init_distributed()
    cfg = load_config(None, [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.n_heads=4",
                             "model.vocab_size=4096", "model.max_seq_len=64", f"parallel.zero_stage={stage}",
                             "train.precision=bf16", "train.micro_batch_size=2", "optim.grad_clip=1.0"])
    groups = build_groups()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    n = model.num_params()
    engine = create_engine(cfg, model, groups)
    ids = torch.randint(0, 4096, (2, 65))
    for step in range(2):           # measured after the second backward: moments and gradients both held
        engine.backward(engine.module.loss(engine(ids[:, :-1]), ids[:, 1:]))
        if step == 0:
            engine.step()
    if rank == 0:
        out[stage] = tensor_bytes(engine) / n


def zero_bytes(args):
    import torch.multiprocessing as mp
    from tests.distributed import run_distributed
    N = 2
    manager = mp.Manager()
    out = manager.dict()
    for stage in (0, 1, 2, 3):
        run_distributed(_zero_worker, N, stage, args, out)
    paper = {0: 16, 1: 4 + 12 / N, 2: 2 + 14 / N, 3: 16 / N}
    print(f"model-state bytes per parameter per rank, dp={N}, bf16 + fp32 Adam (d={args.d_model}, L={args.layers})")
    print(f"{'ZeRO':>5} {'measured':>9} {'paper':>7}")
    for s in (0, 1, 2, 3):
        print(f"{s:>5} {out[s]:>9.2f} {paper[s]:>7.2f}")


def engine_overhead(args):
    from forge.config import load_config
    from forge.models import build_model
    from forge.parallel.groups import build_groups
    from forge.train import distributed as fdist
    from forge.train.engine import create_engine
    fdist.init_distributed()
    over = [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.n_heads=4",
            "model.vocab_size=4096", "model.max_seq_len=128", "train.micro_batch_size=8", "optim.grad_clip=1.0"]
    cfg = load_config(None, over)
    ids = torch.randint(0, 4096, (8, 129))
    tokens = ids[:, :-1].numel()

    def timed(step, n=args.steps):
        for _ in range(2):
            step()
        t = time.perf_counter()
        for _ in range(n):
            step()
        return n * tokens / (time.perf_counter() - t)

    torch.manual_seed(0)
    plain = build_model(cfg.model)
    opt = torch.optim.AdamW(plain.parameters(), lr=3e-4)

    def plain_step():
        loss = plain.loss(plain(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    engine = create_engine(cfg, build_model(cfg.model), build_groups())

    def engine_step():
        loss = engine.module.loss(engine(ids[:, :-1]), ids[:, 1:])
        engine.backward(loss)
        engine.step()

    rates = {"plain": [], "engine": []}
    for _ in range(args.rounds):                    # interleaved rounds: both see the same machine load
        rates["plain"].append(timed(plain_step))
        rates["engine"].append(timed(engine_step))
    p, e = max(rates["plain"]), max(rates["engine"])
    print(f"one process, fp32, d={args.d_model}, L={args.layers}, 8 x 128 tokens: plain PyTorch loop {p:,.0f} tokens/s, "
          f"DeepSpeed engine (ZeRO 0) {e:,.0f} tokens/s, overhead {100 * (p / e - 1):+.1f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    zero_bytes(args)
    engine_overhead(args)


if __name__ == "__main__":
    main()
