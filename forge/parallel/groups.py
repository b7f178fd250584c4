"""Process groups for tensor (model), pipeline, data and expert parallelism.

The layout comes from DeepSpeed's PipeModelDataParallelTopology, axes (pipe, data, model) with the
model (tensor-parallel) axis fastest: global rank = (pipe * dp + data) * tp + model. Every rank
creates every group in the same order (torch.distributed requires it) and keeps its own.
Expert parallelism splits the data axis: ep consecutive data ranks form an expert group; ranks
with the same position in their expert group form an expert-data-parallel group.
`ParallelGroups` also serves as DeepSpeed's `mpu` (the get_*_parallel_* methods).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist


@dataclass
class ParallelGroups:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    tp_group: Optional[Any] = None
    pp_group: Optional[Any] = None
    dp_group: Optional[Any] = None
    ep_group: Optional[Any] = None
    edp_group: Optional[Any] = None
    topology: Optional[Any] = None

    def context(self, sequence_parallel: bool = False):
        """The ParallelContext model layers are built with (tp and ep groups)."""
        from forge.parallel.context import ParallelContext
        return ParallelContext(self.tp_group, self.ep_group, sequence_parallel)

    # ---- DeepSpeed mpu interface ----
    def get_model_parallel_rank(self): return self.tp_rank
    def get_model_parallel_world_size(self): return self.tp
    def get_model_parallel_group(self): return self.tp_group
    def get_tensor_model_parallel_rank(self): return self.tp_rank
    def get_tensor_model_parallel_world_size(self): return self.tp
    def get_tensor_model_parallel_group(self): return self.tp_group
    def get_data_parallel_rank(self): return self.dp_rank
    def get_data_parallel_world_size(self): return self.dp
    def get_data_parallel_group(self): return self.dp_group
    def get_pipeline_model_parallel_rank(self): return self.pp_rank
    def get_pipeline_model_parallel_world_size(self): return self.pp
    def get_pipeline_model_parallel_group(self): return self.pp_group


def _new_groups(lists, rank):
    """Create one group per rank list (all ranks, same order); return the one holding `rank`."""
    mine = None
    for ranks in lists:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine


def build_groups(tp: int = 1, pp: int = 1, ep: int = 1) -> ParallelGroups:
    """Groups for the current world (torch.distributed initialised), or trivial ones in one process."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by parallel.tp * parallel.pp = {tp} * {pp}")
    dp = world // (tp * pp)
    if dp % ep:
        raise ValueError(f"parallel.ep={ep} must divide the data-parallel size {dp} (= world {world} / (tp*pp))")
    if world == 1:
        return ParallelGroups()
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    rank = dist.get_rank()
    coord = topo.get_coord(rank)
    g = ParallelGroups(tp=tp, pp=pp, dp=dp, ep=ep, rank=rank, tp_rank=coord.model, pp_rank=coord.pipe,
                       dp_rank=coord.data, ep_rank=coord.data % ep, topology=topo)
    g.tp_group = _new_groups(topo.get_axis_comm_lists("model"), rank)
    g.pp_group = _new_groups(topo.get_axis_comm_lists("pipe"), rank)
    dp_lists = topo.get_axis_comm_lists("data")
    g.dp_group = _new_groups(dp_lists, rank)
    ep_lists = [d[i:i + ep] for d in dp_lists for i in range(0, dp, ep)]
    edp_lists = [d[j::ep] for d in dp_lists for j in range(ep)]
    g.ep_group = _new_groups(ep_lists, rank)
    g.edp_group = _new_groups(edp_lists, rank)
    return g
