"""Benchmark checkpoints: save and load time and bytes per parameter at each ZeRO stage and number of ranks.

    python tools/bench_checkpoint.py                                  # tiny and gpt2-124m, ZeRO 1-3, 1 and 2 ranks
    python tools/bench_checkpoint.py --models tiny --stages 3 --worlds 2
    python tools/bench_checkpoint.py --smoke                          # seconds, for CI

Each case runs `python -m llm.train` as a user does (under torchrun for 2 ranks) on the demo's data: a first
run trains one step and saves it; a second run resumes it (a same-size resume: checksums checked, state
loaded), trains one more step and saves again. The times are the training's own (`checkpoint/save_s` in
metrics.jsonl: the DeepSpeed save, the checksums and COMPLETE.json; `checkpoint_load_s` in its start record:
the checksum check and the load). The baseline, measured in the same run on the same disk: writing and
reading back the same number of bytes as one file (written with fsync, read after dropping it from the
page cache where that is allowed), so the save and load figures show what they cost beyond moving the bytes.
Results go to tools/results/bench_checkpoint_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
from _results import write_json

from llm.training.metrics import read_history

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # a short step: the checkpoint is the subject, not the training
    "tiny": ["model=tiny"],
    "gpt2-124m": ["model=gpt2-124m", "model.max_seq_len=64"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(args: list[str], world: int) -> str:
    """Run the training; return its log (stderr)."""
    cmd = [sys.executable, "-m", "llm.train", *args]
    if world > 1:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}"]
        cmd = [sys.executable, *launcher, "-m", "llm.train", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stderr


def disk_baseline(directory: Path, size: int) -> tuple[float, float]:
    """(write s, read s) of `size` bytes as one file in `directory`: written in 16 MB blocks and fsynced, read
    back after asking the kernel to drop it from the page cache."""
    path, block = directory / "baseline.bin", os.urandom(16 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for start in range(0, size, len(block)):
            f.write(block[: min(len(block), size - start)])
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass
    read_s = time.perf_counter() - t0
    path.unlink()
    return write_s, read_s


def measure(model: str, stage: int, world: int, runs: Path, common: list[str]) -> dict:
    name = f"{model}-zero{stage}-w{world}"
    args = [*MODELS[model], f"deepspeed=zero{stage}", *common, f"runs_dir={runs}", f"name={name}"]
    args += [f"train.global_batch={world}", "train.micro_batch=1"]
    log = run_training([*args, "train.max_steps=1"], world)
    n_params = int(re.search(r"([\d,]+) parameters;", log).group(1).replace(",", ""))
    run_training([*args, "train.max_steps=2"], world)
    records = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in read_history(runs / name / "metrics.jsonl") if "checkpoint/save_s" in r]
    resumed = [r for r in records if r.get("event") == "start"][-1]
    size = saves[-1]["checkpoint/bytes"]
    write_s, read_s = disk_baseline(runs, size)
    return {
        "model": model,
        "params": n_params,
        "zero_stage": stage,
        "world_size": world,
        "bytes": size,
        "bytes_per_param": round(size / n_params, 2),
        "save_s": [round(r["checkpoint/save_s"], 3) for r in saves],  # the first run's save, then the resumed one's
        "load_s": resumed["checkpoint_load_s"],
        "disk_write_s": round(write_s, 3),
        "disk_read_s": round(read_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--smoke", action="store_true", help="the tiny model, ZeRO-1, one rank (CI)")
    p.add_argument("--out", default=None, help="JSON path (default tools/results/bench_checkpoint_<device>.json)")
    p.add_argument("overrides", nargs="*", help="extra config overrides (data, tokenizer, ...)")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.stages, args.worlds = ["tiny"], [1], [1]
    common = [
        "data.seq_len=64",
        "train.eval_every=0",
        "train.ckpt_every_steps=1",
        "train.sample_tokens=0",
        "train.deterministic=false",
        "logger.wandb=false",
        "logger.log_every=1",
        *args.overrides,
    ]
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        for model in args.models:
            for stage in args.stages:
                for world in args.worlds:
                    row = measure(model, stage, world, Path(tmp), common)
                    rows.append(row)
                    print(
                        f"{model:10s} ZeRO-{stage} x{world}: {row['bytes'] / 1e6:9.1f} MB "
                        f"({row['bytes_per_param']:5.2f} B/param)  save {row['save_s'][-1]:6.2f} s  "
                        f"load {row['load_s']:6.2f} s  (disk: write {row['disk_write_s']:.2f} s, "
                        f"read {row['disk_read_s']:.2f} s)",
                        flush=True,
                    )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    out = args.out or ROOT / "tools" / "results" / "bench_checkpoint_cpu.json"
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
