"""Start `python -m llm.train` as users do (plainly, or under torchrun with N ranks) over the fixture dataset,
and read back what it wrote. Runs use OMP_NUM_THREADS=1 so that 1-rank and 2-rank runs sum in the same order
and compare bitwise."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llm.training.metrics import read_history

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).resolve().parent / "fault_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(tmp_path, prepared_dir, tokenizer_dir, name, *extra) -> list[str]:
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
        "deepspeed.param_persistence_threshold=0",  # under ZeRO-3 every weight partitioned (helpers.make_cfg)
        f"runs_dir={tmp_path / 'runs'}",
        f"name={name}",
        *extra,
    ]


def command(args, nproc=1, fault: str | None = None) -> list[str]:
    """The command line: `python -m llm.train`, under torchrun for nproc > 1; with a fault (see
    fault_worker.py) the same entry point runs inside the fault-injecting worker."""
    target = [WORKER] if fault else ["-m", "llm.train"]
    if nproc == 1:
        return [sys.executable, *target, *args]
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return [*run, *target, *args]


def environment(fault: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LLM_FAULT"):
        env.pop(k, None)
    if fault:
        env["LLM_FAULT"] = fault
    return env


def run_module(module: str, *args, timeout=300) -> subprocess.CompletedProcess:
    """`python -m <module> args...` from the repository root, as a user runs an entry point."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=timeout)


def launch(args, nproc=1, check=True, fault: str | None = None, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        command(args, nproc, fault), capture_output=True, text=True, cwd=ROOT, env=environment(fault), timeout=timeout
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def start(args, nproc=1, fault: str | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start a run in the background; its output goes to `log`."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(
        command(args, nproc, fault), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=environment(fault)
    )


def losses(tmp_path, name, key="train/loss") -> dict[int, float]:
    """{step: value} of a metric of the run <tmp_path>/runs/<name>; none at all fails the test."""
    from helpers import records

    return records(tmp_path / "runs" / name, key)


def outcome(tmp_path, name, since: float | None = None) -> subprocess.CompletedProcess:
    """`python -m llm.outcome` for a run: its stdout line and exit code."""
    extra = ["--since", str(since)] if since else []
    cmd = [sys.executable, "-m", "llm.outcome", *extra, "--run-dir", str(tmp_path / "runs" / name)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=120)


def wait_for_step(tmp_path, name, step: int, proc: subprocess.Popen, timeout=120) -> None:
    """Wait until a run has logged `step` (or fail if it ended first)."""
    path = tmp_path / "runs" / name / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and any(r["step"] >= step and "train/loss" in r for r in read_history(path)):
            return
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes under a torchrun (direct children that carry RANK)."""
    pids = {}
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if rank:
            pids[int(rank[0])] = int(child)
    return pids


def send(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)


def records_json(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]
