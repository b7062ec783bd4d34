"""The training loop of `python -m llm.train` (and of fine-tuning, which is the same loop with another task), as
named steps: every step sets the learning rate, runs its micro-batches and the one decision all ranks take
together, accounts for it, logs, evaluates, then checkpoints or stops.

    trainer = Trainer(cfg, env, device, where, stop)   # inputs checked, model, engine, resumed state
    summary = trainer.run()

The run's progress (step, tokens, skipped steps, W&B id) is a RunState; what a checkpoint carries besides the
engine's state is a RunRecord (llm/store/record.py: the schema, also read by llm/store/weights.py), made by `record`
and read back by `resume`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from llm.config.compose import run_dir_of
from llm.config.schema import Config, ConfigError
from llm.data.corpus import CorpusError
from llm.data.examples import ExampleError
from llm.data.shards import ShardError
from llm.data.tokenizer import Tokenizer, TokenizerError
from llm.model.gpt import GPT
from llm.parallel import distributed as D
from llm.parallel.distributed import all_max
from llm.parallel.ds_patches import exclude_tied_frozen_parameters
from llm.parallel.slurm import LaunchError
from llm.store.checkpoint import CheckpointError, Checkpoints, check_checkpoint, check_resumable, tag_for
from llm.store.record import RunRecord, RunState
from llm.store.rundir import Origin, keep_tokenizer, resolve_paths
from llm.store.storage import StorageError, check_writable, checkpoint_bytes, explain, storage_error
from llm.training.downstream import DownstreamTasks
from llm.training.faults import NonFiniteGuard, StopSignal, TrainingStopped, weights_finite
from llm.training.metrics import DevicePeak, MetricsLogger
from llm.training.optim import build_optimizer, grad_norm_of, lr_at
from llm.training.preflight import PreflightError
from llm.training.rng import rng_state, seed_everything, set_rng_state
from llm.training.tasks import make_task, to_device

# what a run refuses, in one line, as bad input (exit 2)
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


def sample_text(model: GPT, tok: Tokenizer, n_tokens: int, seed: int, device, prompt: str = "def ") -> str:
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt)], device=device)
    out = model.generate(ids, n_tokens, generator=g)
    model.train()
    return tok.decode(out[0].tolist())


@dataclass
class Decision:
    """What every rank decided together at the end of a step's last backward (one copy to the host)."""

    bad: bool  # some rank saw a non-finite loss: the optimizer skipped the step
    stop: bool  # some rank received SIGUSR1/SIGTERM
    due: bool  # train.ckpt_every_minutes has passed on some rank
    lr: float
    logs: bool  # this step writes a log record
    grad_norm: torch.Tensor | None  # the loop's own norm (ZeRO-0), else None: DeepSpeed's is read when logging


class Interval:
    """The finite losses and the tokens since the last log record (kept on the device between records)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.t0, self.tokens = time.time(), 0
        self.loss_sum, self.loss_n = torch.zeros((), device=self.device), torch.zeros((), device=self.device)

    def add(self, loss: torch.Tensor) -> torch.Tensor:
        """Count a micro-batch's loss if it is finite; return 1.0 (on the device) if it is not."""
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.float(), 0.0)
        self.loss_n += finite.float()
        return (~finite).float()

    def mean_loss(self) -> float:
        """The mean finite loss over every rank's micro-batches (NaN if none was finite)."""
        sums = torch.stack([self.loss_sum, self.loss_n])
        dist.all_reduce(sums)
        return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


class Checkpointer:
    """The run's checkpoints with the constants every save and load repeats (world size, ZeRO stage, LoRA), and
    the save policy."""

    def __init__(self, cfg: Config, env: D.DistEnv, run_dir: Path, run_id: str, lora: bool):
        self.cfg, self.env, self.lora = cfg, env, lora
        self.ckpts = Checkpoints(run_dir / "checkpoints", cfg.train.keep_last, env.rank, run_id=run_id)
        self.last_save = time.time()

    def due(self, done: int, timed: bool, stop: bool, end_of_run: bool) -> bool:
        every = self.cfg.train.ckpt_every_steps
        return bool((every and done % every == 0) or timed or stop or end_of_run)

    def timed_out(self) -> bool:
        minutes = self.cfg.train.ckpt_every_minutes
        return minutes > 0 and time.time() - self.last_save >= 60 * minutes

    def save(self, engine, step: int, client: dict, describe: dict, protect: Path | None) -> Path:
        try:
            path = self.ckpts.save(
                engine, step, client, self.env.world_size, self.cfg.deepspeed.stage, describe, protect, self.lora
            )
        except Exception as e:  # a full or read-only disk says so, in one line
            raise explain(e, self.ckpts.dir) or e from None
        self.last_save = time.time()
        return path

    def load(self, engine, tag_dir: Path) -> RunRecord:
        client = self.ckpts.load(engine, tag_dir, self.env.world_size, self.cfg.deepspeed.stage, self.lora)
        return RunRecord.from_client_state(client, tag_dir)


