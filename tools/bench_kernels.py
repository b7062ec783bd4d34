"""Micro-benchmarks of the fused kernels against PyTorch, each as a fraction of a ceiling measured in the same run.

    python tools/bench_kernels.py                       # on a GPU: the full sweep
    python tools/bench_kernels.py --smoke               # tiny shapes; on CPU through the Triton interpreter

Attention: forward, backward and forward+backward TFLOP/s for T = 512..16k (B x T = 16k tokens, H x D = 2048),
head dims 64 and 128, causal and not; ours against torch SDPA with each backend it has (flash, efficient,
cuDNN, math up to T = 4k: it holds the T x T scores) and flash-attn if importable. FLOPs: 4 B H T^2 D
forward, 2.5x that backward, halved when causal (the FlashAttention convention). Ceiling: a large bf16
matmul's TFLOP/s.
The model's own paths (op attention_paths), causal at T = 8k, D = 128: grouped-query heads (32 query / 8 K/V
heads) against SDPA with enable_gqa, and packed documents (log-normal lengths, mean 1k tokens, as packing
yields) against SDPA with the boolean mask; FLOPs counted over the visible pairs only. `vs_causal` is the time
with documents over the causal time scaled by the visible fraction (1.0: time proportional to the work).
Norms: forward and backward GB/s (each tensor read or written counted once) for hidden sizes 1k..16k, alone
and fused as the model runs them (residual added in, LayerNorm with a bias), ours against torch eager,
torch.compile and Liger-Kernel where it is installed (tools/_liger.py; its RMSNorm has a fused residual, its
LayerNorm does not). Ceiling: a large device-to-device copy's GB/s (read + write).
Writes results.json, results.csv and plots (PNG) to --out-dir, and prints a table.
"""

# ruff: noqa: B023  (the lambdas below are timed at once, inside their loop iteration)
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import _liger
import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs after a warm-up (CUDA events on a GPU)."""
    fn()
    if CUDA:
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(device, dtype, smoke: bool) -> dict:
    n = 256 if smoke else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    matmul = 2 * n**3 / timed(lambda: a @ b, 5 if smoke else 20)
    src = torch.empty(2**20 if smoke else 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / timed(lambda: dst.copy_(src), 5 if smoke else 20)
    return {"matmul_tflops": matmul / 1e12, "copy_gbs": copy / 1e9}


def pass_rows(
    base: dict,
    t_fwd: float,
    t_all: float,
    fwd_work: float,
    bwd_work: float,
    rate_key: str,
    scale: float,
    ceiling: float,
) -> list[dict]:
    """Rows for the forward, backward (t_all - t_fwd) and forward+backward passes: work per second in units of
    `scale` under `rate_key`, and as a fraction of `ceiling` (in the same units)."""
    rows = []
    for pass_, seconds, work in (
        ("fwd", t_fwd, fwd_work),
        ("bwd", max(t_all - t_fwd, 1e-9), bwd_work),
        ("fwd+bwd", t_all, fwd_work + bwd_work),
    ):
        rate = work / seconds / scale
        rows.append({**base, "pass": pass_, "ms": seconds * 1e3, rate_key: rate, "fraction_of_ceiling": rate / ceiling})
    return rows


def attention_impls(attn) -> dict:
    impls = {"ours": lambda q, k, v, causal: attn.attention(q, k, v, causal=causal, impl="triton")}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"sdpa_math": SDPBackend.MATH}
    if CUDA:
        backends.update(
            sdpa_flash=SDPBackend.FLASH_ATTENTION,
            sdpa_efficient=SDPBackend.EFFICIENT_ATTENTION,
            sdpa_cudnn=SDPBackend.CUDNN_ATTENTION,
        )

    def sdpa(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    impls.update({name: sdpa(b) for name, b in backends.items()})
    try:
        from flash_attn import flash_attn_func

        impls["flash_attn"] = lambda q, k, v, causal: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        ).transpose(1, 2)
    except ImportError:
        pass
    return impls


def bench_attention(attn, device, dtype, smoke: bool, ceil: dict, reps: int) -> list[dict]:
    rows = []
    seqs = [64] if smoke else [512, 1024, 2048, 4096, 8192, 16384]
    dims = [32] if smoke else [64, 128]
    tokens, width = (256, 64) if smoke else (16384, 2048)
    for name, fn in attention_impls(attn).items():
        for D in dims:
            for T in seqs:
                if name == "sdpa_math" and T > 4096:  # T x T scores per head: tens of GB and seconds a call
                    continue
                for causal in (True, False):
                    B, H = max(1, tokens // T), width // D
                    q, k, v = (
                        torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
                    )
                    fwd_flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                    try:
                        out = fn(q, k, v, causal)
                        do = torch.randn_like(out)
                        t_fwd = timed(lambda: fn(q, k, v, causal), reps)
                        t_all = timed(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do), reps)
                    except RuntimeError as e:  # a backend that does not take this shape or dtype
                        print(f"skip {name} T={T} D={D} causal={causal}: {str(e).splitlines()[0][:80]}")
                        continue
                    base = {"op": "attention", "impl": name, "T": T, "D": D, "causal": causal}
                    rows += pass_rows(
                        base, t_fwd, t_all, fwd_flops, 2.5 * fwd_flops, "tflops", 1e12, ceil["matmul_tflops"]
                    )
    return rows


def packed_documents(B: int, T: int, mean: float, device, seed: int = 0) -> torch.Tensor:
    """(B, T) non-decreasing document ids, log-normal lengths (sigma 1) of the given mean, as packing yields."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2
    rows = []
    for _ in range(B):
        lengths = []
        while sum(lengths) < T:
            lengths.append(max(1, int(math.exp(mu + sigma * torch.randn((), generator=g).item()))))
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:T]
        rows.append(ids)
    return torch.stack(rows).to(device=device, dtype=torch.int32)


