"""Communication bytes of one training step per parallel layout, next to an analytic count (a
tool that prints figures; not a test).

Each process wraps torch.distributed's collectives and point-to-point calls and adds up the
payload it contributes to groups of more than one rank (the bytes of its input tensor: what all_reduce reduces, what all_gather
gathers from it, what send sends), then runs `forge train` for `--steps` steps on a tiny Llama
(micro batch B, seq T, width d, L layers, P parameters, fp32, one micro batch per step).
The analytic payload per rank per step:
    dp=2 (ZeRO 0):  P * 4                        the gradient all-reduce
    tp=2:           (1 + 2L) * B*T*d*4  forward  (embedding, attention and MLP outputs)
                  + (1 + 2L) * B*T*d*4  backward (input gradients of the attention and MLP regions,
                                         entered once each, and of the head)
                  + 3 * B*T*4           the vocab-parallel cross-entropy (max, target logit, sum)
    pp=2:           B*T*d*4 per stage boundary, forward (sent by stage 0) and backward (stage 1)
Small control messages (losses, norms, shapes) come on top.

    python tools/bench_comm.py
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, T, D, L = 4, 32, 64, 2
COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
           "broadcast", "send", "isend", "all_to_all_single")


def _payload(name, args, kwargs):
    if name in ("reduce_scatter",):
        parts = args[1] if len(args) > 1 else kwargs["input_list"]
        return sum(p.numel() * p.element_size() for p in parts)
    if name in ("all_gather",):
        t = args[1] if len(args) > 1 else kwargs["tensor"]
    elif name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
        t = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
    else:
        t = args[0] if args else kwargs["tensor"]
    return t.numel() * t.element_size()


def _count(counter):
    import torch.distributed as dist
    for name in COUNTED:
        fn = getattr(dist, name)

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            group = kwargs.get("group")
            if _name in ("send", "isend") or dist.get_world_size(group) > 1:   # a group of one moves nothing
                counter[_name] += _payload(_name, args, kwargs)
            return _fn(*args, **kwargs)
        setattr(dist, name, wrapped)


def _worker(rank, world, overrides, steps, out):
    """Counts two resumed runs from the same checkpoint, of 1 and 1 + steps steps: their
    difference is `steps` training steps alone (start-up, resume and the final save cancel)."""
    import shutil
    import torch.distributed as dist
    from forge.config import load_config
    from forge.train.trainer import train
    counter = Counter()
    _count(counter)
    cfg = load_config(None, overrides)
    train(cfg, stop_at=1)
    base = cfg.train.out_dir
    if rank == 0:
        for tag in ("a", "b"):
            shutil.copytree(base, f"{base}-{tag}")
    dist.barrier()
    totals = {}
    for tag, n in (("a", 1), ("b", 1 + steps)):
        cfg.train.out_dir, cfg.train.resume = f"{base}-{tag}", "auto"
        start = Counter(counter)
        train(cfg, stop_at=1 + n)
        totals[tag] = Counter(counter)
        totals[tag].subtract(start)
    per_call = Counter(totals["b"])
    per_call.subtract(totals["a"])
    out[rank] = dict(per_call, total=sum(per_call.values()))


def main():
    import torch.multiprocessing as mp
    from forge.config import load_config
    from forge.data import build_data
    from forge.models import build_model
    from tests.distributed import run_distributed
    steps = 3
    cache = tempfile.mkdtemp()
    base = ["model.preset=tiny-llama", f"model.d_model={D}", f"model.n_layers={L}", f"model.max_seq_len={T}",
            f"data.seq_len={T}", f"data.cache_dir={cache}", f"train.micro_batch_size={B}", "train.max_steps=10",
            "train.eval_interval=0", "train.save_interval=0", "train.log_interval=1000", "log.progress=false",
            "optim.grad_clip=1.0"]
    cfg = load_config(None, base)
    bundle = build_data(cfg.data, seed=1, work_dir=cache, rank=0, world_size=1)
    cfg.model.vocab_size = bundle.tokenizer.vocab_size
    P = build_model(cfg.model).num_params()
    act = B * T * D * 4
    layouts = {"dp=2 ZeRO-0": ([], P * 4), "tp=2": (["parallel.tp=2"], (1 + 2 * L) * act + (1 + 2 * L) * act + 3 * B * T * 4),
               "pp=2": (["parallel.pp=2"], act)}
    manager = mp.Manager()
    print(f"tiny Llama: d={D}, L={L}, P={P:,}, micro batch {B} x {T} tokens, fp32; payload bytes per rank per step")
    print(f"{'layout':<13}{'rank':>5}{'measured':>12}{'analytic':>12}{'ratio':>8}   by call")
    for name, (extra, analytic) in layouts.items():
        out = manager.dict()
        with tempfile.TemporaryDirectory() as d:
            run_distributed(_worker, 2, base + extra + [f"train.out_dir={d}/run"], steps, out)
        for r in sorted(out):
            m = out[r]["total"] / steps
            calls = {k: v for k, v in out[r].items() if k != "total"}
            print(f"{name:<13}{r:>5}{m:>12,.0f}{analytic:>12,.0f}{m / analytic:>8.2f}   "
                  + ", ".join(f"{k} {v / steps:,.0f}" for k, v in sorted(calls.items()) if v))


if __name__ == "__main__":
    main()
