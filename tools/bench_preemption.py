"""Benchmark a preemption round trip on a real Slurm cluster started on this machine (needs root):

    python tools/bench_preemption.py                       # the tiny model, 2 tasks, ZeRO-2, 3 preemptions
    python tools/bench_preemption.py --repeats 5 deepspeed=zero3

`sbatch slurm/pretrain.sbatch` runs a long training; each round sends `scancel --signal=USR1 --batch` (what a
time limit or a preemption does) and times, from the outside, polling the run directory and the job state:
the signal -> the checkpoint is written (its own save time from metrics.jsonl) -> the job is requeued
(the training has exited, `llm.outcome` and `scontrol requeue` have run) -> the job runs again (Slurm holds a
requeued job ~120 s; this cluster is told to release it after --hold seconds, the shortest wait it needs)
-> the training has resumed (imports, rendezvous, engine start-up, the checksum check and load of the
checkpoint, the last of which is also given alone)
-> its first step is logged. The round trip's cost beyond the checkpoint write and the hold is reported.
Results go to tools/results/bench_preemption_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
from _results import write_json
from slurm_cluster import Cluster

from llm.config.compose import load_config
from llm.data.prepare import ensure_data

ROOT = Path(__file__).resolve().parent.parent


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def until(what: str, test, timeout: float = 300.0, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = test()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def round_trip(cluster: Cluster, job: int, metrics: Path, hold: float) -> dict:
    seen = len(records(metrics))
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, env=cluster.env)

    def new(pred):
        return next((r for r in records(metrics)[seen:] if pred(r)), None)

    saved = until("the checkpoint", lambda: new(lambda r: "checkpoint/save_s" in r))
    t_saved = time.time()
    until("the requeue", lambda: cluster.job(job)["JobState"] == "PENDING", every=0.02)
    t_requeued = time.time()
    time.sleep(hold)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=cluster.env)
    until("the job to run again", lambda: cluster.job(job)["JobState"] == "RUNNING", every=0.02)
    t_running = time.time()
    start = until("the training to start", lambda: new(lambda r: r.get("event") == "start"))
    t_started = start["time"]
    until("the first step", lambda: new(lambda r: "train/loss" in r and r["step"] > start["step"]))
    t_first = time.time()
    total = t_first - t_signal
    return {
        "signal_to_saved_s": round(t_saved - t_signal, 2),
        "checkpoint_save_s": round(saved["checkpoint/save_s"], 3),
        "saved_to_requeued_s": round(t_requeued - t_saved, 2),
        "hold_s": round(hold, 2),
        "released_to_running_s": round(t_running - t_requeued - hold, 2),
        "running_to_resumed_s": round(t_started - t_running, 2),
        "checkpoint_load_s": start["checkpoint_load_s"],
        "resumed_to_first_step_s": round(t_first - t_started, 2),
        "total_s": round(total, 2),
        "beyond_save_and_hold_s": round(total - saved["checkpoint/save_s"] - hold, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="preemptions in one job")
    p.add_argument("--tasks", type=int, default=2, help="tasks (ranks) on the one node")
    p.add_argument("--hold", type=float, default=5.0, help="seconds before a requeued job is released")
    p.add_argument("overrides", nargs="*", help="config overrides for the training (default: the tiny model)")
    args = p.parse_args(argv)
    overrides = [
        "model=tiny",
        "deepspeed=zero2",
        "train.max_steps=100000",
        "train.ckpt_every_steps=0",
        "train.eval_every=0",
        "train.sample_tokens=0",
        "logger.wandb=false",
        "logger.log_every=1",
        *args.overrides,
    ]
    ensure_data(load_config(overrides).data)  # the job should not spend its first minute preparing data
    cluster = Cluster(1).start()
    rounds = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_args = [*overrides, f"runs_dir={tmp}", "name=preempted"]
            resources = [f"--ntasks-per-node={args.tasks}", f"--gpus-per-node={args.tasks}", "--cpus-per-task=1"]
            env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
            log = f"--output={tmp}/%x-%j.out"
            job = cluster.sbatch(*resources, "--time=60", log, "slurm/pretrain.sbatch", *run_args, cwd=ROOT, env=env)
            metrics = Path(tmp) / "preempted" / "metrics.jsonl"
            until("step 5", lambda: any(r.get("step", 0) >= 5 and "train/loss" in r for r in records(metrics)), 300)
            for i in range(args.repeats):
                rounds.append(round_trip(cluster, job, metrics, args.hold))
                print(f"preemption {i + 1}: " + ", ".join(f"{k} {v}" for k, v in rounds[-1].items()), flush=True)
            subprocess.run(["scancel", str(job)], env=cluster.env, check=False)
    finally:
        cluster.stop()
    medians = {k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}
    print("median: " + ", ".join(f"{k} {v}" for k, v in medians.items()))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "tasks": args.tasks,
        "overrides": overrides,
        "rounds": rounds,
        "median": medians,
    }
    write_json(ROOT / "tools" / "results" / "bench_preemption_cpu.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
