"""Checkpoints: DeepSpeed engine state plus our client state, written so that a crash never damages the last
good one, and verified before they are resumed.

Layout: <run_dir>/checkpoints/step_00000100/ holds DeepSpeed's files and, written by rank 0 only after every
rank has finished, COMPLETE.json: step, world size, ZeRO stage, and each file's size and sha256 (the ranks
hash the files between them). Then the pointer <run_dir>/checkpoints/latest (the tag, as DeepSpeed's own
tools expect it) is replaced atomically, and checkpoints beyond the newest `keep_last` are deleted.

A checkpoint is intact when COMPLETE.json is readable and every file it lists is present with its size and
sha256; a directory without COMPLETE.json is an interrupted save and was never a checkpoint. A checkpoint
whose weights were followed by non-finite losses carries NONFINITE.json and is not resumed automatically.
`latest` is read as untrusted bytes: it counts only when it names a `step_NNNNNNNN` directory of this run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from llm.config.schema import RUNTIME_MODEL_FIELDS
from llm.data.files import atomic_write, atomic_write_json
from llm.parallel.distributed import on_rank0
from llm.parallel.ds_patches import repair_zero3_universal_load

FORMAT = "llm-checkpoint/2"
MARKER = "COMPLETE.json"
SUSPECT = "NONFINITE.json"
POINTER = "latest"
TAG = re.compile(r"step_\d{8}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist() else (0, 1)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _problem_of(tag_dir: Path, verify_share: Callable[[list[str]], list[str]]) -> str | None:
    """What makes `tag_dir` unusable, or None. `verify_share` picks the files whose sha256 this process checks."""
    marker = tag_dir / MARKER
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    if not marker.is_file():
        return f"{tag_dir} is incomplete (no {MARKER}: the save was interrupted)"
    if (tag_dir / SUSPECT).is_file():
        return f"{tag_dir} was followed by non-finite losses ({SUSPECT}; delete that file to resume from it anyway)"
    try:
        meta = json.loads(marker.read_bytes())
        files = {name: (int(e["size"]), str(e["sha256"])) for name, e in meta["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{marker} is unreadable or was written without checksums"
    if TAG.fullmatch(tag_dir.name) and meta.get("step") != int(tag_dir.name.removeprefix("step_")):
        return f"{tag_dir} holds step {meta.get('step')}, not the one its name says (renamed, or linked from elsewhere)"
    for name, (size, _) in files.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{tag_dir} is missing {name}"
        if f.stat().st_size != size:
            return f"{tag_dir}/{name} is {f.stat().st_size:,} bytes, expected {size:,} (truncated)"
    for name in verify_share(sorted(files)):
        if sha256_of(tag_dir / name) != files[name][1]:
            return f"{tag_dir}/{name} does not match its sha256 (damaged)"
    return None


def check_checkpoint(tag_dir: Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it. Under torch.distributed every rank
    hashes its share of the files and all ranks return the same answer (call it on every rank)."""
    rank, world = _rank_world()
    problem = _problem_of(Path(tag_dir), lambda names: names[rank::world])
    if world == 1:
        return problem
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def read_pointer(directory: Path) -> tuple[str | None, str | None]:
    """(tag, None) when `directory/latest` names a checkpoint directory of `directory`, else (None, why)."""
    pointer = directory / POINTER
    if not pointer.is_file():
        return None, None
    raw = pointer.read_bytes()[:256]
    text = raw.decode("ascii", errors="replace").strip()
    if not TAG.fullmatch(text):
        return None, f"{pointer} does not name a checkpoint of this run ({raw[:40]!r}); ignoring it"
    return text, None


