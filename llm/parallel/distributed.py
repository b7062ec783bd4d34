"""Rank and world from whichever launcher started us, process-group start-up, and the DeepSpeed JSON.

Launchers: a plain `python -m llm.train` (world size 1, no rendezvous at all), `torchrun` and the `deepspeed`
launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set), or Slurm's `srun` (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID; rank 0's address and a port the OS picked travel through the shared run directory,
llm/parallel/slurm.py). A GPU rank uses device LOCAL_RANK, or device 0 when it sees one GPU (`--gpus-per-task=1`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from llm.config.schema import Config
from llm.parallel.slurm import LaunchError, node_name, rendezvous, rendezvous_file

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
        world = int(e["WORLD_SIZE"])
        if "SLURM_STEP_ID" in e and world < int(e.get("SLURM_NTASKS", 1)):  # left over, not set by a launcher
            raise LaunchError(
                f"RANK={e['RANK']} WORLD_SIZE={world} are set, but this is one of {e['SLURM_NTASKS']} tasks of an "
                "srun step: every task would train alone; unset them in the job's environment"
            )
        return DistEnv(int(e["RANK"]), world, int(e.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in e and "SLURM_STEP_ID" in e:  # a task of an srun step (not the batch script)
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)), "slurm")
    return DistEnv(0, 1, 0, "plain")


def gpu_index(env: DistEnv) -> int:
    """This rank's CUDA device: LOCAL_RANK among the visible GPUs, or the only one it sees."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if env.local_rank >= count:
        raise LaunchError(
            f"rank {env.rank} on {node_name()} has local rank {env.local_rank} but sees {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one task per GPU"
        )
    return env.local_rank


def init(env: DistEnv, timeout_s: float = 300.0, rendezvous_dir: Path | None = None) -> torch.device:
    """Start the process group (nccl on GPUs, gloo on CPU) through DeepSpeed; return this rank's device. A
    collective that waits more than `timeout_s` (a rank died or hangs) raises instead of waiting forever.
    Under srun, `rendezvous_dir` (in the shared run directory) carries rank 0's address and port."""
    import deepspeed

    e = os.environ
    e.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    cuda = torch.cuda.is_available()
    index = gpu_index(env) if cuda else 0
    if cuda:
        torch.cuda.set_device(index)
    # DeepSpeed's own process groups (data parallel, ZeRO partitions) come from new_group() without a timeout,
    # which takes torch's module default (30 minutes), not the one given to init: set that default as well.
    timeout = datetime.timedelta(seconds=timeout_s)
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    backend = "nccl" if cuda else "gloo"
    if not torch.distributed.is_initialized():
        store = None
        if env.world_size == 1:  # one process needs no rendezvous: no port to find free, none to collide on
            store = torch.distributed.HashStore()
        elif env.launcher == "slurm" and rendezvous_dir is not None:
            store = rendezvous(rendezvous_dir, env.rank, env.world_size, timeout_s)
            e.update(MASTER_ADDR=store.host, MASTER_PORT=str(store.port))
        e.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in e:  # DeepSpeed reads it even when the process group needs none
            e["MASTER_PORT"] = str(_free_port())
        if store is not None:
            torch.distributed.init_process_group(
                backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
            )
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        if env.launcher == "slurm" and rendezvous_dir is not None:
            torch.distributed.barrier()  # everyone has connected: the address is no longer needed
            if env.rank == 0:
                rendezvous_file(rendezvous_dir).unlink(missing_ok=True)
    global _solo_group
    if env.world_size > 1 and _solo_group is None:
        _solo_group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=SOLO_TIMEOUT_S))
    return torch.device("cuda", index) if cuda else torch.device("cpu")


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


