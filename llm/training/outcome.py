"""How a training run ended, recorded by every rank, and the exit code that tells a job script what to do.

Launchers disagree about exit codes: `srun` and a plain process return the training's own code, but
`torchrun` and the `deepspeed` launcher turn any failure into 1. So each rank also writes its outcome to
<run_dir>/outcome/rank_NNNNN.json ("running" when training starts, the result when it ends), and
`python -m llm.outcome` reads them back (`summarize`) and exits with the outcome's code (`OUTCOMES`, the one
table of exit codes: the commands' help and docs/training.md show it), whatever started the run.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from llm.data.files import atomic_write
from llm.store.storage import StorageError, check_writable

# Every outcome: its exit code, what it means, and what a job script should do then.
OUTCOMES = (
    ("finished", 0, "reached train.max_steps", "stop"),
    ("paused", 0, "stopped after train.steps_per_run steps, checkpoint saved", "run again to continue"),
    ("crashed", 1, "an unexpected error (a traceback is in the log)", "stop, read the log"),
    ("bad_input", 2, "a bad setting, dataset or checkpoint (one line says which)", "stop, fix the input"),
    ("nonfinite", 3, "repeated non-finite losses; names the last good checkpoint", "stop, lower the LR"),
    ("interrupted", 4, "SIGUSR1/SIGTERM: checkpoint saved at the next step boundary", "requeue or rerun"),
    ("rank_failure", 5, "a rank died or hung (a collective failed or timed out)", "requeue or rerun"),
    ("storage", 6, "the run directory is full, read-only or cannot be written", "stop, free space"),
)
CODES = {name: code for name, code, _, _ in OUTCOMES}

RECORD_BYTES = 4096
# Which rank's outcome explains a launch: the first of these found among its ranks ("killed" is a rank that
# never recorded an end: SIGKILL, the OOM killer, a lost node).
PRIORITY = [
    "bad_input",
    "storage",
    "nonfinite",
    "crashed",
    "killed",
    "rank_failure",
    "interrupted",
    "paused",
    "finished",
]


def table() -> str:
    """OUTCOMES as a Markdown table (the commands' help and docs/training.md show this text)."""
    rows = ["| code | outcome | meaning | a job script should |", "|---|---|---|---|"]
    rows += [f"| {code} | {name} | {meaning} | {action} |" for name, code, meaning, action in OUTCOMES]
    return "\n".join(rows)


class Recorder:
    """Writes this rank's outcome file: `start` once the launch is known, `end` as the process finishes."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, started: float):
        self.path = Path(run_dir) / "outcome" / f"rank_{rank:05d}.json"
        self.record = {
            "rank": rank,
            "world_size": world_size,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": started,
            "launch": None,  # the same id on every rank of one launch; None if it ended before start-up
        }

    def _write(self, **fields) -> None:
        """The record, padded to RECORD_BYTES: written whole the first time, then over itself in place, so that the
        last record still fits on a disk that has filled up since. One that cannot be written at all (the run
        directory is not writable: the run's own error says so) is a warning, not a second error."""
        self.record.update(fields)
        text = json.dumps(self.record, indent=2) + "\n"
        data = text.encode().ljust(RECORD_BYTES) if len(text) < RECORD_BYTES else text.encode()
        try:
            if self.path.is_file() and self.path.stat().st_size >= len(data):
                with open(self.path, "r+b") as fh:
                    fh.write(data)
                    fh.truncate()
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.path, data)
        except OSError as e:
            print(f"warning: cannot record the outcome in {self.path}: {e.strerror or e}", file=sys.stderr)

    def start(self, launch: str) -> None:
        self._write(launch=launch, outcome="running", exit_code=None, message="")

    def end(self, outcome: str, message: str, step: int | None = None) -> int:
        self._write(outcome=outcome, exit_code=CODES[outcome], message=message, step=step, ended=time.time())
        return CODES[outcome]


def _alive(record: dict) -> bool:
    if record["host"] != socket.gethostname():
        return False
    try:
        os.kill(record["pid"], 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def summarize(run_dir: str | Path, since: float | None = None) -> tuple[int, str]:
    """(exit code, one line) for the newest launch of a run, from its ranks' outcome files."""
    folder = Path(run_dir) / "outcome"
    records = []
    for path in sorted(folder.glob("rank_*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except ValueError:
            continue  # whole records are written in one write of one page: only a foreign file is unreadable
    records = [r for r in records if since is None or r["started"] >= since]
    if not records:
        try:  # nothing could be recorded where the run directory cannot be written
            check_writable(Path(run_dir))
        except StorageError as e:
            return CODES["storage"], f"storage: {e}"
        when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        return CODES["crashed"], f"crashed: no outcome recorded in {folder}{when}: the launch failed before starting"
    newest = max(records, key=lambda r: r["started"])
    if newest["launch"] is None:  # ended during start-up (a bad setting): every rank fails alike
        return newest["exit_code"], f"{newest['outcome']}: {newest['message']}"
    launch = [r for r in records if r["launch"] == newest["launch"]]
    world = newest["world_size"]
    seen = {r["rank"]: r for r in launch}
    causes = []
    for rank in range(world):
        r = seen.get(rank)
        if r is None:
            causes.append(("killed", f"rank {rank} died during start-up without recording an outcome"))
        elif r["outcome"] == "running":
            state = "is still running" if _alive(r) else "died without recording an outcome (SIGKILL, OOM, lost node)"
            causes.append(("killed", f"rank {rank} ({r['host']}, pid {r['pid']}) {state}"))
        else:
            causes.append((r["outcome"], r["message"]))
    outcome, message = min(causes, key=lambda c: PRIORITY.index(c[0]))
    code = CODES["rank_failure"] if outcome == "killed" else CODES[outcome]
    return code, f"{'rank_failure' if outcome == 'killed' else outcome}: {message}"
