"""Sequence parallelism, DeepSpeed-Ulysses' scheme: the ranks of a sequence-parallel group each hold a contiguous
1/N of every sequence; attention exchanges (all-to-all) the sequence-sharded queries, keys and values for
head-sharded ones, runs on whole sequences for its heads (so document masks and causality see every position),
and exchanges the output back. Everything else the model does is per token and runs on the local part.

The loss: each rank's mean over its part, rescaled so that the value is the group's mean over all its targets
(IGNORE excluded) on every rank of the group, and the gradient is N times the local part's share of it. A data-
parallel average of gradients over all ranks (what DeepSpeed does, unaware of the groups) is then exactly the
average over the data-parallel groups of the gradient of each group's mean loss: what one rank holding the whole
sequence computes.

DeepSpeed's own `DistributedAttention` is not used: its uneven-heads path reads the rank from DeepSpeed's global
sequence-parallel state rather than from the group it is given (which failed on gloo), and the exchange is two
small functions here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its sequence-parallel group: `size` ranks, this one `rank` of them."""

    group: dist.ProcessGroup
    size: int
    rank: int

    def part(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous part of a full-sequence tensor along `dim`."""
        n = t.size(dim) // self.size
        return t.narrow(dim, self.rank * n, n)

    def positions(self, seq_len: int, device) -> torch.Tensor:
        """The positions in the whole sequence of this rank's part (learned positions, RoPE)."""
        n = seq_len // self.size
        return torch.arange(self.rank * n, (self.rank + 1) * n, device=device)


def _exchange(x: torch.Tensor, sp: SequenceParallel, to_heads: bool) -> torch.Tensor:
    """(B, H, T/N, D) sequence-sharded -> (B, H/N, T, D) head-sharded (`to_heads`), or back."""
    n = sp.size
    if to_heads:
        B, H, Tc, D = x.shape
        send = x.reshape(B, n, H // n, Tc, D).transpose(0, 1).contiguous()  # (N, B, H/N, Tc, D): heads by rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=sp.group)  # recv[j]: rank j's part of the sequence, my heads
        return recv.permute(1, 2, 0, 3, 4).reshape(B, H // n, n * Tc, D)
    B, Hc, T, D = x.shape
    send = x.reshape(B, Hc, n, T // n, D).permute(2, 0, 1, 3, 4).contiguous()  # (N, B, H/N, T/N, D): parts by rank
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=sp.group)  # recv[j]: my part of the sequence, rank j's heads
    return recv.transpose(0, 1).reshape(B, n * Hc, T // n, D)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sp, to_heads):
        ctx.sp, ctx.to_heads = sp, to_heads
        return _exchange(x, sp, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad.contiguous(), ctx.sp, not ctx.to_heads), None, None


def to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(B, H, T/N, D) -> (B, H/N, T, D): every position of this rank's heads (differentiable)."""
    return _Exchange.apply(x, sp, True)


def to_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(B, H/N, T, D) -> (B, H, T/N, D): every head of this rank's part of the sequence (differentiable)."""
    return _Exchange.apply(x, sp, False)


def spread_kv(k: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Key or value heads ready for the exchange: fewer KV heads than ranks (grouped-query attention with a large
    group) are repeated up to one per rank, each rank receiving the KV head its query heads use."""
    kv = k.size(1)
    return k if kv % sp.size == 0 else k.repeat_interleave(sp.size // kv, dim=1)


def group_mean_loss(local_mean: torch.Tensor, local_count: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """The group's mean loss (the same value on every rank of it) from this rank's mean over its `local_count`
    targets, with N times this rank's share of its gradient (see the module docstring)."""
    count = local_count.detach().to(torch.float32)
    counts = count.clone()
    dist.all_reduce(counts, group=sp.group)
    share = local_mean * (count / counts.clamp(min=1))  # this rank's part of the group's mean
    total = share.detach().clone()
    dist.all_reduce(total, group=sp.group)
    return sp.size * share + (total - sp.size * share).detach()
