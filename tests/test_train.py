"""The pretraining loop in-process (DeepSpeed on CPU, world size 1): learning, exact resume, checkpoints that
survive crashes, signals, the non-finite-loss guard, W&B and metrics.jsonl."""

import copy
import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from helpers import MatmulDtypes, records

import llm.training.trainer as train_mod
from llm.config.schema import OptimConfig
from llm.data.tokenizer import Tokenizer
from llm.model.gpt import GPT
from llm.store.checkpoint import MARKER, CheckpointError, Checkpoints
from llm.train import train
from llm.training.optim import SkippableAdamW, build_optimizer, lr_at


def test_loss_falls_and_the_run_directory_is_complete(cfg_factory):
    cfg = cfg_factory(train={"max_steps": 30, "eval_every": 10, "sample_tokens": 10}, logger={"log_every": 5})
    out = train(cfg)
    run = Path(out["run_dir"])
    val = records(run, "val/loss")
    assert list(val) == [10, 20, 30]
    assert val[30] < val[10] - 0.5 and val[30] < 0.8 * torch.log(torch.tensor(600.0)).item()
    assert out["step"] == 30 and out["tokens_seen"] == 30 * 8 * 32 and out["sample"]
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "deepspeed.json", "metrics.jsonl", "checkpoints"}
    assert json.loads((run / "deepspeed.json").read_text())["gradient_accumulation_steps"] == 2
    assert (run / "checkpoints" / "latest").read_text() == "step_00000030"
    start, *rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    assert start["event"] == "start" and start["step"] == 0 and start["resumed_from"] is None
    saves = [r for r in rows if "checkpoint/save_s" in r]
    assert [r["step"] for r in saves] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert all(r["checkpoint/save_s"] > 0 and r["checkpoint/bytes"] > 0 for r in saves)
    first = next(r for r in rows if "train/loss" in r)
    assert set(first) == {
        "step",
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_seen",
        "train/skipped_steps",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "perf/mfu",
    }
    assert first["step"] == 5 and first["perf/mfu"] > 0 and first["train/grad_norm"] > 0
    assert records(run, "val/ppl")[30] == pytest.approx(torch.exp(torch.tensor(val[30])).item(), rel=1e-5)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_is_exact(cfg_factory, stage):
    ds, model = {"stage": stage}, {"dropout": 0.1}  # dropout: the random generators' state must resume too
    whole = train(cfg_factory("whole", deepspeed=ds, model=model))
    first = train(cfg_factory("split", deepspeed=ds, model=model, train={"steps_per_run": 3}))
    assert first["step"] == 3 and first["stopped_by"] is None
    second = train(cfg_factory("split", deepspeed=ds, model=model))
    assert second["step"] == 8
    a, b = records(whole["run_dir"]), records(second["run_dir"])
    assert list(a) == list(b) == list(range(1, 9))
    assert a == b  # bitwise: same floats at every step
    assert records(whole["run_dir"], "val/loss") == records(second["run_dir"], "val/loss")
    assert records(whole["run_dir"], "train/lr") == records(second["run_dir"], "train/lr")


def test_the_loop_clips_like_deepspeed(cfg_factory):
    # ZeRO-0 in fp32 clips in the loop (torch's clip_grad_norm_), ZeRO-2 inside DeepSpeed's optimizer: with a clip
    # that acts at every step, the same pre-clip norms and losses; a clip of 1e-12 leaves AdamW almost no
    # gradient against its eps, so the loss stays where it started, which it would not were the clip ignored.
    def run(name, stage, clip):
        cfg = cfg_factory(name, deepspeed={"stage": stage}, optim={"grad_clip": clip}, train={"eval_every": 0})
        out = train(cfg)
        return out, records(out["run_dir"]), records(out["run_dir"], "train/grad_norm")

    out0, loss0, norm0 = run("z0", 0, 0.05)
    _, loss2, norm2 = run("z2", 2, 0.05)
    assert json.loads((Path(out0["run_dir"]) / "deepspeed.json").read_text())["gradient_clipping"] == 0.0
    assert min(norm0.values()) > 0.05  # the clip acted at every step
    # the same clipped updates, so bitwise the same losses; the norms are summed in another order (per tensor
    # then over tensors, against DeepSpeed's flattened buffers): measured 2.3e-7 apart relatively, 2 fp32 ulps
    assert loss0 == loss2 and norm0 == pytest.approx(norm2, rel=1e-6)
    _, frozen, _ = run("tiny-clip", 0, 1e-12)
    _, free, _ = run("no-clip", 0, 0.0)
    assert abs(frozen[8] - frozen[1]) < 0.01 < free[1] - free[8]


def test_zero3_counts_every_parameter_for_mfu(cfg_factory):
    # n_embd 160: the MLP's 102,400-value matrices are above ZeRO-3's persistence threshold (1e5), so DeepSpeed
    # partitions them and leaves empty tensors behind on the module
    cfg = cfg_factory("z3", deepspeed={"stage": 3}, model={"n_embd": 160}, train={"max_steps": 1, "eval_every": 0})
    out = train(cfg)
    model = GPT(replace(cfg.model, vocab_size=Tokenizer.load(cfg.data.tokenizer).vocab_size))
    assert out["params"] == model.num_params() > 400_000
    assert out["flops_per_token"] == model.flops_per_token(cfg.data.seq_len)


