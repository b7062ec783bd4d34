"""A launch of the training loop: the process group, the run's lock, the pre-flight, then the Trainer
(llm/training/trainer.py); and the exit code of how it ended (llm/training/outcome.py). Started plainly, by
torchrun, by the deepspeed launcher or by srun; DeepSpeed is always the engine (gloo on CPU). `python -m llm.train`
and `python -m llm.finetune` are this module's `run` with their own usage text.

Run directory <runs_dir>/<name>: config.yaml, deepspeed.json, metrics.jsonl, checkpoints/, outcome/, wandb/,
run.json and tokenizer/ (llm/store/rundir.py: the run stands on its own).
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from llm.config.compose import load_config, run_dir_of, run_dir_problem
from llm.config.schema import Config, ConfigError, validate
from llm.parallel import distributed as D
from llm.parallel.slurm import LaunchError
from llm.store.storage import StorageError, check_writable
from llm.training.faults import RankFailure, StopSignal, TrainingStopped, is_peer_failure
from llm.training.outcome import CODES, Recorder
from llm.training.preflight import preflight
from llm.training.runlock import RunLock, RunLocked
from llm.training.trainer import BAD_INPUT, Trainer

__all__ = ["train", "run"]


def train(cfg: Config, recorder: Recorder | None = None, stop: StopSignal | None = None) -> dict:
    """Run (or resume) pretraining as configured; return a summary of the run. `stop` (default: one installed
    for this call) catches SIGUSR1/SIGTERM: the run saves and stops at the next step boundary after one. A
    collective that fails because another rank died or hangs raises RankFailure naming this rank, the step
    and what it was doing."""
    env = D.detect()
    validate(cfg, env.world_size, torch.cuda.is_available())
    check_writable(run_dir_of(cfg))  # every rank, before anything is written there
    own_stop, stop = stop is None, stop or StopSignal()
    where, lock = {"phase": "start-up", "step": 0}, None
    try:
        device = D.init(env, cfg.train.collective_timeout_s, run_dir_of(cfg) / "rendezvous")
        launch = [uuid.uuid4().hex[:12]]
        dist.broadcast_object_list(launch, src=0)  # one id on every rank: which outcome records belong together
        lock = RunLock(run_dir_of(cfg), launch[0])
        D.on_rank0(lock.acquire, (RunLocked, OSError))  # before anything of this launch is written there
        if lock.note:
            print(lock.note, file=sys.stderr)
        if recorder is not None:
            recorder.start(launch[0])
        where["phase"] = "pre-flight"
        preflight(env.rank, env.world_size, device, run_dir_of(cfg), launch[0])
        where["phase"] = "data preparation"
        return Trainer(cfg, env, device, where, stop).run()
    except RuntimeError as e:
        if isinstance(e, (TrainingStopped, StorageError, RunLocked, *BAD_INPUT)) or not is_peer_failure(e):
            raise
        reason = re.sub(r"^\[[^\]]*\] ", "", str(e).strip().splitlines()[0])[:200]
        who = f"rank {env.rank} of {env.world_size}"
        if where["phase"] == "start-up":
            raise RankFailure(
                f"{who}: the process group did not start ({reason}); check MASTER_ADDR:MASTER_PORT "
                f"({os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) and that every rank was started"
            ) from e
        raise RankFailure(
            f"{who}: a collective failed during {where['phase']} at step {where['step']} ({reason}); another "
            f"rank died or hangs (train.collective_timeout_s={cfg.train.collective_timeout_s:g}); the last "
            "checkpoint is intact, resume to continue"
        ) from e
    finally:
        if lock is not None and env.rank == 0:
            lock.release()
        if own_stop:
            stop.restore()


def _config(args: list[str], usage: str) -> Config | None:
    """The config of the command line; None when there is nothing to train (help, --cfg). Bad input exits 2."""
    for arg in [a for a in args if a.startswith("--local_rank")]:  # the deepspeed launcher passes --local_rank=N
        os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1] if "=" in arg else "0")
        args.remove(arg)
    if "-h" in args or "--help" in args:
        print(usage)
        return None
    show = "--cfg" in args
    try:
        cfg = load_config([a for a in args if a != "--cfg"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if show:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return None
    return cfg


def _ended(recorder: Recorder, summary: dict) -> int:
    """Record how a run that returned ended (finished, paused, interrupted); its exit code."""
    step, how = summary["step"], summary["outcome"]
    messages = {
        "finished": f"reached step {step}",
        "paused": f"stopped after train.steps_per_run at step {step}; run again to continue",
        "interrupted": f"stopped by {summary['stopped_by']} at step {step}; resume to continue",
    }
    return recorder.end(how, messages[how], step)


def run(argv: list[str] | None, usage: str) -> None:
    """The entry point of `python -m llm.train` and `python -m llm.finetune`: train, record the outcome on this
    rank, exit with its code."""
    started = time.time()
    cfg = _config(list(sys.argv[1:] if argv is None else argv), usage)
    if cfg is None:
        return
    try:
        env = D.detect()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    recorder = Recorder(run_dir_of(cfg), env.rank, env.world_size, started)
    # Signals are caught from here to the exit: a launcher that SIGTERMs the survivors of a failed rank must not
    # kill one before it has recorded its outcome (a signal during start-up stops the run at its first step).
    stop = StopSignal()
    try:
        summary = train(cfg, recorder, stop)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2 if run_dir_problem(cfg) else recorder.end("bad_input", str(e))
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = recorder.end("nonfinite", str(e))
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        code = recorder.end("storage", str(e))
    except RunLocked as e:  # the outcome records are the running launch's: this one leaves them alone
        print(f"error: {e}", file=sys.stderr)
        code = CODES["bad_input"]
    except RankFailure as e:
        print(f"error: {e}", file=sys.stderr)
        code = recorder.end("rank_failure", str(e))
    except BaseException as e:  # a bug: record it, then let the traceback show
        recorder.end("crashed", f"rank {env.rank}: {type(e).__name__}: {str(e).strip()[:300]}")
        raise
    else:
        code = _ended(recorder, summary)
    finally:  # the outcome is recorded: the caller's handlers again (run() called in-process leaves none behind)
        stop.restore()
    sys.exit(code)
