"""Storage failures as one line: a run directory that cannot be written (read-only, full, over quota, a path that
cannot exist, a name too long), found before the first step and at any write that fails. The outcome is
`storage` (exit 6), which the job script does not requeue: retrying does not free a disk."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

# what an errno means for a run directory, and what to do about it
REASONS = {
    errno.ENOSPC: ("no space left on its device", "free space there or set runs_dir elsewhere"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there or set runs_dir elsewhere"),
    errno.EROFS: ("its file system is read-only", "set runs_dir to a writable place"),
    errno.EACCES: ("permission denied", "set runs_dir to a place this user may write"),
    errno.EPERM: ("operation not permitted", "set runs_dir to a place this user may write"),
    errno.ENOTDIR: ("a part of the path is not a directory", "correct runs_dir"),
    errno.ENOENT: ("the path cannot be created", "correct runs_dir"),
    errno.ENAMETOOLONG: ("a name in the path is too long", "shorten runs_dir or name"),
    errno.EIO: ("an input/output error", "check the disk"),
}
PROBE_BYTES = 4096


class StorageError(RuntimeError):
    """The run directory cannot hold what the run writes; the message names the path, the problem and the fix."""


def storage_error(path: Path | str, e: OSError) -> StorageError | None:
    """The OSError as a StorageError naming `path`, or None when its errno is not about storage."""
    if e.errno not in REASONS:
        return None
    reason, fix = REASONS[e.errno]
    return StorageError(f"cannot write {path}: {reason}; {fix}")


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def check_writable(directory: Path, need: int = 0) -> None:
    """Create `directory`, write, sync and remove a small file there, and make sure `need` more bytes are free;
    raise StorageError otherwise."""
    directory = Path(directory)
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise (storage_error(directory, e) or StorageError(f"cannot write {directory}: {e}")) from None
    free = shutil.disk_usage(directory).free
    if free < need:
        raise StorageError(
            f"{directory} has {human(free)} free, and a checkpoint of this run needs about {human(need)}: free space "
            "there or set runs_dir elsewhere"
        )


def explain(e: BaseException, directory: Path) -> StorageError | None:
    """A failed write as a StorageError when storage is the cause: an OSError with a storage errno, or any error
    (torch's C++ writer says only "iostream error") while `directory` cannot take a small file. None otherwise."""
    if isinstance(e, StorageError):
        return e
    if isinstance(e, OSError) and (found := storage_error(directory, e)) is not None:
        return found
    try:
        check_writable(directory)
    except StorageError as found:
        return found
    return None


def checkpoint_bytes(trained_params: int) -> int:
    """About the size of one checkpoint: per trained parameter its fp32 weight and AdamW's two fp32 moments (DeepSpeed
    adds fp32 master weights in bf16/fp16 modes: 16 bytes), with a margin for the metadata."""
    return int(16 * trained_params * 1.05) + (1 << 20)
