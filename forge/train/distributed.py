"""Process-group setup so `forge train` runs as a plain process or under a launcher.

Without a launcher (no WORLD_SIZE in the environment) this process becomes rank 0 of a world of 1:
RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1, MASTER_PORT=<a free port>. Under a
launcher (deepspeed, torchrun) the launcher's variables are used. The backend is gloo on CPU and
nccl on CUDA. `init_distributed()` is idempotent, so several trainings can run in one process.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch

from forge import deepspeed_compat as compat


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OWNER = "FORGE_DIST_OWNER"     # "pid:port" of the process that made itself a world of 1


def _inherited_single_process_env() -> bool:
    """True when RANK/WORLD_SIZE/MASTER_PORT were set by `setup_env` in a parent process (they
    leak into subprocesses through os.environ), not by a launcher."""
    owner = os.environ.get(OWNER, "")
    if not owner:
        return False
    pid, _, port = owner.partition(":")
    return pid != str(os.getpid()) and port == os.environ.get("MASTER_PORT")


def setup_env() -> None:
    """Fill in the rendezvous variables of a single-process world when no launcher set them."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ and not _inherited_single_process_env():
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if int(os.environ["WORLD_SIZE"]) > 1:
                raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set; start with a launcher "
                                   "(deepspeed / torchrun) that sets it")
            os.environ["MASTER_PORT"] = str(find_free_port())
        return
    port = str(find_free_port())
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os.environ[OWNER] = f"{os.getpid()}:{port}"


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


DEFAULT_TIMEOUT_S = 600.0     # train.collective_timeout_s's default


def elastic_attempt_store(timeout_s: float):
    """Under torchrun with the store it shares with its workers (the c10d rendezvous' default,
    TORCHELASTIC_USE_AGENT_STORE=True): a client of that store whose keys carry this attempt's
    number (TORCHELASTIC_RESTART_COUNT); None otherwise (init_process_group's env:// does it).

    The launcher's TCPStore outlives the workers, so after `--max-restarts` restarts the job the
    keys the dead attempt's process groups wrote are still there: gloo's connectFullMesh (and
    NCCL's unique-id exchange) of the new attempt may read a dead peer's address from them and
    fail with "Connection refused" (pytorch issue 135712). Prefixing every key with the attempt
    keeps the attempts apart. The restart count is each node's own, so on several nodes the
    launchers must restart together (they do when every node's workers fail, as they do once a
    peer is gone: a failed collective ends a rank); a launcher with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every attempt a new store and needs none of this
    (launchers/torchrun.sh sets it for several nodes)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    from torch.distributed import PrefixStore, TCPStore
    client = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                      is_master=False, timeout=timedelta(seconds=timeout_s))
    return PrefixStore(f"forge/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", client)


def init_distributed(timeout_s: float | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed once per process. `timeout_s`
    (train.collective_timeout_s; DEFAULT_TIMEOUT_S when None) bounds every collective, in the world
    group and in the groups made later: a rank waiting longer for a dead or stalled peer raises
    (gloo) or is torn down by the NCCL watchdog, so the launcher ends the job instead of hanging."""
    compat.select_accelerator()
    import deepspeed
    import deepspeed.comm as ds_comm
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    # also the default of the groups made later without one (torch's new_group otherwise takes
    # its own: 30 min gloo, 10 min nccl), Forge's and DeepSpeed's ZeRO, pipeline and expert groups
    compat.set_default_group_timeout(timeout_s)
    if torch.distributed.is_initialized() and ds_comm.is_initialized():
        return
    if not torch.distributed.is_initialized():
        # someone destroyed the group with torch.distributed directly: drop DeepSpeed's cached
        # groups, which would otherwise point at the dead one
        compat.release_group_references()
    setup_env()
    if not torch.cuda.is_available():
        compat.skip_shm_comm_build()        # gloo does everything training needs
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = elastic_attempt_store(timeout_s)
    if store is not None and not torch.distributed.is_initialized():
        world = int(os.environ["WORLD_SIZE"])
        # bound to its GPU as DeepSpeed's own init does (not for a world of 1: no peer to split with)
        bind = {"device_id": device()} if torch.cuda.is_available() and world > 1 else {}
        torch.distributed.init_process_group(backend(), store=store, rank=int(os.environ["RANK"]), world_size=world,
                                             timeout=timedelta(seconds=timeout_s), **bind)
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: list[float], group=None) -> list[float]:
    """Mean of each value over the ranks of `group` (the whole world by default)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t, group=group)
    return (t / torch.distributed.get_world_size(group)).tolist()


def all_reduce_max(value: int) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj, dst: int = 0) -> list | None:
    """Every rank's (small, picklable) `obj` on rank `dst`, in rank order; None elsewhere."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    torch.distributed.gather_object(obj, out, dst=dst)
    return out


def shutdown() -> None:
    """Destroy the process group (through DeepSpeed, so its cached groups go too)."""
    if torch.distributed.is_initialized():
        import deepspeed.comm as ds_comm
        ds_comm.destroy_process_group()
