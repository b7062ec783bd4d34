"""Time the attention kernels' block-size candidates on this GPU and print the fastest, to freeze in
kernels/attention.py (CONFIGS, and VARIANTS where a variant's own best beats the shared entry by more than 5%).
Nothing is tuned at run time: the table in the source is what runs.

    python tools/tune_attention.py                 # on a GPU: every pass, head-dim bucket and variant
    python tools/tune_attention.py --smoke         # CPU, the Triton interpreter: the plumbing, not timings

Per pass (forward; the backward's dK/dV and dQ kernels, each timed as the whole backward with the other
kernel's entry fixed), head-dim bucket (64, 128) and variant (causal or not, packed documents or not), every
candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) is launched at bf16, B x T = 16k tokens, 16 query / 4 K/V
heads; those the GPU cannot launch (shared memory, registers) are skipped. The shared entry of a pass and
bucket is the candidate with the least total time over its variants. Writes every timing to --out (JSON).
"""

# ruff: noqa: B023  (the lambdas below are timed at once, inside their loop iteration)
from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
VARIANTS = [(True, False), (True, True), (False, False)]  # (causal, documents): what models launch


def candidates(kind: str, smoke: bool) -> list[tuple[int, int, int, int]]:
    if smoke:
        return [(32, 32, 4, 1), (64, 32, 4, 1)]
    ms, ns = ((32, 64), (64, 128)) if kind == "dkdv" else ((64, 128), (32, 64, 128))
    return list(itertools.product(ms, ns, (4, 8), (2, 3, 4)))


def work(smoke: bool) -> list[tuple]:
    """Every (bucket, causal, docs, kind, candidate) to time, in the order they are timed."""
    return [
        (bucket, causal, docs, kind, cand)
        for bucket in ((64,) if smoke else (64, 128))
        for causal, docs in VARIANTS
        for kind in ("fwd", "dkdv", "dq")
        for cand in candidates(kind, smoke)
    ]