class Trainer:
    """One launch of a run: built from its settings (inputs checked and recorded, model, engine, resumed
    state), then `run()`. `where` says what it is doing, for the message of a collective that fails."""

    def __init__(self, cfg: Config, env: D.DistEnv, device, where: dict, stop: StopSignal):
        self.cfg, self.env, self.device, self.where, self.stop = cfg, env, device, where, stop
        self.run_dir = run_dir_of(cfg)
        self.prepare_inputs()
        self.build_model()
        self.start_engine()
        self.resume()

    # ---- building ---------------------------------------------------------------------------------------------
    def prepare_inputs(self) -> None:
        """Resolve the paths against the run's origin, build (rank 0) and check the task's inputs, then record
        the run (only once every input has been checked: bad input leaves no record)."""
        origin = [Origin.of(self.run_dir)]  # relative paths in the settings are relative to the run's first start
        dist.broadcast_object_list(origin, src=0)  # rank 0's: one identity for a new run
        self.origin = origin[0]
        resolve_paths(self.cfg, self.origin, self.run_dir)
        self.task = make_task(self.cfg, self.env, self.run_dir)
        self.downstream = DownstreamTasks(self.cfg, self.run_dir) if self.cfg.train.eval_tasks else None
        if self.downstream is not None:  # before the data is built: checking tasks takes seconds
            D.on_every_rank(self.downstream.check, (ConfigError,))  # each rank reads the tasks' files itself
        bad_input = (*BAD_INPUT, OSError)
        D.on_rank0(self.task.prepare, bad_input)
        self.tok = self.task.setup()

        def record() -> None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.origin.save(self.run_dir)
            keep_tokenizer(self.run_dir, self.tok)  # the run carries its tokenizer
            self.task.commit()

        D.on_rank0(record, bad_input)

    def build_model(self) -> None:
        """The model with its first weights (the same on every rank), room for its checkpoints, its optimizer and
        the DeepSpeed JSON; config.yaml and deepspeed.json written."""
        cfg, t = self.cfg, self.cfg.train
        if t.deterministic:
            # deterministic cuBLAS; PyTorch reads it at the process's first cuBLAS call, which in a fresh process
            # comes later (a process that ran CUDA matmuls before calling train() must set it itself)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        seed_everything(t.seed)
        self.model = self.task.build_model()
        if cfg.parallel.sequence > 1:  # (refused for the classifier, which reads whole sequences)
            self.model.sequence_parallel(self.task.mesh.groups())
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        ckpt_dir = self.run_dir / "checkpoints"  # (not created yet on a first start: the run directory is checked)
        probe = ckpt_dir if ckpt_dir.is_dir() else self.run_dir
        D.on_rank0(lambda: check_writable(probe, checkpoint_bytes(trained)), (StorageError,))
        self.optimizer = build_optimizer(self.model, cfg.optim)
        params = sum(p.numel() for p in self.model.parameters())
        self.ds_config = D.deepspeed_config(cfg, self.env.world_size, params)
        if self.env.rank == 0:
            try:
                (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
                (self.run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
            except OSError as e:
                raise storage_error(self.run_dir, e) or e from None

    def start_engine(self) -> None:
        """Choose the checkpoint to resume from (checked before anything is loaded), then start DeepSpeed."""
        cfg, env = self.cfg, self.env
        self.checkpointer = Checkpointer(cfg, env, self.run_dir, self.origin.run_id, self.task.lora)
        ckpts = self.checkpointer.ckpts
        self.where["phase"] = "checkpoint verification"
        if cfg.resume == "none":
            ckpts.set_aside()
        t0 = time.perf_counter()
        self.resume_from = ckpts.resolve(cfg.resume)
        if self.resume_from is not None:
            meta, model = Checkpoints.meta(self.resume_from), dataclasses.asdict(cfg.model)
            check_resumable(meta, model, self.tok.sha256, self.resume_from)
            if Checkpoints.needs_universal(self.resume_from, env.world_size):
                self.ds_config["checkpoint"] = {"load_universal": True}  # for loading only; saves stay ordinary
        self.load_s = time.perf_counter() - t0  # checking the checkpoint, then (in resume) loading it
        import deepspeed

        self.where["phase"] = "engine start-up"
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=self.ds_config)
        if env.world_size == 1 and cfg.deepspeed.stage == 0:
            self.engine.enable_backward_allreduce = False  # one rank: averaging its gradients with nobody is a copy
        if self.task.lora:
            exclude_tied_frozen_parameters(self.engine)
        seed_everything(cfg.train.seed + 1000 * env.rank)  # per-rank randomness (dropout) from here on

    def resume(self) -> None:
        """The run's state, data cursor and generators from the checkpoint chosen (or a new run's), then the
        logger and the guard against non-finite losses."""
        cfg, t, env = self.cfg, self.cfg.train, self.env
        self.loader = self.task.loader()
        self.state = RunState()
        if self.resume_from is not None:
            self.where["phase"] = "checkpoint load"
            t0 = time.perf_counter()
            record = self.checkpointer.load(self.engine, self.resume_from)
            self.state = record.state
            self.loader.load_state_dict(record.data)
            if len(record.rng) == env.world_size:
                set_rng_state(record.rng[env.rank])
            self.load_s += time.perf_counter() - t0
        start = self.state.step
        info = {"resumed_from": str(self.resume_from) if self.resume_from else None, "world_size": env.world_size}
        info["checkpoint_load_s"] = round(self.load_s, 3) if self.resume_from else None
        self.log = MetricsLogger(
            self.run_dir, cfg.logger, env.rank, self.state.wandb_run_id, cfg.name, dataclasses.asdict(cfg),
            t.max_steps, start, info,
        )  # fmt: skip
        if self.resume_from is not None:
            took = f"checked and loaded in {self.load_s:.1f} s"
            self.log.print(f"resumed from {self.resume_from} at step {start} ({took})")
        for note in self.task.notes:
            self.log.print(note)
        self.peak = DevicePeak(self.device, t.peak_tflops)
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        self.log.print(
            f"{self.model.num_params():,} parameters; {self.flops_per_token / 1e6:.1f} MFLOP/token; peak "
            f"{self.peak.flops / 1e12:.2f} TFLOP/s/device ({self.peak.source}); {env.world_size} rank(s)"
            f"{f' (sequence parallel {cfg.parallel.sequence})' if cfg.parallel.sequence > 1 else ''} x "
            f"{self.loader.grad_accum} micro-batch(es) of {t.micro_batch} per step; run dir {self.run_dir}"
        )
        self.guard = NonFiniteGuard(t.max_bad_steps, self.resume_from)
        self.interval = Interval(self.device)
        self.clip_here = D.loop_clips(cfg)
        self.last_step = min(t.max_steps, start + t.steps_per_run) if t.steps_per_run else t.max_steps
        self.stopped_by, self.val_loss, self.sample = None, None, None

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train from the state's step to the last step of this launch; return the summary."""
        self.interval.reset()
        self.started = time.time()
        self.checkpointer.last_save = self.started  # train.ckpt_every_minutes counts from the first step
        try:
            for step in range(self.state.step, self.last_step):
                self.where.update(phase="a training step", step=step + 1)
                lr = self.set_lr(step)
                decision = self.train_step(step, lr)
                self.account(decision)
                if decision.logs:
                    self.log_interval(decision)
                self.maybe_evaluate()
                if self.checkpoint_or_stop(decision):
                    break
            self.final_sample()
            self.report_downstream()
        finally:
            self.log.close()
        return self.summary()

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg.train.max_steps, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, step: int, lr: float) -> Decision:
        """Forward and backward over this rank's micro-batches; before the last backward's optimizer step, the
        one decision every rank takes together (skip a non-finite step, stop on a signal, a timed checkpoint);
        then the optimizer step (skipped if the decision says so)."""
        cfg, engine = self.cfg, self.engine
        logs = (step + 1) % cfg.logger.log_every == 0 or step + 1 in (cfg.train.max_steps, self.last_step)
        nonfinite, grad_norm, accum = torch.zeros((), device=self.device), None, self.loader.grad_accum
        for micro in range(accum):
            loss = engine(**to_device(next(self.loader), self.device))  # under autocast in bf16 without ZeRO
            nonfinite = torch.maximum(nonfinite, self.interval.add(loss.detach()))
            engine.backward(loss)
            if micro == accum - 1:  # decide the step together, before the optimizer runs
                signalled, timed = self.stop.received is not None, self.checkpointer.timed_out()
                bad, stop, due = all_max([nonfinite, signalled, timed], self.device)
                self.optimizer.skip_next = bad > 0
                if self.clip_here or (cfg.deepspeed.stage == 0 and logs):  # DeepSpeed reports none without ZeRO
                    grad_norm = grad_norm_of(engine.module, cfg.optim.grad_clip if self.clip_here else 0.0)
            engine.step()
        self.optimizer.skip_next = False
        return Decision(bad > 0, stop > 0, due > 0, lr, logs, grad_norm)

    def account(self, decision: Decision) -> None:
        """The step is done: its tokens, and the guard against non-finite losses (which may end the run)."""
        state, tokens = self.state, self.cfg.train.global_batch * self.cfg.data.seq_len
        state.step += 1
        state.tokens_seen += tokens
        self.interval.tokens += tokens
        self.log.advance()
        self.guard.after_step(decision.bad)
        if decision.bad:
            state.skipped_steps += 1
            streak = self.guard.streak
            self.log.print(f"step {state.step}: non-finite loss on some rank; step skipped ({streak} in a row)")
            if self.guard.exhausted:
                raise self.nonfinite_stop(
                    f"{self.guard.streak} consecutive steps had a non-finite loss (up to step {state.step})"
                )

    def log_interval(self, decision: Decision) -> None:
        """One record of the steps since the last: the mean finite loss, LR, tokens, throughput, MFU, norm."""
        cfg, state, interval = self.cfg, self.state, self.interval
        elapsed = time.time() - interval.t0
        tps = interval.tokens / elapsed
        metrics = {
            "train/loss": interval.mean_loss(),  # finite losses only
            "train/lr": decision.lr,
            "train/tokens_seen": state.tokens_seen,
            "train/skipped_steps": state.skipped_steps,
            "perf/tokens_per_s": tps,
            "perf/step_time_s": elapsed * cfg.train.global_batch * cfg.data.seq_len / interval.tokens,
            "perf/mfu": self.peak.mfu(self.flops_per_token * tps / self.env.world_size),
        }
        norm = self.engine.get_global_grad_norm() if cfg.deepspeed.stage > 0 else decision.grad_norm
        if norm is not None:
            metrics["train/grad_norm"] = float(norm)
        self.log.log(state.step, metrics)
        interval.reset()

    def maybe_evaluate(self) -> None:
        t, done = self.cfg.train, self.state.step
        if (t.eval_every and done % t.eval_every == 0) or done == t.max_steps:
            t0 = time.time()
            self.evaluate(done)
            self.interval.t0 += time.time() - t0  # the next record's throughput counts training alone

    def evaluate(self, done: int) -> None:
        """The task's own evaluation (val loss, a classifier's metrics) and the downstream tasks: one record."""
        self.where["phase"] = "evaluation"
        metrics = self.task.evaluate(self.engine, self.device, final=done == self.cfg.train.max_steps) or {}
        self.val_loss = metrics.get("val/loss", self.val_loss)
        if self.downstream is not None:
            self.where["phase"] = "downstream tasks"
            precision = D.forward_precision(self.cfg, self.device)
            scores = self.downstream.score(
                self.engine, self.tok, self.device, precision, done, self.state.tokens_seen, self.env.rank
            )
            shown = " ".join(f"{k[len('eval/') :]}={v:.4g}" for k, v in scores.items() if k != "eval/tasks_s")
            self.log.print(f"step {done}: {shown} ({scores['eval/tasks_s']:.1f} s)")
            metrics.update(scores)
        if metrics:
            self.log.log(done, metrics)

    def report_downstream(self) -> None:
        """The tasks' share of this launch's time, and (rank 0) the plot of scores and val loss over steps."""
        ds = self.downstream
        if ds is None or not ds.evaluations:
            return
        share = ds.seconds / max(time.time() - self.started, 1e-9)
        self.log.print(
            f"downstream tasks: {ds.evaluations} evaluation(s), {ds.seconds:.1f} s, {share:.1%} of this launch"
        )
        if self.env.rank == 0:
            from llm.training.scores_plot import plot_scores

            try:
                self.log.print(f"scores over steps: {plot_scores(self.run_dir)}")
            except Exception as e:  # a report: the run itself has ended well
                self.log.print(f"warning: the plot of scores over steps failed: {e}")

    def checkpoint_or_stop(self, decision: Decision) -> bool:
        """Save a checkpoint when one is due (never in a streak of non-finite losses, never non-finite weights);
        True when a signal stops the run here."""
        done, guard = self.state.step, self.guard
        end_of_run = done == self.last_step
        if not self.checkpointer.due(done, decision.due, decision.stop, end_of_run):
            return False
        self.where["phase"] = "checkpoint save"
        saved = None
        if guard.in_streak:  # the weights are those the streak started from: saving them again helps nobody
            if end_of_run:
                why = f"the run ended at step {done} in a streak of {guard.streak} non-finite steps"
                raise self.nonfinite_stop(why)
            if decision.stop:
                good, _ = self.retreat(f"stopped by a signal at step {done} in a streak of non-finite losses")
                saved = f"nothing saved in a non-finite streak; the last good checkpoint is {good or 'none'}"
            else:
                self.log.print(f"step {done}: no checkpoint during a streak of non-finite losses")
        elif not weights_finite(self.engine):
            raise self.nonfinite_stop(f"the weights are not finite after step {done}")
        else:
            saved = f"checkpoint saved to {self.save()}"
        if decision.stop:
            self.stopped_by = self.stop.received or "a signal on another rank"
            self.log.print(f"stopped by {self.stopped_by} at step {done}; {saved}")
        return decision.stop

    def final_sample(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self.env.rank == 0 and self.task.can_sample and t.sample_tokens and cfg.deepspeed.stage < 3:
            if self.state.step == t.max_steps:
                with D.forward_precision(cfg, self.device):  # the module itself, outside the engine
                    self.sample = sample_text(self.engine.module, self.tok, t.sample_tokens, t.seed, self.device)
                self.log.print("sample:\n" + self.sample)

    def summary(self) -> dict:
        t, state = self.cfg.train, self.state
        return {
            "outcome": "finished" if state.step == t.max_steps else "interrupted" if self.stopped_by else "paused",
            "step": state.step,
            "val_loss": self.val_loss,
            "tokens_seen": state.tokens_seen,
            "skipped_steps": state.skipped_steps,
            "stopped_by": self.stopped_by,
            "run_dir": str(self.run_dir),
            "sample": self.sample,
            "peak_flops": self.peak.flops,
            "peak_source": self.peak.source,
            "params": self.model.num_params(),
            "flops_per_token": self.flops_per_token,
            "eval_tasks_s": self.downstream.seconds if self.downstream else None,
        }

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def record(self) -> RunRecord:
        """What a checkpoint carries besides the engine's state (every rank's generators gathered: collective)."""
        ranks_rng = [None] * self.env.world_size
        dist.all_gather_object(ranks_rng, rng_state())
        return RunRecord(
            state=self.state,
            data=self.loader.state_dict(),
            rng=ranks_rng,
            config=dataclasses.asdict(self.cfg),
            tokenizer_sha256=self.tok.sha256,
            origin=dataclasses.asdict(self.origin),
            world_size=self.env.world_size,
            task=self.task.client(),
        )

    def save(self) -> Path:
        step = self.state.step
        client = self.record().client_state()
        describe = {
            "model": dataclasses.asdict(self.cfg.model),
            "tokenizer_sha256": self.tok.sha256,
            "run_id": self.origin.run_id,
        }
        t0 = time.perf_counter()
        path = self.checkpointer.save(self.engine, step, client, describe, self.guard.proven)
        self.log.log(step, {"checkpoint/save_s": time.perf_counter() - t0, "checkpoint/bytes": Checkpoints.size(path)})
        self.guard.saved(path)
        return path

    def retreat(self, why: str) -> tuple[Path | None, Path | None]:
        """Stopping in a non-finite streak: mark this run's checkpoint that the streak followed (so no resume
        picks it) and point `latest` at the newest checkpoint before it. Returns (good, suspect)."""
        self.where["phase"] = "checkpoint verification"
        ckpts, guard = self.checkpointer.ckpts, self.guard
        suspect = guard.unproven if guard.unproven is not None and guard.unproven.parent == ckpts.dir else None
        newest = suspect.name if suspect else tag_for(self.state.step + 1)
        good = next((p for p in ckpts.tags() if p.name < newest and check_checkpoint(p) is None), None)
        if suspect is not None:
            ckpts.mark_nonfinite(suspect, why, good)
        return good, suspect

    def nonfinite_stop(self, why: str) -> TrainingStopped:
        good, suspect = self.retreat(why)
        return TrainingStopped(
            f"{why}; the last good checkpoint is {good or 'none (none was saved before the losses went bad)'}"
            f"{f' ({suspect.name} came right before them and is marked non-finite)' if suspect else ''}; "
            "resume from it with a lower optim.lr, or check the data"
        )