def test_one_rank_without_zero_skips_the_gradient_all_reduce(cfg_factory, monkeypatch):
    # averaging one rank's gradients is a copy of every gradient: skipped at ZeRO-0 (ZeRO-2 reduces in its own
    # optimizer, which needs the call)
    calls = []
    original = DeepSpeedEngine.allreduce_gradients
    monkeypatch.setattr(
        DeepSpeedEngine, "allreduce_gradients", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    train(cfg_factory("z0", train={"max_steps": 2, "eval_every": 0}))
    assert calls == []
    train(cfg_factory("z2", deepspeed={"stage": 2}, train={"max_steps": 2, "eval_every": 0}))
    assert len(calls) == 2 * 2  # every micro-batch's backward, 2 per step


def test_an_unfused_optimizer_state_loads_and_the_step_stays_fused():
    # a checkpoint written by an unfused AdamW (before the fused kernel, or by DeepSpeed's universal format)
    # brings its group options along: the next step restores the fused kernel and float32 step counts, and
    # continues exactly where the unfused optimizer would
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.zeros(4, 3))
    q.data.copy_(p.data)
    old = torch.optim.AdamW([q], lr=0.1, foreach=False)
    for _ in range(2):
        q.grad = torch.randn(4, 3)
        old.step()
    assert build_optimizer(torch.nn.Linear(3, 4), OptimConfig()).param_groups[0]["fused"] is True  # what runs use
    ours = SkippableAdamW([p], lr=0.1, fused=True)
    p.data.copy_(q.data)
    ours.load_state_dict(copy.deepcopy(old.state_dict()))  # else the two share moment tensors
    assert not ours.param_groups[0]["fused"]  # what loading did
    p.grad = torch.ones(4, 3)
    q.grad = torch.ones(4, 3)
    ours.step()
    old.step()
    assert ours.param_groups[0]["fused"] is True and ours.state[p]["step"].dtype == torch.float32
    assert torch.allclose(p, q, atol=1e-6)


def test_lr_schedules():
    from llm.config.schema import OptimConfig

    cos = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, 100, cos) == pytest.approx(0.1) and lr_at(9, 100, cos) == pytest.approx(1.0)
    assert lr_at(10, 100, cos) == pytest.approx(1.0) and lr_at(99, 100, cos) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, 100, cos) == pytest.approx(0.55)
    wsd = replace(cos, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, 100, wsd) == 1.0 and lr_at(79, 100, wsd) == 1.0
    assert lr_at(89, 100, wsd) == pytest.approx(0.55) and lr_at(99, 100, wsd) == pytest.approx(0.1)
    assert lr_at(70, 100, replace(cos, schedule="constant")) == 1.0


def test_skipped_optimizer_step_changes_nothing():
    model = torch.nn.Linear(4, 4)
    opt = SkippableAdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = [p.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    model(torch.randn(2, 4)).sum().backward()
    opt.skip_next = True
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(state[k], v) for k, v in opt.state[model.weight].items())
    opt.skip_next = False
    opt.step()
    assert not torch.equal(before[0], model.weight)


def test_a_signal_checkpoints_at_the_next_step_and_exits(cfg_factory, monkeypatch):
    original = train_mod.lr_at

    def lr_and_signal(step, *args):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(step, *args)

    monkeypatch.setattr(train_mod, "lr_at", lr_and_signal)
    cfg = cfg_factory(train={"ckpt_every_steps": 0})
    out = train(cfg)
    assert out["stopped_by"] == "SIGUSR1" and out["step"] == 3
    assert (Path(out["run_dir"]) / "checkpoints" / "latest").read_text() == "step_00000003"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(train_mod, "lr_at", original)
    assert train(cfg)["step"] == 8


def test_a_signal_during_a_save_does_not_interrupt_it(cfg_factory, monkeypatch):
    original = DeepSpeedEngine.save_checkpoint

    def save_with_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", save_with_signal)
    out = train(cfg_factory(train={"ckpt_every_steps": 2}))
    assert out["stopped_by"] == "SIGTERM" and out["step"] == 3  # saved 2 whole, trained 3, saved, exited
    ckpt = Path(out["run_dir"]) / "checkpoints"
    assert [p.name for p in sorted(ckpt.glob("step_*"))] == ["step_00000002", "step_00000003"]
    assert all((p / MARKER).is_file() for p in ckpt.glob("step_*"))


