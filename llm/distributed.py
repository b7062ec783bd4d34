"""Rank and world from whichever launcher started us, process-group start-up, and the DeepSpeed JSON.

Launchers: a plain `python -m llm.train` (world size 1), `torchrun` and the `deepspeed` launcher (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set), or Slurm's `srun` (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID; the master is the job's first node, the port derived from the job id).
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch

from llm.config import Config

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first `import deepspeed`

# Work that rank 0 does alone while the others wait (preparing the demo's data, converting a checkpoint to the
# universal format) can outlast the collective timeout; the others wait for it on a side group up to this long.
SOLO_TIMEOUT_S = 2 * 3600
_solo_group = None


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # plain | torchrun | slurm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect() -> DistEnv:
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in e and "SLURM_STEP_ID" in e:  # a task of an srun step (not the batch script)
        nodes = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST", "localhost")
        if "MASTER_ADDR" not in e:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
            e["MASTER_ADDR"] = out.stdout.split()[0] if out.returncode == 0 and out.stdout else "127.0.0.1"
        e.setdefault("MASTER_PORT", str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)), "slurm")
    return DistEnv(0, 1, 0, "plain")


def init(env: DistEnv, timeout_s: float = 300.0) -> torch.device:
    """Start the process group (nccl on GPUs, gloo on CPU) through DeepSpeed; return this rank's device. A
    collective that waits more than `timeout_s` (a rank died or hangs) raises instead of waiting forever."""
    import datetime

    import deepspeed

    e = os.environ
    e.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    e.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in e:  # DeepSpeed reads it even when the process group needs none
        e["MASTER_PORT"] = str(_free_port())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    # DeepSpeed's own process groups (data parallel, ZeRO partitions) come from new_group() without a timeout,
    # which takes torch's module default (30 minutes), not the one given to init: set that default as well.
    timeout = datetime.timedelta(seconds=timeout_s)
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    backend = "nccl" if cuda else "gloo"
    if not torch.distributed.is_initialized():
        if env.world_size == 1:  # one process needs no rendezvous: no port to find free, none to collide on
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    global _solo_group
    if env.world_size > 1 and _solo_group is None:
        _solo_group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=SOLO_TIMEOUT_S))
    return torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")


def on_rank0(fn, errors: tuple[type[BaseException], ...]) -> None:
    """Run fn on rank 0 while the other ranks wait (up to SOLO_TIMEOUT_S); an error of the given types there
    is raised on every rank, so no rank is left waiting and every rank reports the same problem."""
    dist = torch.distributed
    error = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            fn()
        except errors as e:
            error = [e]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0, group=_solo_group)
    if error[0] is not None:
        raise error[0]


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON, generated from the schema (saved as <run_dir>/deepspeed.json)."""
    t, d = cfg.train, cfg.deepspeed
    precision = resolve_precision(d.precision)
    zero: dict = {"stage": d.stage}
    if d.stage >= 1:
        zero.update(
            reduce_bucket_size=d.reduce_bucket_size,
            allgather_bucket_size=d.allgather_bucket_size,
            overlap_comm=d.overlap_comm,
        )
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // (t.micro_batch * world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW also under ZeRO-Offload (no C++ op build)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
