"""Benchmark the fused LM head + cross-entropy (model.fused_loss, kernels/cross_entropy.py) against the plain
head and loss: the peak memory of a training step and its time, the same model and batch in both.

    python tools/bench_loss.py                              # CPU: gpt2-124m's width and vocabulary, 2 layers
    python tools/bench_loss.py --layers 12 --batch 16       # GPU: the whole gpt2-124m, 16 x 1024, bf16
    python tools/bench_loss.py --smoke                      # seconds, for CI

A step is forward, backward and an AdamW update of a gpt2-124m-shaped model (vocabulary 50304 with its
padding, width 768; on CPU scaled down to --layers 2 and --batch 4 by default so that the plain path's
logits fit in memory and a step takes seconds). Each variant runs in a fresh process: one warm-up step
(allocating the optimizer's state), then --steps timed steps. Peak memory of the last step: on a GPU
`torch.cuda.max_memory_allocated` above what was allocated before it; on a CPU the process's peak resident
set (VmHWM, reset before the step through /proc/self/clear_refs) above its resident set before it. Both
variants also report the loss of the first step, which must agree. Where Liger-Kernel is installed (GPU), a
third variant runs the model with its fused linear cross-entropy in place of ours (tools/_liger.py), and
`vs_liger` compares ours with it. Results go to tools/results/bench_loss_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import _liger
from _results import write_json

ROOT = Path(__file__).resolve().parent.parent


def _proc_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def one(variant: str, layers: int, batch: int, seq: int, steps: int, vocab: int, width: int) -> dict:
    """Run the variant (plain, fused or liger) in this process; return its measurements."""
    import torch

    import llm.model.gpt
    from llm.config.schema import ModelConfig
    from llm.model.gpt import GPT

    fused = variant != "plain"
    if variant == "liger":  # the model's fused head and loss, computed by Liger-Kernel's instead of ours
        llm.model.gpt.linear_cross_entropy = _liger.linear_cross_entropy

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab, n_layer=layers, n_head=width // 64, n_embd=width, max_seq_len=seq, fused_loss=fused
    )
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, vocab, (batch, seq), device=device)
    targets = torch.randint(0, vocab, (batch, seq), device=device)

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            before = _proc_kb("VmRSS") * 1024
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if cuda else _proc_kb("VmHWM") * 1024
    return {
        "variant": variant,
        "fused_loss": fused,
        "first_loss": first_loss,
        "step_s": round(statistics.median(times), 4),
        "step_peak_bytes": peak - before,
        "peak_bytes": peak,
        "params": model.num_params(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="default: 12 on a GPU, 2 on a CPU")
    p.add_argument("--batch", type=int, default=None, help="sequences per step; default: 16 on a GPU, 4 on a CPU")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--vocab", type=int, default=50257, help="real vocabulary (the model pads it to 50304)")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--smoke", action="store_true", help="a small model and batch (CI)")
    p.add_argument("--one", choices=["fused", "plain", "liger"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="JSON path (default tools/results/bench_loss_<device>.json)")
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if args.smoke:
        args.layers, args.batch, args.seq, args.steps, args.vocab, args.width = 1, 2, 128, 1, 4000, 128
    layers = args.layers or (12 if cuda else 2)
    batch = args.batch or (16 if cuda else 4)
    if args.one:
        row = one(args.one, layers, batch, args.seq, args.steps, args.vocab, args.width)
        print(json.dumps(row))
        return 0
    rows = []
    if _liger.missing():
        print(f"the Liger-Kernel baseline is left out: {_liger.missing()}")
    for variant in ("plain", "fused") if _liger.missing() else ("plain", "fused", "liger"):
        cmd = [sys.executable, __file__, "--one", variant, f"--layers={layers}", f"--batch={batch}"]
        cmd += [f"--seq={args.seq}", f"--steps={args.steps}", f"--vocab={args.vocab}", f"--width={args.width}"]
        # big blocks from mmap, returned to the system when freed, so that the resident set follows live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if r.returncode != 0 and variant == "liger":  # the optional baseline: ours are measured all the same
            print(f"warning: the Liger-Kernel variant failed, left out:\n{r.stderr[-3000:]}", file=sys.stderr)
            break
        if r.returncode != 0:
            print(f"error: the {variant} variant failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(
            f"{variant:6s} step {row['step_s']:8.3f} s   step peak {row['step_peak_bytes'] / 2**20:9.1f} MiB   "
            f"process peak {row['peak_bytes'] / 2**20:9.1f} MiB   first loss {row['first_loss']:.6f}",
            flush=True,
        )
    plain, fused = rows[:2]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"layers": layers, "width": args.width, "vocab": args.vocab, "batch": batch, "seq": args.seq},
        "dtype": "bfloat16 autocast" if cuda else "float32",
        "rows": rows,
        "step_peak_ratio": round(fused["step_peak_bytes"] / plain["step_peak_bytes"], 3),
        "step_time_ratio": round(fused["step_s"] / plain["step_s"], 3),
        "loss_difference": abs(fused["first_loss"] - plain["first_loss"]),
        "liger_kernel": _liger.missing() or _liger.version(),
    }
    if len(rows) == 3:  # ours against Liger-Kernel's fused linear cross-entropy
        liger = rows[2]
        result["vs_liger"] = {
            "step_peak_ratio": round(fused["step_peak_bytes"] / liger["step_peak_bytes"], 3),
            "step_time_ratio": round(fused["step_s"] / liger["step_s"], 3),
            "loss_difference": abs(liger["first_loss"] - plain["first_loss"]),
        }
    print(
        f"fused / plain: step peak memory {result['step_peak_ratio']:.3f}x, step time {result['step_time_ratio']:.3f}x"
    )
    if "vs_liger" in result:
        vs = result["vs_liger"]
        print(f"fused / liger: step peak memory {vs['step_peak_ratio']:.3f}x, step time {vs['step_time_ratio']:.3f}x")
    out = args.out or ROOT / "tools" / "results" / f"bench_loss_{'cuda' if cuda else 'cpu'}.json"
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
