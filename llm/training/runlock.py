"""One process at a time in a run directory: <run_dir>/LOCK, created exclusively by rank 0 before it records or
writes anything, and removed when the run ends. A second launch on the same run (any launcher, any host that
shares the directory) refuses in one line naming the holder. A lock whose holder is gone is taken over:

- the same Slurm job (a requeued job: Slurm ended the earlier attempt before starting this one);
- the same host, and the holder's process is gone (its pid is not running, or runs another process: the
  process start time recorded in the lock differs);
- another host, and the holder has not renewed the lock for STALE_S seconds (a thread renews it every
  RENEW_S seconds while the run lives).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from llm.data.files import atomic_write

NAME = "LOCK"
RENEW_S = 30.0
STALE_S = 300.0


class RunLocked(RuntimeError):
    """The run directory is in use by another live process; the message names it."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _gone(holder: dict, now: float) -> str | None:
    """Why the holder of a lock is gone (and the lock may be taken over), or None while it may be alive."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job:
        return f"an earlier attempt of this Slurm job ({job})"
    if holder.get("host") == socket.gethostname():
        started = _start_time(holder["pid"])
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return f"pid {holder['pid']} is not running"
        except PermissionError:
            pass  # someone else's process: alive
        if started is not None and holder.get("pid_start") not in (None, started):
            return f"pid {holder['pid']} is now another process"
        return None
    if now - holder.get("renewed", 0) > STALE_S:
        return f"not renewed for {now - holder.get('renewed', 0):.0f} s (stale after {STALE_S:.0f} s)"
    return None


class RunLock:
    def __init__(self, run_dir: Path, launch: str):
        self.path, self.launch = Path(run_dir) / NAME, launch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.note: str | None = None  # a lock taken over, said by the caller

    def _record(self) -> dict:
        pid = os.getpid()
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _start_time(pid),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "launch": self.launch,
            "since": now,
            "renewed": now,
        }

    def acquire(self) -> None:
        """Create the lock, taking over one whose holder is gone; RunLocked when a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover raced by another taker: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self._record(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            self._thread = threading.Thread(target=self._renew, name="run-lock", daemon=True)
            self._thread.start()
            return
        raise RunLocked(f"{self.path}: another process keeps taking this run's lock; start it again")

    def _take_over_or_refuse(self) -> None:
        try:
            inode = self.path.stat().st_ino
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile
        except ValueError:
            holder = {"host": "?", "pid": -1}  # torn by a holder that died writing it
        why = _gone(holder, time.time()) if holder.get("pid", -1) > 0 else "its record is unreadable"
        if why is None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
            raise RunLocked(
                f"{self.path.parent} is in use by pid {holder['pid']} on {holder['host']}{job} since {since}: wait "
                f"for that run to end, or choose another name (if it is dead on another host, its lock goes stale "
                f"{STALE_S:.0f} s after its last renewal)"
            )
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_ino != inode:
                return  # another process took it over meanwhile: look again
            self.path.unlink()
        who = f"pid {holder.get('pid')} on {holder.get('host')}"
        self.note = f"took over the lock of {self.path.parent} from {who}: {why}"

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(self.path.read_text())
                if record.get("launch") == self.launch:
                    record["renewed"] = time.time()
                    atomic_write(self.path, json.dumps(record).encode())  # readers never see half of it

    def release(self) -> None:
        """Remove the lock if this launch still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("launch") == self.launch:
                self.path.unlink()
