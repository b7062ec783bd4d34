"""What can stop a run, and how the loop tells: a stop signal, non-finite losses (and which checkpoint is
still good), non-finite weights at a save, and a collective that fails because another rank died or hangs."""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the message says what to do."""


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank died or hangs. The message names this rank and where."""


class NonFiniteGuard:
    """Counts consecutive steps with a non-finite loss and knows which checkpoint is good.

    A checkpoint saved after step j holds the weights that step j + 1 runs on, so it is *proven* once a later
    step has a finite loss, and *suspect* while only non-finite steps followed it. The loop never saves
    during a streak (skipped steps leave the weights as they were, so such a checkpoint would repeat the
    suspect one); a stop names the newest checkpoint before the suspect one."""

    def __init__(self, max_bad: int, resumed: Path | None):
        self.max_bad, self.streak = max_bad, 0
        self.unproven: Path | None = resumed  # the newest checkpoint, until a finite step follows it
        self.proven: Path | None = None  # the newest checkpoint followed by a finite step (never pruned)

    def saved(self, path: Path) -> None:
        self.unproven = path

    def after_step(self, bad: bool) -> None:
        if bad:
            self.streak += 1
            return
        self.streak = 0
        if self.unproven is not None:
            self.proven, self.unproven = self.unproven, None

    @property
    def in_streak(self) -> bool:
        return self.streak > 0

    @property
    def exhausted(self) -> bool:
        return self.streak >= self.max_bad


def weights_finite(engine) -> bool:
    """True on every rank when every rank's parameters are finite (under ZeRO-3, each rank's partition)."""
    ok = torch.ones((), device=next(engine.module.parameters()).device)
    for p in engine.module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        if t.numel() and not torch.isfinite(t).all():
            ok.zero_()
            break
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# What gloo says when a peer died or a collective ran out of time (NCCL's watchdog raises DistBackendError).
_PEER_SIGNS = ("Timed out waiting", "Connection reset by peer", "Connection closed by peer", "Broken pipe")


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception is a failed collective: another rank died or hangs, or the network broke."""
    dist_error = getattr(dist, "DistError", ())
    return isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_SIGNS))


class StopSignal:
    """Remembers SIGUSR1/SIGTERM; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.received: str | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGUSR1, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
