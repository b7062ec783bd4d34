"""What a checkpoint carries besides the engine's weights and optimizer state: the run's own record. Written by
the training loop at each save (`Trainer.save`), read back by its resume and by `load_weights` (llm/store/weights.py)
through this one class, so the checkpoint's schema is written down once."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from llm.store.checkpoint import CheckpointError

# One key of DeepSpeed's client state: DeepSpeed drops client keys that share a name with its own (skipped_steps)
CLIENT_KEY = "llm"


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


@dataclass
class RunState:
    """The run's progress (what a resume continues from besides the data cursor and the generators)."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    wandb_run_id: str = field(default_factory=new_run_id)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


@dataclass
class RunRecord:
    """A checkpoint's record of its run, stored flat under CLIENT_KEY (as every checkpoint so far has it)."""

    state: RunState
    data: dict  # the loader's cursor
    rng: list  # every rank's generator states, by rank
    config: dict  # the run's settings (dataclasses.asdict of its Config)
    tokenizer_sha256: str | None
    origin: dict | None  # llm/store/rundir.py: Origin (None in checkpoints written before runs recorded it)
    world_size: int | None
    task: dict = field(default_factory=dict)  # the task's own entries: init_checkpoint (fine-tuning), labels

    def client_state(self) -> dict:
        """The client state to hand DeepSpeed's save_checkpoint."""
        entries = {k: getattr(self, k) for k in _OWN}
        return {CLIENT_KEY: {**self.state.state_dict(), **entries, **self.task}}

    @classmethod
    def from_client_state(cls, states: dict, where: str | Path) -> RunRecord:
        """The record in a checkpoint's model states (or in what DeepSpeed's load_checkpoint returned)."""
        entries = states.get(CLIENT_KEY)
        if not entries or "config" not in entries:
            raise CheckpointError(f"{where} was not written by llm.train (no run settings in it)")
        progress = [f.name for f in dataclasses.fields(RunState)]
        state = RunState(**{k: entries[k] for k in progress if k in entries})
        task = {k: v for k, v in entries.items() if k not in (*progress, *_OWN)}
        return cls(state=state, **{k: entries.get(k) for k in _OWN}, task=task)


_OWN = [f.name for f in dataclasses.fields(RunRecord) if f.name not in ("state", "task")]
