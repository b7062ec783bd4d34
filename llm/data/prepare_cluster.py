"""Shard preparation spread over a Slurm cluster: `python -m llm.data.prepare_data ... --slurm --tasks N`.

Two stages, run as Slurm jobs by datatrove's executor (the `data` extra):

- encode (N array tasks): task r reads and tokenizes the r-th contiguous run of the work items a local
  preparation plans, on --cpus-per-task processes, and writes their results to OUT.prepare/encoded/;
- shards (one task, after every encode task): the local preparation's own main loop (exact de-duplication,
  the val split, the shards, their checkpoints, the manifest) taking those results in item order instead of
  computing them, so the output is byte-identical to `prepare_data` without --slurm; an interrupted shards
  task resumes from its last checkpoint. The encoded files are removed once the manifest is written.

The encode stage is the work (reading and tokenizing); the shards stage only reads, hashes and writes. Rerunning
the command follows the run: still running, done (the manifest), or the tasks that did not finish resubmitted
(a failed encode task cancels the shards stage instead of leaving it pending forever).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from llm.data.corpus import CorpusStats
from llm.data.files import atomic_write, atomic_write_json
from llm.data.prepare import HASH_BYTES, Encoded, PrepareConfig, encode_items, plan, prepare
from llm.data.shards import DTYPES, MANIFEST, ShardError
from llm.data.slurm_stages import SlurmOptions, check_slurm, completed, job_prefix, queued, slurm_executor

STAT_FIELDS = [f.name for f in dataclasses.fields(CorpusStats)]


def work_dir(output: str | Path) -> Path:
    """Where a cluster preparation of `output` keeps its encoded items, logs and plan: beside it, not inside."""
    output = Path(output)
    return output.parent / f"{output.name}.prepare"


def task_items(rank: int, tasks: int, n_items: int) -> range:
    """The work items of encode task `rank`: a contiguous run, so that the tasks' results in rank order are the
    items in corpus order."""
    return range(rank * n_items // tasks, (rank + 1) * n_items // tasks)


def encode_task(cfg: PrepareConfig, rank: int, tasks: int) -> None:
    """Encode task `rank`'s items into encoded/<rank>.tokens (the tokens, in order) and encoded/<rank>.npz (the
    documents' digests and lengths, each item's document count and read counts, the run's fingerprint); the
    .npz is written last, atomically: it marks the task's results complete."""
    _tok, dtype, opts, corpus, fingerprint = plan(cfg)
    items = [corpus.items[i] for i in task_items(rank, tasks, len(corpus.items))]
    folder = work_dir(cfg.output) / "encoded"
    folder.mkdir(parents=True, exist_ok=True)
    hashes, lengths, docs, stats = [], [], [], []
    with open(folder / f"{rank:05d}.tokens", "wb") as fh:
        for digests, flat, item_lengths, item_stats in encode_items(cfg, items, opts, dtype):
            fh.write(flat.astype(flat.dtype.newbyteorder("<"), copy=False).tobytes())
            hashes.append(digests)
            lengths.append(item_lengths)
            docs.append(len(item_lengths))
            stats.append([getattr(item_stats, f) for f in STAT_FIELDS])
        fh.flush()
        os.fsync(fh.fileno())
    buf = io.BytesIO()
    np.savez(
        buf,
        hashes=np.frombuffer(b"".join(hashes), dtype=np.uint8),
        lengths=np.concatenate(lengths) if lengths else np.empty(0, np.int64),
        docs=np.asarray(docs, dtype=np.int64),
        stats=np.asarray(stats, dtype=np.int64).reshape(len(items), len(STAT_FIELDS)),
        fingerprint=np.asarray(json.dumps(fingerprint, sort_keys=True)),
    )
    atomic_write(folder / f"{rank:05d}.npz", buf.getvalue())


def stored(cfg: PrepareConfig, tasks: int, n_items: int, fingerprint: dict, dtype: str) -> Encoded:
    """The encode tasks' results, item by item from a given one, as `prepare` takes them (ShardError when a
    task's results are missing or from another run)."""
    folder = work_dir(cfg.output) / "encoded"
    little = np.dtype(DTYPES[dtype]).newbyteorder("<")

    def results(start: int):
        for rank in range(tasks):
            span = task_items(rank, tasks, n_items)
            if span.stop <= start:
                continue
            index = _index(folder, rank, len(span), fingerprint)
            tokens = np.fromfile(folder / f"{rank:05d}.tokens", dtype=little)  # whole: one task's share
            doc_at = np.concatenate([[0], np.cumsum(index["docs"])])
            token_at = np.concatenate([[0], np.cumsum(index["lengths"])])
            hashes = index["hashes"].tobytes()
            for k in range(max(start, span.start) - span.start, len(span)):
                d0, d1 = doc_at[k], doc_at[k + 1]
                stats = CorpusStats(**dict(zip(STAT_FIELDS, map(int, index["stats"][k]), strict=True)))
                flat = tokens[token_at[d0] : token_at[d1]].astype(DTYPES[dtype])
                yield hashes[d0 * HASH_BYTES : d1 * HASH_BYTES], flat, index["lengths"][d0:d1], stats

    return results