class Bench:
    """The inputs of one head-dim bucket and variant, and each pass run with a candidate in place of the table's
    entry for that pass."""

    def __init__(self, A, bucket: int, causal: bool, docs: bool, smoke: bool, seq: int, batch: int | None = None):
        from bench_kernels import packed_documents

        device = torch.device("cuda" if CUDA else "cpu")
        dtype = torch.bfloat16 if CUDA else torch.float32
        B, hq, hkv = (1, 2, 1) if smoke else (batch or max(1, 16384 // seq), 16, 4)
        self.A, self.causal, self.scale = A, causal, 1 / math.sqrt(bucket)
        self.q = torch.randn(B, hq, seq, bucket, device=device, dtype=dtype)
        self.k, self.v = (torch.randn(B, hkv, seq, bucket, device=device, dtype=dtype) for _ in range(2))
        self.do = torch.randn_like(self.q)
        self.doc_ids = packed_documents(B, seq, 24 if smoke else 1024, device) if docs else None
        self.o, self.lse = A.attention_fwd(self.q, self.k, self.v, self.doc_ids, causal, self.scale)

    def pass_with(self, kind: str, cand: tuple):
        """A callable running the pass (the forward, or the backward for dkdv and dq) with `cand` for `kind`."""
        A, default = self.A, self.A.config
        args = (self.q, self.k, self.v, self.doc_ids, self.causal, self.scale)

        def patched(kind_, D, arch_, dtype_=torch.bfloat16, causal_=True, docs_=False):
            return cand if kind_ == kind else default(kind_, D, arch_, dtype_, causal_, docs_)

        def run():
            A.config = patched
            try:
                if kind == "fwd":
                    return A.attention_fwd(*args)
                return A.attention_bwd(self.do, *args[:3], self.o, self.lse, *args[3:])
            finally:
                A.config = default

        return run


def _compile_some(jobs: list[tuple], smoke: bool, seq: int) -> tuple[int, int]:
    """In a worker process: run each job's pass once on one short sequence, so that Triton compiles it into its
    on-disk cache (the specialization is that of the timed launch: the batch is no kernel argument, and the
    sizes and strides are divisible by 16 alike). -> (passes run, passes that failed to launch)."""
    from llm.kernels import attention as A

    benches, failed = {}, 0
    for bucket, causal, docs, kind, cand in jobs:
        try:
            if (bucket, causal, docs) not in benches:
                benches = {(bucket, causal, docs): Bench(A, bucket, causal, docs, smoke, seq, batch=1)}
            benches[bucket, causal, docs].pass_with(kind, cand)()
        except Exception:  # noqa: BLE001 - e.g. a candidate this GPU cannot launch: the timing pass says so
            failed += 1
    if CUDA:
        torch.cuda.synchronize()
    return len(jobs), failed


def compile_seq(seq: int) -> int:
    """A sequence length at most 256 that Triton specializes as it does `seq` (divisible by 16 or not)."""
    return seq if seq <= 256 else 256 if seq % 16 == 0 else 257


def default_compile_jobs() -> int:
    """The CPUs this process may use, at most 16 (each compiling process also holds a CUDA context)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, 16)


def compile_all(jobs: list[tuple], processes: int, smoke: bool, seq: int) -> None:
    """Compile every candidate before timing, in parallel processes (one kernel compiles in seconds, and there
    are hundreds: one after another they would take most of an hour); the timing pass then loads them from
    Triton's cache. A failure here only costs time: the timing pass compiles what is missing."""
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.time()
    shares = [share for share in (jobs[i::processes] for i in range(processes)) if share]
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(shares), mp_context=ctx) as pool:
            done = list(pool.map(_compile_some, shares, [smoke] * len(shares), [compile_seq(seq)] * len(shares)))
    except Exception as e:  # noqa: BLE001 - e.g. a worker that died (BrokenProcessPool)
        print(f"compiling in parallel failed ({type(e).__name__}: {e}); the timing pass compiles instead")
        return
    ran, failed = sum(d[0] for d in done), sum(d[1] for d in done)
    print(f"compiled {ran} candidate passes in {len(shares)} processes in {time.time() - t0:.0f} s ({failed} failed)")


def tune(A, timed, smoke: bool, seq: int) -> list[dict]:
    rows, bench = [], {}
    for bucket, causal, docs, kind, cand in work(smoke):
        if (bucket, causal, docs) not in bench:
            bench = {(bucket, causal, docs): Bench(A, bucket, causal, docs, smoke, seq)}  # one bucket's at a time
        try:
            ms = timed(bench[bucket, causal, docs].pass_with(kind, cand), 2 if smoke else 10) * 1e3
        except Exception as e:  # noqa: BLE001 - a candidate this GPU cannot launch
            print(f"skip {kind} D={bucket} {cand}: {str(e).splitlines()[0][:80]}")
            continue
        rows.append({"kind": kind, "bucket": bucket, "causal": causal, "docs": docs, "config": cand, "ms": ms})
        print(f"{kind:<5} D={bucket:<4} causal={causal:d} docs={docs:d} {cand} {ms:9.3f} ms")
    return rows


def choose(rows: list[dict]) -> tuple[dict, dict]:
    """(shared entries {(kind, bucket): config}, variant entries {(kind, bucket, causal, docs): config} that beat
    the shared one by more than 5%)."""
    shared, variants = {}, {}
    for kind, bucket in sorted({(r["kind"], r["bucket"]) for r in rows}):
        mine = [r for r in rows if r["kind"] == kind and r["bucket"] == bucket]
        keys = {(r["causal"], r["docs"]) for r in mine}
        totals = {}
        for cand in {r["config"] for r in mine}:
            times = [r["ms"] for r in mine if r["config"] == cand]
            if len(times) == len(keys):  # launched in every variant
                totals[cand] = sum(times)
        if not totals:
            continue
        best = shared[kind, bucket] = min(totals, key=totals.get)
        for key in keys:
            at = {r["config"]: r["ms"] for r in mine if (r["causal"], r["docs"]) == key}
            own = min(at, key=at.get)
            if at[own] < at[best] / 1.05:
                variants[(kind, bucket, *key)] = own
    return shared, variants


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes through the Triton interpreter (no GPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 4096; 64 with --smoke)")
    p.add_argument("--out", default=None, help="default tools/results/tune_attention_<gpu>.json")
    p.add_argument(
        "--compile-jobs",
        type=int,
        default=None,
        help="processes compiling the candidates before timing (default: the CPUs, at most 16; 0: none)",
    )
    args = p.parse_args(argv)
    if args.seq is not None and args.seq < 1:
        print(f"error: --seq {args.seq} must be at least 1", file=sys.stderr)
        return 2
    if args.compile_jobs is not None and args.compile_jobs < 0:
        print(f"error: --compile-jobs {args.compile_jobs} must be 0 or more", file=sys.stderr)
        return 2
    if not CUDA:
        if not args.smoke:
            print("error: no CUDA device; tuning needs a GPU (use --smoke on CPU)", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    from bench_kernels import timed

    from llm.kernels import attention as A

    name = torch.cuda.get_device_name() if CUDA else "cpu"
    seq = args.seq or (64 if args.smoke else 4096)
    jobs = args.compile_jobs if args.compile_jobs is not None else default_compile_jobs()
    if jobs:
        compile_all(work(args.smoke), jobs, args.smoke, seq)
    rows = tune(A, timed, args.smoke, seq)
    shared, variants = choose(rows)
    gen = A.generation(A._arch(torch.empty(0, device="cuda"))) if CUDA else None
    print(f"\nfastest on {name} (generation {gen}); freeze in kernels/attention.py:")
    for (kind, bucket), cand in sorted(shared.items()):
        print(f"  CONFIGS[{kind!r}][{gen}][{bucket}] = {cand}")
    for key, cand in sorted(variants.items()):
        print(f"  VARIANTS[{(key[0], gen, *key[1:])!r}] = {cand}")
    out = Path(args.out or ROOT / "tools/results" / f"tune_attention_{name.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": name,
        "generation": gen,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "shared": [{"kind": k, "bucket": b, "config": c} for (k, b), c in sorted(shared.items())],
        "variants": [
            {"kind": k[0], "bucket": k[1], "causal": k[2], "docs": k[3], "config": c}
            for k, c in sorted(variants.items())
        ],
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
