"""`python -m llm.train` as users start it: plainly, under torchrun with 2 ranks, and through bad overrides.

Runs use OMP_NUM_THREADS=1 so that 1-rank and 2-rank runs sum in the same order and compare bitwise.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(tmp_path, prepared_dir, tokenizer_dir, name, *extra):
    return [
        f"data.paths=[{prepared_dir}]",
        f"data.tokenizer={tokenizer_dir}",
        "data.prepare_if_missing=false",
        "data.seq_len=32",
        "model.n_layer=2",
        "model.n_embd=32",
        "model.max_seq_len=64",
        "train.micro_batch=4",
        "train.global_batch=8",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.eval_batches=2",
        "train.ckpt_every_steps=3",
        "train.sample_tokens=0",
        "train.deterministic=true",
        "logger.wandb=false",
        "logger.log_every=1",
        f"runs_dir={tmp_path / 'runs'}",
        f"name={name}",
        *extra,
    ]


def launch(args, nproc=1, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "llm.train", *args]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "llm.train",
            *args,
        ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(tmp_path, name, key="train/loss"):
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


@pytest.fixture
def args(tmp_path, prepared_dir, tokenizer_dir):
    return lambda name, *extra: overrides(tmp_path, prepared_dir, tokenizer_dir, name, *extra)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_rank_with_accumulation(tmp_path, args, stage):
    # 1 rank x 2 micro-batches == 2 ranks x 1 micro-batch, bitwise (no clipping: the ZeRO norm is partitioned)
    launch(args("one", f"deepspeed=zero{stage}", "optim.grad_clip=0"))
    launch(args("two", f"deepspeed=zero{stage}", "optim.grad_clip=0"), nproc=2)
    assert losses(tmp_path, "one") == losses(tmp_path, "two")
    assert losses(tmp_path, "one", "val/loss") == losses(tmp_path, "two", "val/loss")


@pytest.mark.parametrize("stage", [0, 2])  # ZeRO-3 continues close but not bitwise: see llm/train.py
def test_resume_on_another_world_size_continues_exactly(tmp_path, args, stage):
    common = (f"deepspeed=zero{stage}", "optim.grad_clip=0")
    launch(args("whole", *common))
    launch(args("moved", *common, "train.steps_per_run=3"), nproc=2)
    r = launch(args("moved", *common))  # resumed by one rank
    assert "resumed from" in r.stderr
    universal = tmp_path / "runs" / "moved" / "checkpoints" / "universal" / "step_00000003"
    assert universal.is_dir() == (stage > 0)  # partitioned optimizer state went through the universal format
    assert losses(tmp_path, "whole") == losses(tmp_path, "moved")
    assert losses(tmp_path, "whole", "val/loss") == losses(tmp_path, "moved", "val/loss")


def test_plain_run_writes_the_run_directory_and_a_sample(tmp_path, args):
    r = launch(args("plain", "train.sample_tokens=16", "train.max_steps=2"))
    run = tmp_path / "runs" / "plain"
    assert "sample:\n" in r.stderr and "parameters;" in r.stderr
    assert (run / "config.yaml").is_file() and json.loads((run / "deepspeed.json").read_text())["zero_optimization"]
    assert (run / "checkpoints" / "step_00000002" / "COMPLETE.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.n_layr=3"], "error: bad override: Could not override 'model.n_layr'."),
        (["model.n_embd=30"], "error: model.n_embd: 30 is not divisible by model.n_head=4"),
        (["resume=/nonexistent/ckpt"], "error: cannot resume: /nonexistent/ckpt does not exist"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, args, extra, message):
    r = launch(args("bad", *extra), check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_a_data_error_on_rank_zero_stops_every_rank(tmp_path, args):
    r = launch(
        args(
            "nodata",
            "data.paths=[/nonexistent/data]",
            "data.prepare_if_missing=true",
            "data.corpus=[/nonexistent/corpus]",
        ),
        nproc=2,
        check=False,
    )
    assert r.returncode != 0
    assert r.stderr.count("error: input path does not exist: /nonexistent/corpus") == 2  # both ranks, no hang
