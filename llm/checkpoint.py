"""Checkpoints: DeepSpeed engine state plus our client state, written so that a crash never damages the
last good one.

Layout: <run_dir>/checkpoints/step_00000100/ holds DeepSpeed's files and, written by rank 0 only after
every rank has finished, COMPLETE.json (step, world size, ZeRO stage, each file's size). Then the pointer
<run_dir>/checkpoints/latest (the tag, as DeepSpeed's own tools expect it) is replaced atomically, and
checkpoints beyond the newest `keep_last` are deleted. A directory without a matching COMPLETE.json is
incomplete and is never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from llm.data.files import atomic_write, atomic_write_json

MARKER = "COMPLETE.json"
POINTER = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_complete(tag_dir: Path) -> str | None:
    """None if the checkpoint is complete, else what is wrong with it."""
    marker = tag_dir / MARKER
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    if not marker.is_file():
        return f"{tag_dir} is incomplete (no {MARKER}: the save was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return f"{marker} is unreadable"
    for name, size in files.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{tag_dir} is missing {name}"
        if f.stat().st_size != size:
            return f"{tag_dir}/{name} is {f.stat().st_size:,} bytes, expected {size:,} (truncated)"
    return None


class Checkpoints:
    def __init__(self, directory: str | Path, keep_last: int = 3, rank: int = 0):
        self.dir, self.keep_last, self.rank = Path(directory), keep_last, rank

    def save(self, engine, step: int, client_state: dict, world_size: int, zero_stage: int, describe: dict) -> Path:
        """Save on every rank; return the checkpoint directory once it is complete and `latest` points to it.
        `describe` goes into COMPLETE.json, readable without loading the checkpoint."""
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0 and tag_dir.exists():  # a leftover of an interrupted save of this same step
            shutil.rmtree(tag_dir)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        _barrier()
        if self.rank == 0:
            files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
            meta = {"step": step, "world_size": world_size, "zero_stage": zero_stage, **describe, "files": files}
            atomic_write_json(tag_dir / MARKER, meta)
            atomic_write(self.dir / POINTER, tag.encode())
            self._prune(keep=tag)
        _barrier()
        return tag_dir

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())
        done = [t for t in tags if (self.dir / t / MARKER).is_file()]
        for t in done[: max(0, len(done) - self.keep_last)]:
            if t != keep:
                shutil.rmtree(self.dir / t, ignore_errors=True)
                shutil.rmtree(self.dir / "universal" / t, ignore_errors=True)
        for t in tags:  # interrupted saves older than the one just completed
            if t < keep and t not in done:
                shutil.rmtree(self.dir / t, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint directory to resume from: `none`; `auto` (the `latest` pointer if that checkpoint is
        complete, else the newest complete one, else nothing); or an explicit checkpoint directory."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if (path / POINTER).is_file():
                path = path / (path / POINTER).read_text().strip()
            problem = check_complete(path)
            if problem:
                raise CheckpointError(f"cannot resume: {problem}; pick another checkpoint or resume=none")
            return path
        pointer = self.dir / POINTER
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if check_complete(path) is None:
                return path
        complete = [p for p in sorted(self.dir.glob("step_*"), reverse=True) if check_complete(p) is None]
        return complete[0] if complete else None

    @staticmethod
    def meta(tag_dir: Path) -> dict:
        return json.loads((tag_dir / MARKER).read_text())

    @staticmethod
    def needs_universal(tag_dir: Path, world_size: int) -> bool:
        """Partitioned (ZeRO >= 1) optimizer state saved by another number of ranks must be converted."""
        meta = Checkpoints.meta(tag_dir)
        return meta["zero_stage"] > 0 and meta["world_size"] != world_size

    def universal(self, tag_dir: Path) -> Path:
        """DeepSpeed's universal form of a checkpoint (made once, by rank 0): loadable on any number of ranks.
        The engine must be created with {"checkpoint": {"load_universal": true}} to load it."""
        out = self.dir / "universal" / tag_dir.name
        if self.rank == 0 and not (out / MARKER).is_file():
            shutil.rmtree(out, ignore_errors=True)
            cmd = [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(tag_dir),
                "--output_folder",
                str(out),
                "--inject_missing_state",
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if r.returncode != 0:
                tail = r.stderr.strip().splitlines()[-1:] or ["no output"]
                raise CheckpointError(f"converting {tag_dir} to a universal checkpoint failed: {tail[0]}")
            atomic_write_json(out / MARKER, {"from": str(tag_dir), "files": {}})
        _barrier()
        return out

    def load(self, engine, tag_dir: Path, world_size: int, zero_stage: int) -> dict:
        """Load engine state (module, optimizer) and return the client state. A checkpoint from another number
        of ranks is loaded through its universal form."""
        meta = self.meta(tag_dir)
        if meta["zero_stage"] != zero_stage:
            raise CheckpointError(
                f"{tag_dir} was saved with ZeRO stage {meta['zero_stage']}, this run uses {zero_stage}; "
                f"resume with deepspeed.stage={meta['zero_stage']}"
            )
        source = self.universal(tag_dir) if self.needs_universal(tag_dir, world_size) else tag_dir
        _, client = engine.load_checkpoint(str(source.parent), tag=source.name, load_lr_scheduler_states=False)
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}; it may be damaged, pick another checkpoint")
        return client