def visible_pairs(doc_ids: torch.Tensor) -> int:
    """Causal (query, key) pairs inside documents: L (L + 1) / 2 per document of L tokens."""
    lengths = torch.cat([torch.bincount(row.long()) for row in doc_ids.cpu()]).double()
    return int((lengths * (lengths + 1) / 2).sum().item())


def bench_model_paths(attn, device, dtype, smoke: bool, ceil: dict, reps: int) -> list[dict]:
    """GQA and document-masked causal attention, ours against SDPA (see the module docstring)."""
    F = torch.nn.functional
    B, T, D, (hq, hkv), mean = (1, 64, 16, (2, 1), 12) if smoke else (2, 8192, 128, (32, 8), 1024)
    q = torch.randn(B, hq, T, D, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, hkv, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    docs = packed_documents(B, T, mean, device)
    mask = attn.attention_mask(docs, T, True, device)
    causal_pairs, doc_pairs = B * T * (T + 1) // 2, visible_pairs(docs)
    cases = {
        ("gqa", "ours"): (lambda: attn.attention(q, k, v, causal=True, impl="triton"), causal_pairs),
        ("gqa", "sdpa"): (
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            causal_pairs,
        ),
        ("docs", "ours"): (lambda: attn.attention(q, k, v, causal=True, doc_ids=docs, impl="triton"), doc_pairs),
        ("docs", "sdpa_mask"): (
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            doc_pairs,
        ),
    }
    rows, times = [], {}
    for (path, impl), (fn, pairs) in cases.items():
        try:
            do = torch.randn_like(fn())
            t_fwd = timed(fn, reps)
            t_all = timed(lambda: torch.autograd.grad(fn(), (q, k, v), do), reps)
        except RuntimeError as e:  # a backend that does not take this shape or dtype
            print(f"skip {path} {impl}: {str(e).splitlines()[0][:80]}")
            continue
        times[path, impl] = (t_fwd, t_all)
        flops = 4 * hq * D * pairs
        base = {"op": "attention_paths", "impl": impl, "path": path, "T": T, "D": D, "causal": True}
        base |= {"heads": f"{hq}/{hkv}", "visible_fraction": pairs / causal_pairs}
        rows += pass_rows(base, t_fwd, t_all, flops, 2.5 * flops, "tflops", 1e12, ceil["matmul_tflops"])
    if ("docs", "ours") in times and ("gqa", "ours") in times:  # documents' time over the visible work's share
        for row in rows:
            if row["path"] == "docs" and row["impl"] == "ours":
                i = ("fwd", "bwd", "fwd+bwd").index(row["pass"])
                causal_ms = [times["gqa", "ours"][0], times["gqa", "ours"][1] - times["gqa", "ours"][0]]
                causal_ms.append(times["gqa", "ours"][1])
                row["vs_causal"] = row["ms"] / 1e3 / (causal_ms[i] * row["visible_fraction"])
    return rows


def bench_norms(norm, device, dtype, smoke: bool, ceil: dict, reps: int) -> list[dict]:
    """Each norm alone (x -> y) and as the model runs it (`fused`: the residual added in, y and the sum h out;
    LayerNorm with a bias)."""
    rows = []
    sizes = [256, 1000] if smoke else [1024, 2048, 4096, 8192, 16384]
    tokens = 64 if smoke else 16384
    for op in ("layer_norm", "rms_norm"):
        ours = getattr(norm, op)
        ref = getattr(norm, f"{op}_ref")
        impls = {"ours": lambda *a, f=ours, **kw: f(*a, impl="triton", **kw), "torch": ref}
        if CUDA:
            impls["torch_compile"] = torch.compile(ref)
        if not _liger.missing():
            impls["liger"] = getattr(_liger, op)
        for name, fn in impls.items():
            for N in sizes:
                for fused in (False, True):
                    x = torch.randn(tokens, N, device=device, dtype=dtype, requires_grad=True)
                    w = torch.ones(N, device=device, dtype=dtype, requires_grad=True)
                    r = torch.randn_like(x, requires_grad=True)
                    b = torch.zeros(N, device=device, dtype=dtype, requires_grad=True)
                    extra = ({"bias": b} if op == "layer_norm" else {}) | {"residual": r} if fused else {}
                    inputs = (x, w, *extra.values())
                    dy, dh = torch.randn_like(x), torch.randn_like(x)
                    run = lambda: fn(x, w, **extra)
                    grads = (dy, dh) if fused else dy
                    t_fwd = timed(run, reps)
                    t_all = timed(lambda: torch.autograd.grad(run(), inputs, grads), reps)
                    nbytes = x.numel() * x.element_size()
                    # alone: x, y forward; x, dy, dx backward. fused: x, r, y, h; h, dy, dh, dx
                    fwd_bytes, bwd_bytes = (4 * nbytes, 4 * nbytes) if fused else (2 * nbytes, 3 * nbytes)
                    base = {"op": op, "impl": name, "N": N, "fused": fused}
                    rows += pass_rows(base, t_fwd, t_all, fwd_bytes, bwd_bytes, "gbs", 1e9, ceil["copy_gbs"])
    return rows


def plot(rows: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    attn = [r for r in rows if r["op"] == "attention" and r["pass"] == "fwd+bwd"]
    for D in sorted({r["D"] for r in attn}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, causal in zip(axes, (True, False), strict=True):
            for impl in sorted({r["impl"] for r in attn}):
                pts = sorted(
                    (r["T"], r["tflops"]) for r in attn if r["impl"] == impl and r["D"] == D and r["causal"] == causal
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            ax.set(
                xscale="log",
                xlabel="sequence length T",
                ylabel="TFLOP/s (fwd+bwd)",
                title=f"attention D={D} {'causal' if causal else 'full'}",
            )
            ax.legend()
        path = out_dir / f"attention_d{D}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    norms = [r for r in rows if r["op"] in ("layer_norm", "rms_norm") and r["pass"] == "fwd+bwd"]
    if norms:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, op in zip(axes, ("layer_norm", "rms_norm"), strict=True):
            for impl in sorted({r["impl"] for r in norms}):
                pts = sorted(
                    (r["N"], r["gbs"]) for r in norms if r["impl"] == impl and r["op"] == op and not r["fused"]
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            ax.set(xscale="log", xlabel="hidden size N", ylabel="GB/s (fwd+bwd)", title=op)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "norms.png", dpi=100)
        plt.close(fig)
        written.append("norms.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; without a GPU, through the Triton interpreter")
    p.add_argument("--out-dir", default=None, help="default tools/results/kernels_<device>")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    if not CUDA:
        if not args.smoke:
            print("error: no CUDA device; the full benchmark needs a GPU (use --smoke on CPU)", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    from llm.kernels import attention, norm

    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32  # the interpreter mishandles bf16
    reps = args.reps or (2 if args.smoke else 20)
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    out_dir = Path(args.out_dir or ROOT / "tools/results" / f"kernels_{name.replace(' ', '_')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ceil = ceilings(device, dtype, args.smoke)
    rows = bench_attention(attention, device, dtype, args.smoke, ceil, reps)
    rows += bench_model_paths(attention, device, dtype, args.smoke, ceil, reps)
    rows += bench_norms(norm, device, dtype, args.smoke, ceil, reps)
    if _liger.missing():
        print(f"Liger-Kernel baselines left out: {_liger.missing()}")

    print(
        f"device {name}, {dtype}; ceilings: matmul {ceil['matmul_tflops']:.2f} TFLOP/s, "
        f"copy {ceil['copy_gbs']:.1f} GB/s"
    )
    print(f"{'op':<11}{'impl':<15}{'shape':<22}{'pass':<9}{'ms':>9}{'rate':>12}{'of ceiling':>12}")
    for r in rows:
        shape = f"T={r['T']} D={r['D']} {'c' if r['causal'] else 'f'}" if "T" in r else f"N={r['N']}"
        if r.get("fused"):
            shape += " +residual"
        if "path" in r:
            shape = f"{r['path']} {r['heads']} {shape}"
        rate = f"{r['tflops']:.2f} TF/s" if "tflops" in r else f"{r['gbs']:.1f} GB/s"
        extra = f"  {r['vs_causal']:.2f}x causal" if "vs_causal" in r else ""
        print(
            f"{r['op'][:10]:<11}{r['impl']:<15}{shape:<22}{r['pass']:<9}{r['ms']:>9.3f}{rate:>12}"
            f"{100 * r['fraction_of_ceiling']:>11.1f}%{extra}"
        )
    meta = {
        "device": name,
        "dtype": str(dtype),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "ceilings": ceil,
        "smoke": args.smoke,
        "liger_kernel": _liger.missing() or _liger.version(),
    }
    (out_dir / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    fields = sorted({k for r in rows for k in r})
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    pngs = plot(rows, out_dir)
    print(f"wrote {out_dir}/results.json, results.csv, {', '.join(pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
