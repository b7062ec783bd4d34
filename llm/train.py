"""Pretraining: `python -m llm.train [hydra overrides]`, started plainly, by torchrun, by the deepspeed launcher,
or by srun. DeepSpeed is always the engine (gloo on CPU).

The loop, top to bottom: set the LR, run the micro-batches (forward, backward), step (skipped if any rank
saw a non-finite loss), log, evaluate, checkpoint (on schedule, or at the next step boundary after
SIGUSR1/SIGTERM, then exit). Run directory <runs_dir>/<name>: config.yaml, deepspeed.json, metrics.jsonl,
checkpoints/, outcome/, wandb/, run.json and tokenizer/ (llm/rundir.py: the run stands on its own). The
process exits with the code of its outcome (llm/outcome.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from llm import distributed as D
from llm.checkpoint import CheckpointError, Checkpoints, check_checkpoint, tag_for
from llm.compose import load_config, run_dir_of, run_dir_problem
from llm.config import RUNTIME_MODEL_FIELDS, Config, ConfigError, validate
from llm.data.corpus import CorpusError
from llm.data.examples import ExampleError
from llm.data.shards import ShardError
from llm.data.tokenizer import Tokenizer, TokenizerError
from llm.ds_patches import exclude_tied_frozen_parameters
from llm.faults import NonFiniteGuard, RankFailure, StopSignal, TrainingStopped, is_peer_failure, weights_finite
from llm.metrics import DevicePeak, MetricsLogger, new_run_id
from llm.model import GPT
from llm.optim import build_optimizer, lr_at
from llm.outcome import CODES, Recorder
from llm.preflight import PreflightError, preflight
from llm.rng import rng_state, seed_everything, set_rng_state
from llm.rundir import Origin, keep_tokenizer, resolve_paths
from llm.runlock import RunLock, RunLocked
from llm.slurm import LaunchError
from llm.storage import StorageError, check_writable, checkpoint_bytes, explain, storage_error
from llm.tasks import evaluate, make_task, to_device

BAD_INPUT = (
    ConfigError,
    CheckpointError,
    ShardError,
    TokenizerError,
    CorpusError,
    LaunchError,
    PreflightError,
    ExampleError,
)
__all__ = ["evaluate", "train", "main"]


def all_max(values: list, device) -> list[float]:
    """The maximum over ranks of each value (tensors on the device or Python numbers), with one copy to the host:
    the step's one synchronisation point."""
    # Python numbers are filled in on the device: copying one there would wait for all the queued work
    on_device = (v if isinstance(v, torch.Tensor) else torch.full((), float(v), device=device) for v in values)
    t = torch.stack([v.float().reshape(()) for v in on_device])
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def grad_norm_of(model: torch.nn.Module, clip: float = 0.0) -> torch.Tensor:
    """The norm of all gradients, as a tensor on the device; with `clip` > 0 the gradients are also scaled to
    at most that norm (torch's clip_grad_norm_: one fused pass)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params]))


def sample_text(model: GPT, tok: Tokenizer, n_tokens: int, seed: int, device, prompt: str = "def ") -> str:
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt)], device=device)
    out = model.generate(ids, n_tokens, generator=g)
    model.train()
    return tok.decode(out[0].tolist())


def check_resumable(meta: dict, cfg: Config, tok: Tokenizer, path: Path) -> None:
    """Refuse, before loading anything, a checkpoint of another model or tokenizer."""
    if meta["tokenizer_sha256"] != tok.sha256:
        raise CheckpointError(
            f"{path} was trained with tokenizer sha256 {meta['tokenizer_sha256']}, this run uses {tok.sha256}; "
            "resume with the same tokenizer and data, or resume=none"
        )
    saved = meta["model"]
    for key, value in dataclasses.asdict(cfg.model).items():
        if key not in RUNTIME_MODEL_FIELDS and saved.get(key) != value:
            raise CheckpointError(
                f"{path} has model.{key}={saved.get(key)}, this run has {value}; resume with the same model "
                "or resume=none"
            )


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
        return _train(cfg, env, device, where, stop)
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


def _train(cfg: Config, env: D.DistEnv, device, where: dict, stop: StopSignal) -> dict:
    t = cfg.train
    run_dir = run_dir_of(cfg)
    origin = [Origin.of(run_dir)]  # relative paths in the settings are relative to where the run first started
    dist.broadcast_object_list(origin, src=0)  # rank 0's: one identity for a new run
    origin = origin[0]
    resolve_paths(cfg, origin, run_dir)
    task = make_task(cfg, env, run_dir)

    D.on_rank0(task.prepare, (*BAD_INPUT, OSError))
    tok = task.setup()

    def record_on_rank0() -> None:  # once every input has been checked: bad input leaves no record
        run_dir.mkdir(parents=True, exist_ok=True)
        origin.save(run_dir)
        keep_tokenizer(run_dir, tok)  # the run carries its tokenizer
        task.commit()

    D.on_rank0(record_on_rank0, (*BAD_INPUT, OSError))
    if t.deterministic:
        # deterministic cuBLAS; PyTorch reads it at the process's first cuBLAS call, which in a fresh process
        # comes later (a process that ran CUDA matmuls before calling train() must set it itself)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    seed_everything(t.seed)  # the same initial weights on every rank
    model = task.build_model()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ckpt_dir = run_dir / "checkpoints"  # (not created yet on a first start: its run directory is checked then)
    space = lambda: check_writable(ckpt_dir if ckpt_dir.is_dir() else run_dir, checkpoint_bytes(trained))  # noqa: E731
    D.on_rank0(space, (StorageError,))
    optimizer = build_optimizer(model, cfg.optim)
    ds_config = D.deepspeed_config(cfg, env.world_size, sum(p.numel() for p in model.parameters()))
    if env.rank == 0:
        try:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        except OSError as e:
            raise storage_error(run_dir, e) or e from None
    ckpts = Checkpoints(run_dir / "checkpoints", t.keep_last, env.rank, run_id=origin.run_id)
    where["phase"] = "checkpoint verification"
    if cfg.resume == "none":
        ckpts.set_aside()
    t0 = time.perf_counter()
    resume_from = ckpts.resolve(cfg.resume)
    load_s = time.perf_counter() - t0  # checking the checkpoint, then (below) loading it
    if resume_from is not None:
        check_resumable(Checkpoints.meta(resume_from), cfg, tok, resume_from)
        if Checkpoints.needs_universal(resume_from, env.world_size):
            ds_config["checkpoint"] = {"load_universal": True}  # for loading only; saves stay ordinary
    import deepspeed

    where["phase"] = "engine start-up"
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if env.world_size == 1 and cfg.deepspeed.stage == 0:
        engine.enable_backward_allreduce = False  # one rank: averaging its gradients with nobody is a copy
    clip_here = D.loop_clips(cfg)
    if task.lora:
        exclude_tied_frozen_parameters(engine)
    seed_everything(t.seed + 1000 * env.rank)  # per-rank randomness (dropout) from here on

    seq = cfg.data.seq_len
    loader = task.loader()

    start, tokens_seen, skipped, run_id = 0, 0, 0, new_run_id()
    if resume_from is not None:
        where["phase"] = "checkpoint load"
        t0 = time.perf_counter()
        state = ckpts.load(engine, resume_from, env.world_size, cfg.deepspeed.stage, task.lora)["llm"]
        start, tokens_seen, skipped = state["step"], state["tokens_seen"], state["skipped_steps"]
        run_id = state["wandb_run_id"]
        loader.load_state_dict(state["data"])
        if len(state["rng"]) == env.world_size:
            set_rng_state(state["rng"][env.rank])
        load_s += time.perf_counter() - t0
    start_info = {"resumed_from": str(resume_from) if resume_from else None, "world_size": env.world_size}
    start_info["checkpoint_load_s"] = round(load_s, 3) if resume_from else None
    log = MetricsLogger(
        run_dir, cfg.logger, env.rank, run_id, cfg.name, dataclasses.asdict(cfg), t.max_steps, start, start_info
    )
    if resume_from is not None:
        log.print(f"resumed from {resume_from} at step {start} (checked and loaded in {load_s:.1f} s)")
    for note in task.notes:
        log.print(note)
    peak = DevicePeak(device, t.peak_tflops)
    flops_per_token = model.flops_per_token(seq)
    log.print(
        f"{model.num_params():,} parameters; {flops_per_token / 1e6:.1f} MFLOP/token; peak {peak.flops / 1e12:.2f} "
        f"TFLOP/s/device ({peak.source}); {env.world_size} rank(s) x {loader.grad_accum} micro-batch(es) of "
        f"{t.micro_batch} per step; run dir {run_dir}"
    )
    guard = NonFiniteGuard(t.max_bad_steps, resume_from)

    def save(step: int) -> Path:
        ranks_rng = [None] * env.world_size
        dist.all_gather_object(ranks_rng, rng_state())
        client = {
            "step": step,
            "tokens_seen": tokens_seen,
            "skipped_steps": skipped,
            "data": loader.state_dict(),
            "rng": ranks_rng,
            "config": dataclasses.asdict(cfg),
            "tokenizer_sha256": tok.sha256,
            "origin": dataclasses.asdict(origin),
            "wandb_run_id": run_id,
            "world_size": env.world_size,
            **task.client(),
        }
        # under one key: DeepSpeed drops client keys that share a name with its own (e.g. skipped_steps)
        describe = {"model": dataclasses.asdict(cfg.model), "tokenizer_sha256": tok.sha256, "run_id": origin.run_id}
        t0 = time.perf_counter()
        path = ckpts.save(
            engine, step, {"llm": client}, env.world_size, cfg.deepspeed.stage, describe, guard.proven, task.lora
        )
        seconds, size = time.perf_counter() - t0, Checkpoints.size(path)
        log.log(step, {"checkpoint/save_s": seconds, "checkpoint/bytes": size})
        guard.saved(path)
        return path

    def retreat(why: str) -> tuple[Path | None, Path | None]:
        """Stopping in a non-finite streak: mark this run's checkpoint that the streak followed (so no resume
        picks it) and point `latest` at the newest checkpoint before it. Returns (good, suspect)."""
        where["phase"] = "checkpoint verification"
        suspect = guard.unproven if guard.unproven is not None and guard.unproven.parent == ckpts.dir else None
        newest = suspect.name if suspect else tag_for(done + 1)
        good = next((p for p in ckpts.tags() if p.name < newest and check_checkpoint(p) is None), None)
        if suspect is not None:
            ckpts.mark_nonfinite(suspect, why, good)
        return good, suspect

    def nonfinite_stop(why: str) -> TrainingStopped:
        good, suspect = retreat(why)
        return TrainingStopped(
            f"{why}; the last good checkpoint is {good or 'none (none was saved before the losses went bad)'}"
            f"{f' ({suspect.name} came right before them and is marked non-finite)' if suspect else ''}; "
            "resume from it with a lower optim.lr, or check the data"
        )

    last_ckpt_time, stopped_by, interval_t0, interval_tokens = time.time(), None, time.time(), 0
    loss_sum, loss_n = torch.zeros((), device=device), torch.zeros((), device=device)
    val_loss, done = None, start
    last_step = min(t.max_steps, start + t.steps_per_run) if t.steps_per_run else t.max_steps
    try:
        for step in range(start, last_step):
            where.update(phase="a training step", step=step + 1)
            lr = lr_at(step, t.max_steps, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logs_now = (step + 1) % cfg.logger.log_every == 0 or step + 1 in (t.max_steps, last_step)
            nonfinite, grad_norm = torch.zeros((), device=device), None
            for micro in range(loader.grad_accum):
                loss = engine(**to_device(next(loader), device))  # under autocast in bf16 without ZeRO
                finite = torch.isfinite(loss.detach())
                nonfinite = torch.maximum(nonfinite, (~finite).float())
                loss_sum += torch.where(finite, loss.detach().float(), 0.0)
                loss_n += finite.float()
                engine.backward(loss)
                if micro == loader.grad_accum - 1:  # decide the step together, before the optimizer runs
                    due = t.ckpt_every_minutes > 0 and time.time() - last_ckpt_time >= 60 * t.ckpt_every_minutes
                    bad, stop_now, due = all_max([nonfinite, stop.received is not None, due], device)
                    optimizer.skip_next = bad > 0
                    if clip_here or (cfg.deepspeed.stage == 0 and logs_now):  # DeepSpeed reports none without ZeRO
                        grad_norm = grad_norm_of(engine.module, cfg.optim.grad_clip if clip_here else 0.0)
                engine.step()
            optimizer.skip_next = False
            done = step + 1
            tokens_seen += t.global_batch * seq
            interval_tokens += t.global_batch * seq
            log.advance()
            guard.after_step(bad > 0)
            if bad:
                skipped += 1
                log.print(f"step {done}: non-finite loss on some rank; step skipped ({guard.streak} in a row)")
                if guard.exhausted:
                    raise nonfinite_stop(f"{guard.streak} consecutive steps had a non-finite loss (up to step {done})")
            if logs_now:
                elapsed = time.time() - interval_t0
                tps = interval_tokens / elapsed
                sums = torch.stack([loss_sum, loss_n])
                dist.all_reduce(sums)
                metrics = {
                    "train/loss": (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan"),  # finite losses only
                    "train/lr": lr,
                    "train/tokens_seen": tokens_seen,
                    "train/skipped_steps": skipped,
                    "perf/tokens_per_s": tps,
                    "perf/step_time_s": elapsed * t.global_batch * seq / interval_tokens,
                    "perf/mfu": peak.mfu(flops_per_token * tps / env.world_size),
                }
                norm = engine.get_global_grad_norm() if cfg.deepspeed.stage > 0 else grad_norm
                if norm is not None:
                    metrics["train/grad_norm"] = float(norm)
                log.log(done, metrics)
                interval_t0, interval_tokens = time.time(), 0
                loss_sum, loss_n = torch.zeros((), device=device), torch.zeros((), device=device)
            if (t.eval_every and done % t.eval_every == 0) or done == t.max_steps:
                where["phase"] = "evaluation"
                val_metrics = task.evaluate(engine, device, final=done == t.max_steps)
                if val_metrics is not None:
                    val_loss = val_metrics["val/loss"]
                    log.log(done, val_metrics)
            end_of_run = done == last_step
            if not ((t.ckpt_every_steps and done % t.ckpt_every_steps == 0) or due or stop_now or end_of_run):
                continue
            where["phase"] = "checkpoint save"
            if guard.in_streak:  # the weights are those the streak started from: saving them again helps nobody
                if end_of_run:
                    raise nonfinite_stop(f"the run ended at step {done} in a streak of {guard.streak} non-finite steps")
                if stop_now:
                    good, _ = retreat(f"stopped by a signal at step {done} in a streak of non-finite losses")
                    saved = f"nothing saved in a non-finite streak; the last good checkpoint is {good or 'none'}"
                else:
                    log.print(f"step {done}: no checkpoint during a streak of non-finite losses")
            elif not weights_finite(engine):
                raise nonfinite_stop(f"the weights are not finite after step {done}")
            else:
                try:
                    saved = f"checkpoint saved to {save(done)}"
                except Exception as e:  # a full or read-only disk says so, in one line
                    raise explain(e, ckpts.dir) or e from None
                last_ckpt_time = time.time()
            if stop_now:
                stopped_by = stop.received or "a signal on another rank"
                log.print(f"stopped by {stopped_by} at step {done}; {saved}")
                break
        sample = None
        if env.rank == 0 and task.can_sample and t.sample_tokens and cfg.deepspeed.stage < 3 and done == t.max_steps:
            with D.forward_precision(cfg, device):  # the module itself, outside the engine
                sample = sample_text(engine.module, tok, t.sample_tokens, t.seed, device)
            log.print("sample:\n" + sample)
    finally:
        log.close()
    return {
        "outcome": "finished" if done == t.max_steps else "interrupted" if stopped_by else "paused",
        "step": done,
        "val_loss": val_loss,
        "tokens_seen": tokens_seen,
        "skipped_steps": skipped,
        "stopped_by": stopped_by,
        "run_dir": str(run_dir),
        "sample": sample,
        "peak_flops": peak.flops,
        "peak_source": peak.source,
        "params": model.num_params(),
        "flops_per_token": flops_per_token,
    }


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
