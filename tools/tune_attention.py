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


def tune(A, timed, smoke: bool, seq: int) -> list[dict]:
    from bench_kernels import packed_documents

    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    default = A.config
    rows = []
    for bucket in (64,) if smoke else (64, 128):
        B, hq, hkv = max(1, 16384 // seq), 16, 4
        if smoke:
            B, hq, hkv = 1, 2, 1
        q = torch.randn(B, hq, seq, bucket, device=device, dtype=dtype)
        k, v = (torch.randn(B, hkv, seq, bucket, device=device, dtype=dtype) for _ in range(2))
        do = torch.randn_like(q)
        docs = packed_documents(B, seq, 24 if smoke else 1024, device)
        scale = 1 / math.sqrt(bucket)
        for causal, with_docs in VARIANTS:
            doc_ids = docs if with_docs else None
            o, lse = A.attention_fwd(q, k, v, doc_ids, causal, scale)
            runs = {
                "fwd": lambda: A.attention_fwd(q, k, v, doc_ids, causal, scale),
                "dkdv": lambda: A.attention_bwd(do, q, k, v, o, lse, doc_ids, causal, scale),
                "dq": lambda: A.attention_bwd(do, q, k, v, o, lse, doc_ids, causal, scale),
            }
            for kind, run in runs.items():
                for cand in candidates(kind, smoke):

                    def patched(kind_, D, arch_, dtype_=torch.bfloat16, causal_=True, docs_=False, _c=cand, _k=kind):
                        return _c if kind_ == _k else default(kind_, D, arch_, dtype_, causal_, docs_)

                    A.config = patched
                    try:
                        ms = timed(run, 2 if smoke else 10) * 1e3
                    except Exception as e:  # noqa: BLE001 - a candidate this GPU cannot launch
                        print(f"skip {kind} D={bucket} {cand}: {str(e).splitlines()[0][:80]}")
                        continue
                    finally:
                        A.config = default
                    row = {"kind": kind, "bucket": bucket, "causal": causal, "docs": with_docs, "config": cand}
                    rows.append({**row, "ms": ms})
                    print(f"{kind:<5} D={bucket:<4} causal={causal:d} docs={with_docs:d} {cand} {ms:9.3f} ms")
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
    args = p.parse_args(argv)
    if args.seq is not None and args.seq < 1:
        print(f"error: --seq {args.seq} must be at least 1", file=sys.stderr)
        return 2
    if not CUDA:
        if not args.smoke:
            print("error: no CUDA device; tuning needs a GPU (use --smoke on CPU)", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    from bench_kernels import timed

    import kernels  # noqa: F401  (the package registers the ops)

    A = sys.modules["kernels.attention"]
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    rows = tune(A, timed, args.smoke, args.seq or (64 if args.smoke else 4096))
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
