"""Slurm job steps: where rank 0 runs, and a rendezvous through the run directory (which every node shares).

Under `srun`, rank 0 opens the TCP store on a port the operating system picks (so two steps of one
allocation, or two jobs on one node, can never collide) and writes its address and port to
<run_dir>/rendezvous/<job>.<step>.<restart>.json; the other ranks read it there. A rank that cannot see the
file within RENDEZVOUS_WAIT_S (or the collective timeout, if shorter) is on a node that does not share the run
directory, and says so.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import torch.distributed as dist

from llm.data.files import atomic_write_json

# Rank 0 writes the rendezvous file seconds after its task starts; the others start at the same moment, so a
# file still missing after this long is one this node cannot see, not a slow rank 0.
RENDEZVOUS_WAIT_S = 120.0


class LaunchError(RuntimeError):
    """The launch environment cannot work (no master address, no shared run directory, too few GPUs); the
    message names the rank, the node and the fix."""


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def node_addr(node: str) -> str | None:
    """The address Slurm reaches `node` at (its NodeAddr), or None if scontrol cannot say."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
    return fields.get("NodeAddr") if out.returncode == 0 else None


def step_nodes() -> int:
    e = os.environ
    return int(e.get("SLURM_STEP_NUM_NODES") or e.get("SLURM_NNODES") or e.get("SLURM_JOB_NUM_NODES") or 1)


def rendezvous_file(directory: Path) -> Path:
    e = os.environ
    key = f"{e.get('SLURM_JOB_ID', '0')}.{e.get('SLURM_STEP_ID', '0')}.{e.get('SLURM_RESTART_COUNT', '0')}"
    return Path(directory) / f"{key}.json"


def rendezvous(directory: Path, rank: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The TCP store of this job step: opened by rank 0, found by the others through the shared directory."""
    path, timeout = rendezvous_file(directory), datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        node = node_name()
        addr = node_addr(node) or node
        if step_nodes() > 1 and (addr == "localhost" or addr.startswith("127.")):
            raise LaunchError(
                f"rank 0 on {node}: this {step_nodes()}-node step would advertise the loopback address {addr}; "
                "give the node a NodeAddr in slurm.conf (or a hostname that resolves to its network address)"
            )
        store = dist.TCPStore(addr, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"addr": addr, "port": store.port, "node": node})
        return store
    wait = min(timeout_s, RENDEZVOUS_WAIT_S)
    deadline = time.time() + wait
    while not path.is_file():
        if time.time() > deadline:
            raise LaunchError(
                f"rank {rank} on {node_name()}: rank 0's rendezvous file {path} did not appear within {wait:g} s; "
                f"the run directory must be on a filesystem shared by every node ({node_name()} does not see it)"
            )
        time.sleep(0.1)
    info = json.loads(path.read_text())
    return dist.TCPStore(info["addr"], info["port"], world_size, is_master=False, timeout=timeout)
