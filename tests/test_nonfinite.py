"""Non-finite losses and weights (in-process, world size 1, every ZeRO stage): a bad step changes nothing, a
streak stops the run naming a checkpoint that resumes to finite losses, and no checkpoint holds bad weights."""

import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import deepspeed
import pytest
import torch
from helpers import records

import llm.training.trainer as train_mod
from llm.model.gpt import GPT
from llm.store.checkpoint import MARKER, POINTER, SUSPECT, CheckpointError, Checkpoints
from llm.train import train
from llm.training.faults import TrainingStopped
from llm.training.optim import SkippableAdamW


def poison_forward(monkeypatch, bad_calls: set[int]):
    """Make the training loss NaN on the given training forward calls (0-based; two per step here, so step s
    runs calls 2(s - 1) and 2(s - 1) + 1)."""
    original, calls = GPT.forward, [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not self.training:
            return out
        calls[0] += 1
        return out * float("nan") if calls[0] - 1 in bad_calls else out

    monkeypatch.setattr(GPT, "forward", forward)


def lr_from(monkeypatch, step: int, lr: float):
    """From optimizer step `step` (0-based) on, the learning rate is `lr`: a spike that ruins the weights."""
    original = train_mod.lr_at
    monkeypatch.setattr(train_mod, "lr_at", lambda s, *a: lr if s >= step else original(s, *a))


def run_dir(cfg) -> Path:
    return Path(cfg.runs_dir) / cfg.name


def test_a_non_finite_loss_skips_the_step(cfg_factory, monkeypatch):
    clean = train(cfg_factory("clean", train={"max_steps": 4}))
    poison_forward(monkeypatch, {4})  # step 3, first micro-batch
    out = train(cfg_factory("poisoned", train={"max_steps": 4}))
    assert out["skipped_steps"] == 1 and records(out["run_dir"], "train/skipped_steps")[3] == 1
    a, b = records(clean["run_dir"]), records(out["run_dir"])
    assert a[1] == b[1] and a[2] == b[2]
    assert math.isfinite(b[4])


def engine_state(engine) -> list[torch.Tensor]:
    """Copies of this rank's weights (under ZeRO-3 its partition), fp32 master weights, Adam moments and Adam's
    step counts (which set its bias correction: a skipped step must not advance them either)."""
    weights = [getattr(p, "ds_tensor", p.data).detach().clone() for p in engine.module.parameters()]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    masters = [k.detach().clone() for k in base.state]  # under ZeRO: the flat fp32 partitions
    moments = [torch.as_tensor(v).detach().clone() for s in base.state.values() for _, v in sorted(s.items())]
    assert any("step" in s for s in base.state.values()) or not base.state
    return weights + masters + moments


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_skipped_step_leaves_weights_and_moments_bitwise_unchanged(cfg_factory, monkeypatch, stage):
    engines, seen = [], {}
    original_init = deepspeed.initialize

    def initialize(*args, **kwargs):
        engines.append(original_init(*args, **kwargs)[0])
        return engines[-1], None, None, None

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    original_lr = train_mod.lr_at

    def lr_and_snapshot(step, *args):  # called at the top of every step
        seen[step] = engine_state(engines[0])
        return original_lr(step, *args)

    monkeypatch.setattr(train_mod, "lr_at", lr_and_snapshot)
    poison_forward(monkeypatch, {6})  # step index 3 (the 4th), first micro-batch
    out = train(cfg_factory(f"zero{stage}", deepspeed={"stage": stage}, train={"max_steps": 5}))
    assert out["skipped_steps"] == 1
    moments = len(seen[3]) - len(seen[0])
    assert moments > 0  # the moments exist by then, so the comparison covers them
    assert all(torch.equal(a, b) for a, b in zip(seen[3], seen[4], strict=True))  # the skipped step
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[3], strict=True))  # a normal step