def test_a_crash_while_saving_keeps_the_previous_checkpoint(cfg_factory, monkeypatch):
    original, calls = DeepSpeedEngine.save_checkpoint, [0]

    def crashing_save(self, save_dir, tag, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            (Path(save_dir) / tag).mkdir(parents=True)
            (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
            raise RuntimeError("simulated crash mid-save")
        return original(self, save_dir, tag, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", crashing_save)
    cfg = cfg_factory(train={"ckpt_every_steps": 2, "max_steps": 6})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    ckpt = Path(cfg.runs_dir) / cfg.name / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert not (ckpt / "step_00000004" / MARKER).exists()
    assert Checkpoints(ckpt).resolve("auto").name == "step_00000002"
    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", original)
    out = train(cfg)
    assert out["step"] == 6 and (ckpt / "step_00000004" / MARKER).is_file()
    whole = train(cfg_factory("whole", train={"ckpt_every_steps": 2, "max_steps": 6}))
    assert records(out["run_dir"]) == records(whole["run_dir"])


def test_resuming_with_another_model_is_refused(cfg_factory):
    cfg = cfg_factory(train={"max_steps": 2})
    train(cfg)
    other = replace(cfg, model=replace(cfg.model, n_layer=3), train=replace(cfg.train, max_steps=4))
    with pytest.raises(CheckpointError, match="has model.n_layer=2, this run has 3"):
        train(other)


def test_wandb_offline_files_and_a_resumed_run_keeps_its_id(cfg_factory):
    cfg = cfg_factory(logger={"wandb": True}, train={"steps_per_run": 4})
    train(cfg)
    out = train(cfg)
    runs = sorted((Path(out["run_dir"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    files = [f.name for p in runs for f in p.glob("run-*.wandb")]
    assert len(files) == 2 and len(set(files)) == 1  # both invocations wrote to the same W&B run id
    steps = list(records(out["run_dir"]))
    assert steps == list(range(1, 9))  # metrics.jsonl continues without duplicates


def test_activation_checkpointing_gives_the_same_losses(cfg_factory):
    plain = train(cfg_factory("plain", train={"max_steps": 3}))
    ac = train(cfg_factory("ac", train={"max_steps": 3, "activation_checkpointing": True}))
    assert records(plain["run_dir"]) == records(ac["run_dir"])


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_under_zero_trains(cfg_factory, stage):
    out = train(
        cfg_factory(
            f"bf16-{stage}",
            deepspeed={"stage": stage, "precision": "bf16"},
            train={"max_steps": 4, "ckpt_every_minutes": 1e-6, "ckpt_every_steps": 0},
        )
    )
    losses = records(out["run_dir"])
    assert losses[4] < losses[1] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    ckpt = Path(out["run_dir"]) / "checkpoints"
    assert [p.name for p in sorted(ckpt.glob("step_*"))] == ["step_00000002", "step_00000003", "step_00000004"]


def test_bf16_without_zero_autocasts_over_fp32_weights(cfg_factory):
    # torch.autocast, entered by the DeepSpeed engine at each forward (entered around it, the engine would turn
    # it off on a GPU): every matrix product in bf16, forward and backward, training and evaluation (losses near
    # fp32's but not equal); weights and optimizer in fp32 (the checkpoint holds fp32 weights); no DeepSpeed
    # bf16 wrapper (test_syncs: no host reads of its own)
    steps = {"max_steps": 4, "ckpt_every_steps": 4, "peak_tflops": 1.0}  # the peak given: no fp32 measurement
    fp32 = train(cfg_factory("fp32", train=steps))
    with MatmulDtypes() as seen:
        bf16 = train(cfg_factory("bf16", deepspeed={"stage": 0, "precision": "bf16"}, train=steps))
    assert set(seen.dtypes) == {"torch.bfloat16"}, seen.dtypes
    # the attention too, forward and backward (CPU: torch's fused SDPA, which the model's reference path calls)
    assert {key.split(": ")[1] for key in seen.attention} == {"torch.bfloat16"}, seen.attention
    assert {key.split(": ")[0] for key in seen.attention} >= {
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    }, seen.attention
    a, b = records(fp32["run_dir"]), records(bf16["run_dir"])
    assert a.keys() == b.keys() and a != b and all(abs(a[k] - b[k]) < 0.05 for k in a), (a, b)
    states = torch.load(
        Path(bf16["run_dir"]) / "checkpoints/step_00000004/mp_rank_00_model_states.pt", weights_only=False
    )
    assert {v.dtype for v in states["module"].values()} == {torch.float32}


@pytest.mark.slow
def test_torch_compile_gives_the_same_losses(cfg_factory):
    plain = train(cfg_factory("plain", train={"max_steps": 2, "deterministic": False}))
    compiled = train(cfg_factory("compiled", train={"max_steps": 2, "compile": True, "deterministic": False}))
    a, b = records(plain["run_dir"]), records(compiled["run_dir"])
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


@pytest.mark.parametrize("stage", [0, 3])
def test_the_fused_loss_trains_as_the_plain_one(cfg_factory, stage):
    # the head's weight (tied to the embedding, wide enough to be partitioned) gathered by ZeRO-3 for the fused
    # loss as for the plain head; chunked sums differ from one big one in the last bits only
    model = {"n_embd": 160} if stage == 3 else {}
    runs = [
        train(cfg_factory(f"fused-{fused}", deepspeed={"stage": stage}, model={"fused_loss": fused, **model}))
        for fused in (True, False)
    ]
    a, b = (records(r["run_dir"]) for r in runs)
    assert a.keys() == b.keys() and len(a) == 8 and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    assert a[8] < a[1] - 0.5  # it learns
