"""Worker process pools that end when told to, whatever handlers the process that starts them has installed.

A forked worker inherits its parent's signal handlers: a pool started by the training process (which catches
SIGUSR1/SIGTERM to checkpoint and stop, llm/training/faults.py: StopSignal) would have workers that record the SIGTERM
with which `Pool.terminate()` ends them instead of ending, and the pool's exit could wait on them forever.
So every worker resets each handler its parent installed in Python to the default disposition, with those
signals blocked from before the fork until the reset (a signal in between is delivered, by default, after it).
A pool that finished its work is closed and joined (its workers leave after their last task); only a pool left
by an exception is terminated.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.pool import Pool


def handled_signals() -> set[signal.Signals]:
    """The signals this process handles with a Python function (SIGTERM always: it is how workers are ended)."""
    caught = {s for s in signal.valid_signals() if callable(signal.getsignal(s))}
    return caught | {signal.SIGTERM}


def _start_worker(handled: set[signal.Signals], initializer: Callable | None, initargs: tuple) -> None:
    for s in handled:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
    if initializer is not None:
        initializer(*initargs)


@contextmanager
def worker_pool(processes: int, initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[Pool]:
    """A multiprocessing pool (forked on Linux) whose workers run with the default signal dispositions."""
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    handled = handled_signals()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # the pool's threads keep this mask
    try:
        pool = ctx.Pool(processes, initializer=_start_worker, initargs=(handled, initializer, initargs))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
