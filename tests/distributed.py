"""Run a function on several CPU processes joined by a gloo process group (for tests)."""
import datetime
import os

import torch.multiprocessing as mp

from forge.train.distributed import find_free_port as free_port


def _entry(rank, world, port, fn, args):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # every rank done before any tears its connections down: a rank whose peer had already
        # exited once aborted in gloo's teardown ("terminate called without an active exception")
        if dist.is_initialized():
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args) -> None:
    """Call fn(rank, world, *args) in `world` processes; an exception in any of them fails the call."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def tp_training_matches(name, cfg, sp, groups, weight_tol=1e-5, vocab=63):
    """One process's model of `cfg` and its tp shards (sequence parallel when `sp`) from the same
    seed: the rank-local build equals the one process's shards (layout-independent init); with the
    1-d tensors moved off their initial values (per-head parameters that differ), 3 AdamW steps each
    on the same batches give losses within 1e-5 relative at every step and gathered final weights
    within `weight_tol` (relative norm). Returns the tp model."""
    import torch
    from forge.models import build_model
    from forge.models.io import load_state_dict_strict, unique_state_dict
    from forge.parallel.sharding import gather_tensors, shard_state_dict
    full = build_model(cfg, seed=5)
    model = build_model(cfg, groups.context(sp), seed=5)
    for n, t in shard_state_dict(unique_state_dict(full), model, groups.tp_group).items():
        assert torch.equal(dict(model.named_parameters())[n], t), f"{name}: initial {n}"
    with torch.no_grad():
        for n, p in full.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    load_state_dict_strict(model, shard_state_dict(unique_state_dict(full), model, groups.tp_group), name)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0, eps=1e-6) for m in (full, model)]
    for step in range(3):
        ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(step))
        losses = []
        for m, opt in zip((full, model), opts):
            opt.zero_grad()
            loss = m.loss(m(ids[:, :-1]), ids[:, 1:])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0]), (name, step, losses)
    gathered = gather_tensors({n: p.detach() for n, p in model.named_parameters()}, model, groups.tp_group, vocab)
    for n, p in full.named_parameters():
        err = (gathered[n] - p.detach()).norm() / p.detach().norm().clamp_min(1e-12)
        assert err <= weight_tol, f"{name}: {n} differs by {err:.2e}"
    return model
