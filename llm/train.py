"""Pretraining: `python -m llm.train [hydra overrides]`, started plainly, by torchrun, by the deepspeed launcher,
or by srun. DeepSpeed is always the engine (gloo on CPU).

This file starts a launch (the process group, the run's lock, the pre-flight) and turns its outcome into the
exit code; the loop itself is llm/trainer.py: set the LR, run the micro-batches (forward, backward), step
(skipped if any rank saw a non-finite loss), log, evaluate, checkpoint (on schedule, or at the next step
boundary after SIGUSR1/SIGTERM, then exit). Run directory <runs_dir>/<name>: config.yaml, deepspeed.json, metrics.jsonl,
checkpoints/, outcome/, wandb/, run.json and tokenizer/ (llm/rundir.py: the run stands on its own). The
process exits with the code of its outcome (llm/outcome.py).
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

from llm import distributed as D
from llm.compose import load_config, run_dir_of, run_dir_problem
from llm.config import Config, ConfigError, validate
from llm.faults import RankFailure, StopSignal, TrainingStopped, is_peer_failure
from llm.outcome import CODES, Recorder
from llm.preflight import preflight
from llm.runlock import RunLock, RunLocked
from llm.slurm import LaunchError
from llm.storage import StorageError, check_writable
from llm.tasks import evaluate
from llm.trainer import BAD_INPUT, Trainer

__all__ = ["evaluate", "train", "main"]


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


USAGE = """usage: python -m llm.train [--cfg] [key=value | group=option ...]

Groups: model (tiny gpt2-124m gpt2-350m gpt2-774m llama-1b llama-7b), data, optim (adamw wsd),
deepspeed (zero0 zero1 zero2 zero3 zero3-offload), logger (wandb-offline wandb-online none),
experiment (demo gpt2-124m gpt2-350m gpt2-774m llama-1b llama-7b), task (pretrain sft classify: see
python -m llm.finetune --help), lora (none r8 r16-mlp). --cfg prints the resolved config.
Exit codes (also in <run_dir>/outcome/, read by `python -m llm.outcome`): 0 finished or paused, 1 crashed,
2 bad input, 3 non-finite losses, 4 interrupted by a signal (checkpoint saved), 5 a rank died or hung,
6 storage (the run directory is full, read-only or cannot be written)."""


def main(argv: list[str] | None = None, usage: str = USAGE) -> None:
    """The entry point of `python -m llm.train` and, with its own usage text, of `python -m llm.finetune`."""
    started = time.time()
    args = list(sys.argv[1:] if argv is None else argv)
    for arg in [a for a in args if a.startswith("--local_rank")]:  # the deepspeed launcher passes --local_rank=N
        os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1] if "=" in arg else "0")
        args.remove(arg)
    if "-h" in args or "--help" in args:
        print(usage)
        return
    show = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if show:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
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
        step, how = summary["step"], summary["outcome"]
        messages = {
            "finished": f"reached step {step}",
            "paused": f"stopped after train.steps_per_run at step {step}; run again to continue",
            "interrupted": f"stopped by {summary['stopped_by']} at step {step}; resume to continue",
        }
        code = recorder.end(how, messages[how], step)
    finally:  # the outcome is recorded: the caller's handlers again (main() called in-process leaves none behind)
        stop.restore()
    sys.exit(code)


if __name__ == "__main__":
    main()
