"""How a training run ended, recorded by every rank, and the exit code that tells a job script what to do.

    python -m llm.outcome [--since EPOCH_SECONDS] [--run-dir DIR | the run's overrides ...]

Launchers disagree about exit codes: `srun` and a plain process return the training's own code, but
`torchrun` and the `deepspeed` launcher turn any failure into 1. So each rank also writes its outcome to
<run_dir>/outcome/rank_NNNNN.json ("running" when training starts, the result when it ends), and this command
reads them back and exits with the code below, whatever started the run. A job script runs it after the
launcher (`--since` the launch's start time, so an older launch's records are never mistaken for this one's).

| code | outcome       | meaning                                                     | a job script should   |
|------|---------------|-------------------------------------------------------------|-----------------------|
| 0    | finished      | reached train.max_steps                                     | stop                  |
| 0    | paused        | stopped after train.steps_per_run steps, checkpoint saved   | run again to continue |
| 1    | crashed       | an unexpected error (a traceback is in the log)             | stop, read the log    |
| 2    | bad_input     | a bad setting, dataset or checkpoint (one line says which)  | stop, fix the input   |
| 3    | nonfinite     | repeated non-finite losses; names the last good checkpoint  | stop, lower the LR    |
| 4    | interrupted   | SIGUSR1/SIGTERM: checkpoint saved at the next step          | requeue / rerun       |
| 5    | rank_failure  | a rank died or hung (collective failed or timed out)        | requeue / rerun       |
| 6    | storage       | the run directory is full, read-only or cannot be written   | stop, free space      |
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from llm.data.files import atomic_write
from llm.storage import StorageError, check_writable

CODES = {
    "finished": 0,
    "paused": 0,
    "crashed": 1,
    "bad_input": 2,
    "nonfinite": 3,
    "interrupted": 4,
    "rank_failure": 5,
    "storage": 6,
}
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llm.outcome", description="Print how a run ended and exit with its code (see the table)."
    )
    parser.add_argument("--since", type=float, help="ignore records of launches started before this Unix time")
    parser.add_argument("--run-dir", help="the run directory (default: from the overrides, as llm.train finds it)")
    parser.add_argument("overrides", nargs="*", help="the run's Hydra overrides (to find its run directory)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir
    if run_dir is None:  # the overrides fail here as they failed the training (neither leaves a record)
        from llm.compose import load_config, run_dir_of, run_dir_problem
        from llm.config import ConfigError

        try:
            cfg = load_config(args.overrides)
            problem = run_dir_problem(cfg)
        except ConfigError as e:
            problem = str(e)
        if problem:
            print(f"bad_input: {problem}")
            sys.exit(CODES["bad_input"])
        run_dir = run_dir_of(cfg)
    code, line = summarize(run_dir, args.since)
    print(line)
    sys.exit(code)


if __name__ == "__main__":
    main()