class Checkpoints:
    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 3,
        rank: int = 0,
        say: Callable[[str], None] = None,
        run_id: str | None = None,
    ):
        """`run_id` identifies the run: `resume=auto` skips a checkpoint that another run wrote (linked or copied
        here), which records another id."""
        self.dir, self.keep_last, self.rank, self.run_id = Path(directory), keep_last, rank, run_id
        self.say = say or (lambda msg: print(msg, file=sys.stderr) if rank == 0 else None)

    def tags(self) -> list[Path]:
        """Checkpoint directories (complete or not), newest first."""
        return sorted((p for p in self.dir.glob("step_*") if p.is_dir() and TAG.fullmatch(p.name)), reverse=True)

    def save(
        self,
        engine,
        step: int,
        client_state: dict,
        world_size: int,
        zero_stage: int,
        describe: dict,
        protect=None,
        trainable_only: bool = False,
    ) -> Path:
        """Save on every rank; return the checkpoint directory once it is complete and `latest` points to it.
        `describe` goes into COMPLETE.json, readable without loading the checkpoint; `protect` (a checkpoint
        directory) is never pruned. `trainable_only` (LoRA) leaves the frozen weights out: they are those of the
        checkpoint the run was initialised from."""
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0:  # leftovers of an earlier save of this same step, and its universal form
            shutil.rmtree(tag_dir, ignore_errors=True)
            shutil.rmtree(self.dir / "universal" / tag, ignore_errors=True)
        _barrier()
        only = {"exclude_frozen_parameters": True} if trainable_only else {}
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False, **only)
        except Exception:
            if self.rank == 0:  # what was written of it (e.g. on a full disk) gives its space back
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise
        _barrier()
        names = [str(p.relative_to(tag_dir)) for p in sorted(tag_dir.rglob("*")) if p.is_file()]
        rank, world = _rank_world()
        if world > 1:  # rank 0's listing for everyone: a shared filesystem may show a new file late
            box = [names]
            dist.broadcast_object_list(box, src=0)
            names = box[0]
        mine = {n: {"size": (tag_dir / n).stat().st_size, "sha256": sha256_of(tag_dir / n)} for n in names[rank::world]}
        shares = [mine]
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, mine)
        if self.rank == 0:
            files = {n: e for share in shares for n, e in share.items()}
            meta = {"format": FORMAT, "step": step, "world_size": world_size, "zero_stage": zero_stage, **describe}
            atomic_write_json(tag_dir / MARKER, {**meta, "files": dict(sorted(files.items()))})
            atomic_write(self.dir / POINTER, tag.encode())
            self._prune(tag, protect=Path(protect).name if protect else tag)
        _barrier()
        return tag_dir

    def _prune(self, saved: str, protect: str) -> None:
        tags = sorted(p.name for p in self.tags())
        done = [t for t in tags if (self.dir / t / MARKER).is_file()]
        for t in done[: max(0, len(done) - self.keep_last)]:
            if t not in (saved, protect):
                shutil.rmtree(self.dir / t, ignore_errors=True)
                shutil.rmtree(self.dir / "universal" / t, ignore_errors=True)
        for t in tags:  # interrupted saves older than the one just completed
            if t < saved and t not in done:
                shutil.rmtree(self.dir / t, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from, verified (call on every rank): `none`; an explicit directory (a
        checkpoint, or a checkpoints directory whose `latest` names one); or `auto`: `latest` if intact, else
        the newest intact checkpoint, saying which were skipped and why. Raises CheckpointError when an
        explicit checkpoint is damaged, or when this run has checkpoints and none of them is intact."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            tag, _ = read_pointer(path)
            if tag is not None:
                path = path / tag
            problem = check_checkpoint(path)
            if problem:
                raise CheckpointError(f"cannot resume: {problem}; pick another checkpoint or resume=none")
            return path
        tag, why = read_pointer(self.dir)
        if why:
            self.say(why)
        candidates = ([self.dir / tag] if tag else []) + [p for p in self.tags() if p.name != tag]
        skipped = []
        for path in candidates:
            if tag and path.name == tag and not path.is_dir():
                self.say(f"{self.dir / POINTER} names {tag}, which does not exist; ignoring it")
                continue
            problem = check_checkpoint(path) or self._foreign(path)
            if problem is None:
                return path
            if (path / MARKER).is_file() or path.name == tag:  # `latest` moves only after COMPLETE.json is written
                skipped.append(f"{path.name}: {problem}")
                self.say(f"skipping checkpoint {path.name}: {problem}")
        if skipped:
            raise CheckpointError(
                f"{self.dir} has {len(skipped)} checkpoint(s) and none is intact ({'; '.join(skipped[:3])}); "
                "resume=PATH picks one explicitly, resume=none starts over (moving these aside)"
            )
        if candidates:
            names = ", ".join(p.name for p in candidates)
            self.say(f"{self.dir} holds only interrupted saves ({names}), no checkpoint: starting from step 0")
        return None

    def _foreign(self, tag_dir: Path) -> str | None:
        """Why an intact checkpoint is not this run's own (a run id other than this run's), or None."""
        theirs = Checkpoints.meta(tag_dir).get("run_id")
        if self.run_id and theirs and theirs != self.run_id:
            return f"{tag_dir} was written by another run ({theirs}; this run is {self.run_id}): linked or copied here"
        return None

    def set_aside(self) -> None:
        """Move an existing checkpoints directory to checkpoints.superseded-<UTC time> (rank 0, while the others
        wait): a run started over with resume=none keeps its old checkpoints, unmixed with the new ones."""

        def move() -> None:
            if self.tags() or (self.dir / POINTER).exists():
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                moved = self.dir.with_name(f"{self.dir.name}.superseded-{stamp}")
                os.replace(self.dir, moved)
                self.say(f"resume=none: moved the existing checkpoints to {moved}")

        on_rank0(move, (OSError,))

    def mark_nonfinite(self, tag_dir: Path, reason: str, good: Path | None) -> None:
        """Rank 0 marks a checkpoint whose weights led to non-finite losses (so `auto` never resumes it) and
        points `latest` at the last good checkpoint, or removes it when there is none."""
        if self.rank == 0:
            atomic_write_json(tag_dir / SUSPECT, {"reason": reason})
            if good is not None:
                atomic_write(self.dir / POINTER, good.name.encode())
            else:
                (self.dir / POINTER).unlink(missing_ok=True)
        _barrier()

    @staticmethod
    def meta(tag_dir: Path) -> dict:
        return json.loads((tag_dir / MARKER).read_text())

    @staticmethod
    def size(tag_dir: Path) -> int:
        """Bytes of a complete checkpoint's files, from its COMPLETE.json."""
        return sum(int(e["size"]) for e in Checkpoints.meta(tag_dir)["files"].values())

    @staticmethod
    def needs_universal(tag_dir: Path, world_size: int) -> bool:
        """Partitioned (ZeRO >= 1) optimizer state saved by another number of ranks must be converted."""
        meta = Checkpoints.meta(tag_dir)
        return meta["zero_stage"] > 0 and meta["world_size"] != world_size

    def universal(self, tag_dir: Path) -> Path:
        """DeepSpeed's universal form of a checkpoint (made once, by rank 0): loadable on any number of ranks.
        The engine must be created with {"checkpoint": {"load_universal": true}} to load it. A conversion is
        reused only if made from this very checkpoint (its COMPLETE.json's sha256), never from an older save
        of the same step or another run's checkpoint of the same name."""
        out = self.dir / "universal" / tag_dir.name
        source = sha256_of(tag_dir / MARKER)
        on_rank0(lambda: self._convert(tag_dir, out, source), (CheckpointError, OSError))
        return out

    @staticmethod
    def _convert(tag_dir: Path, out: Path, source: str) -> None:
        try:
            if json.loads((out / MARKER).read_text())["source_marker_sha256"] == source:
                return
        except (OSError, ValueError, KeyError):
            pass
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
        atomic_write_json(out / MARKER, {"from": str(tag_dir), "source_marker_sha256": source})

    def load(self, engine, tag_dir: Path, world_size: int, zero_stage: int, trainable_only: bool = False) -> dict:
        """Load engine state (module, optimizer) and return the client state. A checkpoint from another number
        of ranks is loaded through its universal form. `trainable_only`: the checkpoint holds only the trainable
        weights (LoRA), the others are already in the module."""
        meta = self.meta(tag_dir)
        if meta["zero_stage"] != zero_stage:
            raise CheckpointError(
                f"{tag_dir} was saved with ZeRO stage {meta['zero_stage']}, this run uses {zero_stage}; "
                f"resume with deepspeed.stage={meta['zero_stage']}"
            )
        universal = self.needs_universal(tag_dir, world_size)
        source = self.universal(tag_dir) if universal else tag_dir
        _, client = engine.load_checkpoint(
            str(source.parent), tag=source.name, load_lr_scheduler_states=False, load_module_strict=not trainable_only
        )
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}; it may be damaged, pick another checkpoint")
        if universal and zero_stage == 3:
            repair_zero3_universal_load(engine, source)
        return client


def check_resumable(meta: dict, model: dict, tokenizer_sha256: str, path: Path) -> None:
    """Refuse, before loading anything, a checkpoint (its COMPLETE.json `meta`) of another model (the run's
    `model` settings, as a dict) or tokenizer."""
    if meta["tokenizer_sha256"] != tokenizer_sha256:
        raise CheckpointError(
            f"{path} was trained with tokenizer sha256 {meta['tokenizer_sha256']}, this run uses {tokenizer_sha256}; "
            "resume with the same tokenizer and data, or resume=none"
        )
    saved = meta["model"]
    for key, value in model.items():
        if key not in RUNTIME_MODEL_FIELDS and saved.get(key) != value:
            raise CheckpointError(
                f"{path} has model.{key}={saved.get(key)}, this run has {value}; resume with the same model "
                "or resume=none"
            )
