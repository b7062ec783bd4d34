"""`python -m llm.train` with faults injected at exact moments, for the crash tests: the process kills itself
with a real SIGKILL there. LLM_FAULT holds comma-separated `point:rank:step` entries (`slow` takes no rank or
step); an entry ending in `:first` acts only in a Slurm job's first start (not after a requeue):

    save_start:R:S      rank R dies as it enters the checkpoint save of step S (before writing any file)
    mid_shard:R:S       rank R dies half-way through writing its optimizer shard of step S
    before_marker:0:S   rank 0 dies after every shard of step S is written, before COMPLETE.json
    before_pointer:0:S  rank 0 dies after COMPLETE.json of step S, before `latest` is moved to it
    slow[=S]            every step takes S seconds longer (default 0.2: so that a test can signal a run mid-way)
    fill_at_save:R:S    rank R fills the disk as it enters the checkpoint save of step S (a file at LLM_FILL)
    fill_at_step:R:S    rank R fills the disk as step S starts: that step's metrics record meets a full disk
"""

import io
import os
import signal
import sys
import time
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.engine import DeepSpeedEngine

import llm.store.checkpoint
import llm.train
import llm.training.trainer


def die() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    print(f"fault: rank {rank} SIGKILLs itself at {time.time():.3f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def fill_disk() -> None:
    """Write zeros to LLM_FILL until its file system is full (the test frees it by deleting the file)."""
    with open(os.environ["LLM_FILL"], "wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 12, 1):  # to the last byte
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                continue
    print(f"fault: the disk of {os.environ['LLM_FILL']} is full", file=sys.stderr, flush=True)


def install(point: str, rank: int, step: int) -> None:
    tag = llm.store.checkpoint.tag_for(step)
    mine = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == rank

    if point == "save_start":
        original = DeepSpeedEngine.save_checkpoint

        def save_checkpoint(self, save_dir, tag=None, **kwargs):
            if mine and tag == llm.store.checkpoint.tag_for(step):
                die()
            return original(self, save_dir, tag=tag, **kwargs)

        DeepSpeedEngine.save_checkpoint = save_checkpoint
    elif point == "mid_shard":
        original = TorchCheckpointEngine.save

        def save(self, state_dict, path):
            if mine and f"/{tag}/" in str(path) and "optim_states" in str(path):
                buffer = io.BytesIO()
                torch.save(state_dict, buffer)
                Path(path).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
                die()
            return original(self, state_dict, path)

        TorchCheckpointEngine.save = save
    elif point == "fill_at_save":
        original = DeepSpeedEngine.save_checkpoint

        def save_checkpoint(self, save_dir, tag=None, **kwargs):
            if mine and tag == llm.store.checkpoint.tag_for(step):
                fill_disk()
            return original(self, save_dir, tag=tag, **kwargs)

        DeepSpeedEngine.save_checkpoint = save_checkpoint
    elif point == "fill_at_step":
        original = llm.training.trainer.lr_at

        def lr_at(s, *args):
            if mine and s + 1 == step:
                fill_disk()
            return original(s, *args)

        llm.training.trainer.lr_at = lr_at
    elif point in ("before_marker", "before_pointer"):
        name = "atomic_write_json" if point == "before_marker" else "atomic_write"
        original = getattr(llm.store.checkpoint, name)

        def write(path, data):
            target = Path(path)
            hit = target.parent.name == tag if point == "before_marker" else data == tag.encode()
            if mine and hit and target.name in (llm.store.checkpoint.MARKER, llm.store.checkpoint.POINTER):
                die()
            return original(path, data)

        setattr(llm.store.checkpoint, name, write)
    else:
        raise SystemExit(f"unknown fault point {point!r}")


def slow_down(seconds: float) -> None:
    original = llm.training.trainer.lr_at

    def lr_at(*args):
        time.sleep(seconds)
        return original(*args)

    llm.training.trainer.lr_at = lr_at


def main() -> None:
    restarted = os.environ.get("SLURM_RESTART_COUNT", "0") != "0"
    for entry in filter(None, os.environ.get("LLM_FAULT", "").split(",")):
        if entry.endswith(":first"):
            if restarted:
                continue
            entry = entry.removesuffix(":first")
        if entry.split("=")[0] == "slow":
            slow_down(float(entry.split("=")[1]) if "=" in entry else 0.2)
            continue
        point, rank, step = entry.split(":")
        install(point, int(rank), int(step))
    llm.train.main(sys.argv[1:])


if __name__ == "__main__":
    main()