def _index(folder: Path, rank: int, n_items: int, fingerprint: dict) -> dict:
    path = folder / f"{rank:05d}.npz"
    if not path.is_file():
        raise ShardError(f"encode task {rank}'s results are missing ({path}); rerun the same command")
    with np.load(path) as z:
        index = {k: z[k] for k in z.files}
    if json.loads(str(index["fingerprint"])) != json.loads(json.dumps(fingerprint)) or len(index["docs"]) != n_items:
        raise ShardError(f"{path} was written by another preparation; delete {folder.parent} and rerun")
    return index


def write_shards(cfg: PrepareConfig, tasks: int, command: list[str] | None = None) -> dict:
    """The shards stage: the local preparation's main loop over the stored results; then the encoded files go."""
    _tok, dtype, _opts, corpus, fingerprint = plan(cfg)
    manifest = prepare(
        cfg, progress=False, command=command, encoded=stored(cfg, tasks, len(corpus.items), fingerprint, dtype)
    )
    shutil.rmtree(work_dir(cfg.output) / "encoded", ignore_errors=True)
    return manifest


class EncodeStep(PipelineStep):
    """The encode stage's task (datatrove runs it as array task `rank` of `world_size`)."""

    name = "llm encode"
    type = "🔢 - TOKENIZER"

    def __init__(self, cfg: PrepareConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        where = os.environ.get("SLURMD_NODENAME", "this machine")
        print(f"encode task {rank} of {world_size} on {where}", file=sys.stderr, flush=True)
        encode_task(self.cfg, rank, world_size)
        yield from ()


class ShardsStep(PipelineStep):
    """The shards stage's one task."""

    name = "llm shards"
    type = "💽 - WRITER"

    def __init__(self, cfg: PrepareConfig, tasks: int, command: list[str] | None):
        super().__init__()
        self.cfg, self.tasks, self.command = cfg, tasks, command

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        write_shards(self.cfg, self.tasks, self.command)
        yield from ()


def _pin(cfg: PrepareConfig, tasks: int, fingerprint: dict) -> None:
    """Record the run's fingerprint and task count at its first start; refuse a rerun with others while its
    encoded results stand (they were cut by that task count, from those inputs)."""
    path = work_dir(cfg.output) / "plan.json"
    pinned = {"fingerprint": fingerprint, "tasks": tasks}
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, pinned)
        return
    before = json.loads(path.read_text())
    if before["tasks"] != tasks:
        raise ShardError(
            f"this preparation started with --tasks {before['tasks']}; rerun with it, or delete {path.parent} "
            "to start over"
        )
    if before["fingerprint"] != json.loads(json.dumps(fingerprint)):
        raise ShardError(
            f"the inputs or options differ from those this preparation started with ({path}); rerun with those, "
            f"or delete {cfg.output} and {path.parent} to start over"
        )


def prepare_on_slurm(
    cfg: PrepareConfig, tasks: int, slurm: SlurmOptions, command: list[str] | None = None
) -> tuple[str, dict | list[str]]:
    """One step of a preparation on Slurm: ("done", manifest) once the manifest is written; ("running", job ids)
    while this run's jobs are queued; else ("submitted", job ids) for the tasks not finished yet."""
    if tasks < 1:
        raise ShardError(f"--tasks must be at least 1 (got {tasks})")
    check_slurm(slurm)
    _tok, _dtype, _opts, corpus, fingerprint = plan(cfg)
    if (Path(cfg.output) / MANIFEST).is_file():
        return "done", prepare(cfg, progress=False, verbose=False)  # refuses a dataset of other inputs
    _pin(cfg, tasks, fingerprint)
    prefix = job_prefix("prepare", cfg.output)
    if jobs := queued(prefix):
        return "running", jobs
    logs = work_dir(cfg.output) / "logs"
    if completed(logs / "shards"):
        raise ShardError(f"the shards stage finished but {cfg.output} has no {MANIFEST}; delete it and rerun")
    task_cfg = dataclasses.replace(cfg, workers=slurm.cpus_per_task)
    encode = slurm_executor([EncodeStep(task_cfg)], tasks, -1, logs / "encode", f"{prefix}-encode", slurm)
    shards = slurm_executor(
        [ShardsStep(task_cfg, tasks, command)], 1, 1, logs / "shards", f"{prefix}-shards", slurm, encode
    )
    shards.run()
    return "submitted", queued(prefix)
