"""Data commands' stages as Slurm array jobs, run by datatrove's executor (the `data` extra): the options, their
checks, the executor as our clusters need it, and what a rerun of the command needs to know (this run's jobs
still queued, a stage's finished tasks). Used by `python -m llm.data.clean --slurm` and
`python -m llm.data.prepare_data --slurm`; datatrove is imported only when a stage is built."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


class SlurmStageError(ValueError):
    """Slurm options that cannot work; the message names the option and the fix."""


@dataclass(frozen=True)
class SlurmOptions:
    """Where and how the stages run as Slurm array jobs (none of it changes the output)."""

    partition: str | None = None  # None: the cluster's default partition
    time: str = "4:00:00"  # each array task's limit
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2


# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or no limit
SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE")


def check_slurm(opts: SlurmOptions) -> None:
    """The options, and Slurm's commands on PATH, before any work."""
    for name in ("cpus_per_task", "mem_per_cpu_gb"):
        if getattr(opts, name) < 1:
            raise SlurmStageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(opts, name)})")
    if not SLURM_TIME.fullmatch(opts.time):
        raise SlurmStageError(f"--time {opts.time!r} is not a Slurm time limit; give e.g. 90, 4:00:00 or 1-12:00:00")
    missing = [c for c in ("sbatch", "squeue", "sinfo") if shutil.which(c) is None]
    if missing:
        raise SlurmStageError(f"--slurm: {', '.join(missing)} not found on PATH; run it where Slurm's commands are")


def job_prefix(kind: str, output: str | Path) -> str:
    """The prefix of a run's job names: one per command and output directory."""
    return f"{kind}-" + hashlib.sha256(str(Path(output).resolve()).encode()).hexdigest()[:8]


def queued(prefix: str) -> list[str]:
    """The ids of the jobs named `prefix*` still in the Slurm queue (pending or running)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1].startswith(prefix)]


def completed(logs: Path) -> int:
    """How many tasks of the stage logging to `logs` finished (datatrove marks each in completions/)."""
    return len(list((logs / "completions").iterdir())) if (logs / "completions").is_dir() else 0


def default_partition() -> str:
    """The cluster's default partition (sinfo marks it with *)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    marked = [p[:-1] for p in out if p.endswith("*")]
    return marked[0] if marked else out[0]


def slurm_executor(pipeline, tasks: int, workers: int, logs: Path, job_name: str, opts: SlurmOptions, depends=None):
    """datatrove's Slurm executor as this cluster needs it: no QOS forced (its default `normal` is rejected where
    no such QOS exists); the stages after a failed one cancelled by Slurm, not left pending forever
    (--kill-on-invalid-dep); the jobs run this Python's environment (its bin/ on PATH: datatrove's
    launch_pickled_pipeline and merge_stats are there)."""
    from datatrove.executor import SlurmPipelineExecutor

    return SlurmPipelineExecutor(
        pipeline,
        tasks=tasks,
        time=opts.time,
        partition=opts.partition or default_partition(),
        cpus_per_task=opts.cpus_per_task,
        mem_per_cpu_gb=opts.mem_per_cpu_gb,
        workers=workers,
        job_name=job_name,
        qos="",
        env_command=f"export PATH={Path(sys.executable).parent}:$PATH",
        sbatch_args={"kill-on-invalid-dep": "yes"},
        logging_dir=str(logs),
        slurm_logs_folder=str(logs / "slurm"),
        depends=depends,
    )