def test_a_streak_stops_naming_the_checkpoint_before_it(cfg_factory, monkeypatch):
    poison_forward(monkeypatch, set(range(6, 100)))  # every forward from step 4 on
    cfg = cfg_factory(train={"max_steps": 20, "ckpt_every_steps": 2, "max_bad_steps": 3})
    with pytest.raises(
        TrainingStopped,
        match=r"3 consecutive steps had a non-finite loss \(up to step 6\); the last good checkpoint is "
        r".*step_00000002; resume from it",
    ):
        train(cfg)
    ckpt = run_dir(cfg) / "checkpoints"
    assert [p.name for p in sorted(ckpt.glob("step_*"))] == ["step_00000002"]  # nothing saved in the streak
    assert list(records(run_dir(cfg))) == [1, 2, 3, 4, 5]  # step 6 stopped the run before its record


def test_a_learning_rate_spike_stops_naming_a_checkpoint_that_resumes_finite(cfg_factory, monkeypatch):
    # step 4 runs with LR 1e30: its loss is finite, its update ruins the weights, every later loss is NaN
    lr_from(monkeypatch, 3, 1e30)
    cfg = cfg_factory(train={"max_steps": 20, "ckpt_every_steps": 2, "max_bad_steps": 3})
    with pytest.raises(TrainingStopped, match=r"the last good checkpoint is .*step_00000002 \(step_00000004 came"):
        train(cfg)
    ckpt = run_dir(cfg) / "checkpoints"
    assert (ckpt / "step_00000004" / SUSPECT).is_file()  # saved before the NaNs, then marked
    assert (ckpt / POINTER).read_text() == "step_00000002"
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="followed by non-finite losses"):
        train(replace(cfg, resume=str(ckpt / "step_00000004")))
    resumed = train(cfg)  # resume=auto, the usual LR again: continues from step 2, as the message said
    losses = records(resumed["run_dir"])
    assert resumed["step"] == 20 and all(math.isfinite(losses[s]) for s in range(3, 21))


def test_a_run_that_ends_during_a_streak_saves_nothing_and_stops(cfg_factory, monkeypatch):
    poison_forward(monkeypatch, {10, 11, 12, 13})  # steps 6 and 7 of 7
    cfg = cfg_factory(train={"max_steps": 7, "ckpt_every_steps": 4})
    with pytest.raises(TrainingStopped, match=r"the run ended at step 7 in a streak of 2 non-finite steps; the last"):
        train(cfg)
    ckpt = run_dir(cfg) / "checkpoints"
    assert (ckpt / POINTER).read_text() == "step_00000004" and not (ckpt / "step_00000007").exists()


def test_non_finite_weights_are_never_saved(cfg_factory, monkeypatch):
    original, calls = SkippableAdamW.step, [0]

    def step_that_overflows(self, closure=None):  # the 4th update leaves an infinite weight (a finite loss)
        out = original(self, closure)
        calls[0] += 1
        if calls[0] == 4:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(SkippableAdamW, "step", step_that_overflows)
    cfg = cfg_factory(train={"max_steps": 4, "ckpt_every_steps": 2})
    with pytest.raises(TrainingStopped, match=r"the weights are not finite after step 4; the last good checkpoint is"):
        train(cfg)
    ckpt = run_dir(cfg) / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002"]
    assert (ckpt / "step_00000002" / MARKER).is_file() and Checkpoints(ckpt).resolve("auto").name == "step_00000002"


def test_a_signal_during_a_streak_saves_nothing_and_resumes_from_before_it(cfg_factory, monkeypatch):
    clean = train(cfg_factory("clean", train={"max_steps": 8, "ckpt_every_steps": 2}))
    poison_forward(monkeypatch, set(range(8, 100)))  # every step from 5 on
    original = train_mod.lr_at

    def lr_and_signal(step, *args):
        if step == 5:  # the 6th step, the 2nd of the streak
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(step, *args)

    monkeypatch.setattr(train_mod, "lr_at", lr_and_signal)
    cfg = cfg_factory(train={"max_steps": 8, "ckpt_every_steps": 2})
    out = train(cfg)
    assert out["outcome"] == "interrupted" and out["step"] == 6
    ckpt = run_dir(cfg) / "checkpoints"
    assert (ckpt / "step_00000004" / SUSPECT).is_file() and (ckpt / POINTER).read_text() == "step_00000002"
    assert not (ckpt / "step_00000006").exists()
    monkeypatch.undo()
    resumed = train(cfg)  # the requeued job: from step 2, as if the streak had never been
    assert records(resumed["run_dir"]) == records(clean["run_dir"])
