"""Benchmark a training step: ours (DeepSpeed engine, data loader, logging) against a minimal PyTorch loop.

    python tools/bench_train.py                                   # the demo config (tiny model, CPU)
    python tools/bench_train.py model=gpt2-124m data.seq_len=1024 train.micro_batch=16 train.global_batch=16
    python tools/bench_train.py --smoke                           # seconds, for CI

Both loops run the same model, batch geometry (micro-batches x accumulation), AdamW and clipping in the same
process. The plain loop re-uses one batch already on the device; ours runs `llm.train.train` unchanged with
evaluation and periodic checkpoints off, and its step time is read from its own metrics (the median of the
logging intervals after the first, which holds the warm-up). Reports tokens/s, MFU (with the peak used) and
the ratio ours / plain. Results go to tools/results/bench_train_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import _bootstrap  # noqa: F401
import torch
from _results import write_json

from llm.data.prepare import ensure_data
from llm.data.tokenizer import Tokenizer
from llm.metrics import read_history
from llm.model import GPT
from llm.train import load_config, train

ROOT = Path(__file__).resolve().parent.parent


def plain_step_times(cfg, vocab: int, device, steps: int, warmup: int) -> list[float]:
    """Seconds per optimizer step of a bare PyTorch loop on the same model and batch geometry."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = GPT(replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab)).to(device)
    dtype = (
        torch.bfloat16
        if cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and device.type == "cuda")
        else torch.float32
    )
    model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    accum = t.global_batch // t.micro_batch
    x = torch.randint(0, vocab, (t.micro_batch, cfg.data.seq_len + 1), device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(accum):
            (model(x[:, :-1], x[:, 1:]) / accum).backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides, as for python -m llm.train")
    p.add_argument("--interval", type=int, default=10, help="steps per measured interval")
    p.add_argument("--intervals", type=int, default=4, help="measured intervals (after one warm-up interval)")
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few steps (CI)")
    p.add_argument("--out", default=None, help="JSON path (default tools/results/bench_train_<device>.json)")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.smoke:
        args.interval, args.intervals = 2, 2
        overrides += [
            "model.n_layer=1",
            "model.n_embd=32",
            "data.seq_len=32",
            "model.max_seq_len=32",
            "train.micro_batch=2",
            "train.global_batch=4",
        ]
    cfg = load_config(overrides)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ensure_data(cfg.data)
    vocab = Tokenizer.load(cfg.data.tokenizer).vocab_size

    plain = plain_step_times(cfg, vocab, device, args.interval * args.intervals, warmup=args.interval)
    steps = args.interval * (args.intervals + 1)
    with tempfile.TemporaryDirectory() as runs:
        run_cfg = replace(
            cfg,
            name="bench",
            runs_dir=runs,
            resume="none",
            train=replace(
                cfg.train,
                max_steps=steps,
                eval_every=0,
                eval_batches=1,
                ckpt_every_steps=0,
                sample_tokens=0,
                steps_per_run=None,
            ),
            logger=replace(cfg.logger, wandb=False, log_every=args.interval),
        )
        out = train(run_cfg)
        records = read_history(Path(out["run_dir"]) / "metrics.jsonl")
    ours = [r["perf/step_time_s"] for r in records if "perf/step_time_s" in r][1:]
    mfu = statistics.median(r["perf/mfu"] for r in records if "perf/mfu" in r)
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    ours_s, plain_s = statistics.median(ours), statistics.median(plain)
    peak, peak_source = out["peak_flops"], out["peak_source"]  # what the run's MFU divided by
    model_name = cfg.model.name
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "model": model_name,
        "overrides": overrides,
        "tokens_per_step": tokens_per_step,
        "ours_step_s": round(ours_s, 5),
        "plain_step_s": round(plain_s, 5),
        "ratio_ours_over_plain": round(ours_s / plain_s, 3),
        "ours_tokens_per_s": round(tokens_per_step / ours_s),
        "plain_tokens_per_s": round(tokens_per_step / plain_s),
        "ours_mfu": round(mfu, 4),
        "peak_tflops": round(peak / 1e12, 3),
        "peak_source": peak_source,
    }
    print(f"device {result['device']}, model {model_name}, {tokens_per_step:,} tokens/step")
    print(f"plain PyTorch loop: {plain_s * 1e3:8.1f} ms/step  {result['plain_tokens_per_s']:>10,} tokens/s")
    print(
        f"ours (DeepSpeed)  : {ours_s * 1e3:8.1f} ms/step  {result['ours_tokens_per_s']:>10,} tokens/s  "
        f"MFU {100 * mfu:.1f}% of {peak / 1e12:.2f} TFLOP/s ({peak_source})"
    )
    print(f"ratio ours/plain  : {result['ratio_ours_over_plain']:.3f}x")
    default = ROOT / "tools/results" / f"bench_train_{result['device'].replace(' ', '_')}.json"
    write_json(args.out or default, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
