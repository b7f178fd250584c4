"""What a model layer needs to know about the parallel layout, passed as one argument.

    ctx = ParallelContext(tp_group, ep_group, sequence_parallel)     (None groups: one process)
    ctx.tp, ctx.tp_rank, ctx.ep, ctx.ep_rank    sizes and ranks (1 and 0 without a group)
    ctx.sp                                      sequence parallelism in effect (asked for and tp > 1)
The layout's other groups (pipeline, data, expert-data) never reach model code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from forge.parallel.mappings import group_rank, group_size


@dataclass(frozen=True)
class ParallelContext:
    tp_group: Optional[Any] = None
    ep_group: Optional[Any] = None
    sequence_parallel: bool = False

    @property
    def tp(self) -> int:
        return group_size(self.tp_group)

    @property
    def tp_rank(self) -> int:
        return group_rank(self.tp_group)

    @property
    def ep(self) -> int:
        return group_size(self.ep_group)

    @property
    def ep_rank(self) -> int:
        return group_rank(self.ep_group)

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1


SINGLE = ParallelContext()