def on_every_rank(fn, errors: tuple[type[BaseException], ...]) -> None:
    """Run fn on every rank; an error of the given types on any rank (the first by rank) is raised on all, so
    that a file missing on one node stops every rank alike."""
    dist = torch.distributed
    error = None
    try:
        fn()
    except errors as e:
        error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, error, group=_solo_group)
        error = next((e for e in found if e is not None), None)
    if error is not None:
        raise error


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    """bf16 without ZeRO runs as torch.autocast over fp32 weights and gradients (nanoGPT's and litgpt's
    bf16-mixed): the matmuls in bf16, the weights, gradients and optimizer in fp32. Not DeepSpeed's bf16 mode,
    whose optimizer wrapper there accumulates the gradients in bf16 and, every step, checks each gradient for
    overflow and takes its norm on the host: a device synchronisation per parameter tensor. Under ZeRO,
    DeepSpeed's bf16 (its ZeRO optimizer keeps flat fp32 master weights)."""
    if cfg.deepspeed.stage == 0 and resolve_precision(cfg.deepspeed.precision) == "bf16":
        return torch.bfloat16
    return None


def forward_precision(cfg: Config, device) -> contextlib.AbstractContextManager:
    """The context a forward outside the DeepSpeed engine runs in (the engine enters it itself, from the
    `torch_autocast` section of its config: it would switch off an autocast entered around it on a GPU)."""
    dtype = autocast_dtype(cfg)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def loop_clips(cfg: Config) -> bool:
    """Whether the training loop clips the gradients itself rather than DeepSpeed: without ZeRO in fp32 (or bf16
    autocast over fp32 weights), where DeepSpeed would take a norm per parameter and all-reduce a total every rank
    already has (the gradients are averaged by then); torch's clip_grad_norm_ gives the same result in one fused
    pass, and its norm is the logged grad_norm. Under ZeRO or in fp16 DeepSpeed's optimizer wrapper clips."""
    precision = resolve_precision(cfg.deepspeed.precision)
    return cfg.deepspeed.stage == 0 and precision in ("fp32", "bf16") and cfg.optim.grad_clip > 0


def deepspeed_config(cfg: Config, world_size: int, n_params: int | None = None) -> dict:
    """The DeepSpeed JSON, generated from the schema (saved as <run_dir>/deepspeed.json). Given the model's
    parameter count, the communication buckets are capped at it: a bucket larger than the whole model holds
    nothing more, but ZeRO-1/2 allocate it in full at every step (2 GB at the default 5e8 elements). Gradient
    clipping is 0 there when the loop clips (`loop_clips`)."""
    t, d = cfg.train, cfg.deepspeed
    precision = resolve_precision(d.precision)
    zero: dict = {"stage": d.stage}
    if d.stage >= 1:
        cap = n_params or max(d.reduce_bucket_size, d.allgather_bucket_size)
        zero.update(
            reduce_bucket_size=min(d.reduce_bucket_size, cap),
            allgather_bucket_size=min(d.allgather_bucket_size, cap),
            overlap_comm=d.overlap_comm,
        )
    if d.stage == 3 and d.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = d.param_persistence_threshold
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    # the ranks of a sequence-parallel group share their samples; DeepSpeed counts every rank as data parallel
    accum = t.global_batch // (t.micro_batch * (world_size // cfg.parallel.sequence))
    return {
        "train_batch_size": t.micro_batch * accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0 if loop_clips(cfg) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16" and autocast_dtype(cfg) is None},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW also under ZeRO-Offload (no C++ op build)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # on by default, and synchronised: a device-wide synchronize at every forward and every step
        "timers": {"throughput": {"enabled": False}},
        # bf16 without ZeRO (autocast_dtype): the engine runs each forward under torch.autocast
        "torch_autocast": {"enabled": autocast_dtype(cfg) is not None, "dtype": "bfloat16"},
    }


def all_max(values: list, device) -> list[float]:
    """The maximum over ranks of each value (tensors on the device or Python numbers), with one copy to the host:
    the step's one synchronisation point."""
    # Python numbers are filled in on the device: copying one there would wait for all the queued work
    on_device = (v if isinstance(v, torch.Tensor) else torch.full((), float(v), device=device) for v in values)
    t = torch.stack([v.float().reshape(()) for v in on_device])
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
