"""Run a function on several CPU processes joined by a gloo process group (for tests)."""
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
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args) -> None:
    """Call fn(rank, world, *args) in `world` processes; an exception in any of them fails the call."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
