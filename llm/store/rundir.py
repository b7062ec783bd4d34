"""A run directory that stands on its own: the directory the run was started in, and its own tokenizer.

Relative paths in a run's settings (data.paths, data.tokenizer, resume, finetune.init_from, finetune.train_file,
finetune.val_file) are relative to the working directory of the run's *first* start, recorded in
<run_dir>/run.json. Every start resolves them against that directory and the run keeps them absolute (in
config.yaml and in every checkpoint), so resuming, exporting, sampling, evaluating or fine-tuning works from
any working directory. When the tree has moved since (another machine mounts it elsewhere), a recorded path
that is gone is looked for at the same place relative to the run directory: data/ beside runs/ is found again.

<run_dir>/tokenizer/ holds a copy of the tokenizer the run trains with (tokenizer.model and its sidecar);
checkpoints record its sha256, and whatever loads a checkpoint checks the copy against it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from llm.config.schema import Config
from llm.data.files import atomic_write, atomic_write_json
from llm.data.tokenizer import MODEL_FILE, SIDECAR_FILE, Tokenizer, TokenizerError

RECORD = "run.json"
TOKENIZER_DIR = "tokenizer"
HF_PREFIX = "hf:"


class PathNotFound(FileNotFoundError):
    """A path in a run's settings that is nowhere it could be; the message lists where it was looked for."""


@dataclass(frozen=True)
class Origin:
    """Where a run was first started: its working directory and its run directory then (both absolute), and
    the run's identity (its checkpoints record it: one linked or copied from another run is not resumed)."""

    started_in: str
    run_dir: str
    run_id: str = ""  # empty in the records of runs started before it was kept

    @classmethod
    def of(cls, run_dir: Path) -> Origin:
        """The run's recorded origin, or (first start) this process's working directory and a new identity."""
        record = Path(run_dir) / RECORD
        if record.is_file():
            return cls(**json.loads(record.read_text()))
        return cls(os.getcwd(), str(Path(run_dir).absolute()), uuid.uuid4().hex[:16])

    def save(self, run_dir: Path) -> None:
        """Record the origin at the run's first start (rank 0); later starts keep the first record."""
        if not (Path(run_dir) / RECORD).is_file():
            atomic_write_json(Path(run_dir) / RECORD, dataclasses.asdict(self))

    def candidates(self, path: str, run_dir: Path | None) -> list[Path]:
        """Where `path` may be, in order: as recorded (relative: under started_in), then, if the run directory is
        no longer where it was and the path was in the tree that held it and started_in, at the same place
        relative to where the run directory is now."""
        first = Path(self.started_in, path)  # an absolute path stays itself
        out = [first]
        tree = Path(os.path.commonpath([self.started_in, self.run_dir]))
        if run_dir is not None and Path(run_dir).absolute() != Path(self.run_dir) and first.is_relative_to(tree):
            out.append(Path(os.path.normpath(Path(run_dir).absolute() / os.path.relpath(first, self.run_dir))))
        return out

    def resolve(self, path: str, run_dir: Path | None = None) -> str:
        """The absolute form of a path setting: the first candidate that exists, else the first (a path that does
        not exist yet, e.g. data the run is about to prepare). An "hf:" prefix is kept."""
        prefix = HF_PREFIX if path.startswith(HF_PREFIX) else ""
        options = self.candidates(path[len(prefix) :], run_dir)
        return prefix + str(next((p for p in options if p.exists()), options[0]))

    def locate(self, path: str, run_dir: Path | None, what: str) -> Path:
        """The existing file or directory a path setting names, or PathNotFound listing where it was looked for."""
        options = self.candidates(path, run_dir)
        found = next((p for p in options if p.exists()), None)
        if found is None:
            raise PathNotFound(f"{what} not found: looked for {' and '.join(map(str, options))}")
        return found


PATH_SETTINGS = ("data.tokenizer", "finetune.init_from", "finetune.train_file", "finetune.val_file")


def resolve_paths(cfg: Config, origin: Origin, run_dir: Path) -> None:
    """Make the run's path settings absolute against its origin (in place)."""
    cfg.data.paths = [origin.resolve(p, run_dir) for p in cfg.data.paths]
    cfg.train.eval_task_paths = [origin.resolve(p, run_dir) for p in cfg.train.eval_task_paths]
    for name in PATH_SETTINGS:
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, origin.resolve(value, run_dir))
    if cfg.resume not in ("auto", "none"):
        cfg.resume = origin.resolve(cfg.resume, run_dir)


def keep_tokenizer(run_dir: Path, tok: Tokenizer) -> None:
    """Copy the run's tokenizer into <run_dir>/tokenizer/ unless an intact copy of it is there (rank 0)."""
    out = Path(run_dir) / TOKENIZER_DIR
    if (out / SIDECAR_FILE).is_file():
        try:
            if Tokenizer.load(out).sha256 == tok.sha256:
                return
        except TokenizerError:
            pass  # a damaged or older copy: replaced below
    model = (Path(tok.directory) / MODEL_FILE).read_bytes()
    if hashlib.sha256(model).hexdigest() != tok.sha256:
        raise TokenizerError(f"{tok.directory / MODEL_FILE} changed while the run was starting; start it again")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MODEL_FILE, model)
    atomic_write_json(out / SIDECAR_FILE, tok.meta)


def run_tokenizer(run_dir: Path, sha256: str) -> Tokenizer | None:
    """The run directory's own tokenizer if it is the one with this sha256, else None."""
    try:
        tok = Tokenizer.load(Path(run_dir) / TOKENIZER_DIR)
    except TokenizerError:
        return None
    return tok if tok.sha256 == sha256 else None
