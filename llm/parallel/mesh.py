"""Ranks as a (data x sequence) mesh: `parallel.sequence` consecutive ranks (one node's GPUs, where the
all-to-alls are cheapest) form a sequence-parallel group that shares each sequence; the groups are data
parallel, each reading its own samples.

    rank = data_rank * sequence + sequence_rank

DeepSpeed keeps all ranks as its data-parallel world (ZeRO partitions over all of them, gradients are averaged
over all of them); the model's loss is scaled so that this average is the data-parallel one
(llm/model/sequence.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from llm.model.sequence import SequenceParallel


@dataclass(frozen=True)
class Mesh:
    world: int
    rank: int
    sequence: int = 1

    @property
    def data(self) -> int:
        """Data-parallel groups (each one sequence-parallel group)."""
        return self.world // self.sequence

    @property
    def data_rank(self) -> int:
        return self.rank // self.sequence

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.sequence

    def groups(self) -> SequenceParallel | None:
        """This rank's sequence-parallel group (None without sequence parallelism). Collective: every rank
        creates every group, in the same order."""
        if self.sequence == 1:
            return None
        mine = None
        for d in range(self.data):
            ranks = list(range(d * self.sequence, (d + 1) * self.sequence))
            group = dist.new_group(ranks)
            if d == self.data_rank:
                mine = group
        return SequenceParallel(mine, self.sequence, self.sequence_rank)
