"""Benchmark sequence parallelism on CPU (gloo): one long sequence's training step at parallel.sequence 1, 2, 4.

    python tools/bench_sequence.py                 # writes tools/results/bench_sequence_cpu.json
    python tools/bench_sequence.py --smoke         # tiny, for CI

For each group size N, N processes (one per rank, OMP_NUM_THREADS=1 each) run forward and backward of the same
model on one sequence of --seq-len tokens, each its 1/N part; reported per rank: the step time (median of
--steps after one warm-up), the share of it spent in the all-to-all exchanges (timed around each), the activations
kept for the backward (autograd's saved tensors, each storage once) and the process's peak RSS. N=1 is the
baseline, measured in the same run. On a machine with fewer cores than ranks the ranks share cores: the step
time then shows the contention, not the parallel speed; the memory and the exchange share do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _results import write_json
from bench_data import cpu_name

from llm.config.schema import ModelConfig
from llm.model import sequence
from llm.model.gpt import GPT
from llm.model.sequence import SequenceParallel

ROOT = Path(__file__).resolve().parent.parent


def _timed_exchange(spent: list[float]):
    original = sequence._exchange

    def timed(x, sp, to_heads):
        t0 = time.perf_counter()
        out = original(x, sp, to_heads)
        spent[0] += time.perf_counter() - t0
        return out

    return timed


def _saved_bytes(model, idx) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, idx)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss.backward()
    return sum(n for ptr, n in seen.items() if ptr not in params)


def _rank(rank: int, world: int, port: int, cfg: dict, seq_len: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**cfg))
    if world > 1:
        model.sequence_parallel(SequenceParallel(dist.group.WORLD, world, rank))
    spent = [0.0]
    sequence._exchange = _timed_exchange(spent)
    idx = torch.randint(0, cfg["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    saved = _saved_bytes(model, idx)  # also the warm-up step
    times, exchanged = [], []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        spent[0], t0 = 0.0, time.perf_counter()
        model(idx, idx).backward()
        times.append(time.perf_counter() - t0)
        exchanged.append(spent[0])
    result = {
        "step_s": statistics.median(times),
        "exchange_s": statistics.median(exchanged),
        "activation_mb": saved / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, cfg: dict, seq_len: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        mp.spawn(_rank, args=(world, free_port(), cfg, seq_len, steps, str(out)), nprocs=world, join=True)
        ranks = json.loads(out.read_text())
    worst = max(ranks, key=lambda r: r["step_s"])
    return {
        "step_s": round(worst["step_s"], 4),
        "exchange_share": round(worst["exchange_s"] / worst["step_s"], 4),
        "activation_mb_per_rank": round(max(r["activation_mb"] for r in ranks), 2),
        "peak_rss_mb_per_rank": round(max(r["peak_rss_mb"] for r in ranks), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sizes", default="1,2,4", help="group sizes to run (1 is the baseline)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(ROOT / "tools/results/bench_sequence_cpu.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.width, args.layers, args.steps = 256, 32, 2, 1
    sizes = [int(s) for s in args.sizes.split(",")]
    if 1 not in sizes or any(s < 1 or args.seq_len % s for s in sizes):
        p.error("--sizes must include 1 (the baseline) and divide --seq-len")
    cfg = dict(
        n_layer=args.layers, n_head=8, n_kv_head=4, n_embd=args.width, vocab_size=2048, max_seq_len=args.seq_len,
        norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False, mlp_multiple_of=32,
        kernels="torch",
    )  # fmt: skip
    runs = {n: measure(n, cfg, args.seq_len, args.steps) for n in sizes}
    base = runs[1]
    for n, r in runs.items():
        r["activation_vs_1"] = round(r["activation_mb_per_rank"] / base["activation_mb_per_rank"], 3)
        r["step_vs_1"] = round(r["step_s"] / base["step_s"], 3)
        print(
            f"sequence parallel {n}: step {r['step_s']:.3f} s ({r['step_vs_1']:.2f}x of 1), exchanges "
            f"{100 * r['exchange_share']:.1f}% of it, activations {r['activation_mb_per_rank']:.1f} MB per rank "
            f"({r['activation_vs_1']:.3f} of 1), peak RSS {r['peak_rss_mb_per_rank']:.0f} MB"
        )
    write_json(
        args.out,
        {
            "machine": {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "torch": torch.__version__},
            "date": time.strftime("%Y-%m-%d"),
            "model": cfg,
            "seq_len": args.seq_len,
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
