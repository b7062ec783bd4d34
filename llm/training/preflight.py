"""Checks every launch makes before training, so that a broken node fails in seconds with its name rather
than hours later: every rank reached the rendezvous (the process group started), an all-reduce gives the
right answer, every rank sees rank 0's run directory (it must be on a filesystem all nodes share), and on
GPUs no two ranks of a node drive the same device."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from llm.parallel.slurm import node_name


class PreflightError(RuntimeError):
    """A launch that cannot train; the message names the rank(s), the node(s) and the fix."""


def preflight(rank: int, world_size: int, device: torch.device, run_dir: Path, launch: str) -> None:
    """Run on every rank; raise PreflightError on every rank if any rank fails a check."""
    token = Path(run_dir) / "rendezvous" / f"preflight-{launch}"
    if rank == 0:
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(launch)
    dist.barrier()
    sees = token.is_file() and token.read_text() == launch
    total = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(total)
    adds_up = total.item() == world_size * (world_size + 1) / 2
    gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
    facts = [None] * world_size
    dist.all_gather_object(facts, (rank, node_name(), sees, adds_up, gpu))
    dist.barrier()
    if rank == 0:
        token.unlink(missing_ok=True)
    problems, users = [], defaultdict(list)
    for r, node, r_sees, r_adds_up, r_gpu in facts:
        if not r_sees:
            problems.append(
                f"rank {r} on {node} does not see rank 0's run directory {run_dir}: it must be on a filesystem "
                "shared by every node"
            )
        if not r_adds_up:
            problems.append(f"rank {r} on {node}: an all-reduce gave a wrong answer (check the network/NCCL setup)")
        if r_gpu is not None:
            users[(node, r_gpu)].append(r)
    for (node, _), ranks in users.items():
        if len(ranks) > 1:
            problems.append(f"ranks {ranks} on {node} share one GPU: start one task per GPU")
    if problems:
        raise PreflightError("pre-flight: " + "; ".join(problems[:4]))
