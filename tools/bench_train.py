"""Benchmark a training step: ours (`llm.train`: DeepSpeed engine, data loader, checks, logging) against a minimal
PyTorch loop.

    python tools/bench_train.py                                   # the demo config (tiny model, 16 x 128, CPU)
    python tools/bench_train.py --sizes 12x64,16x256              # both sizes of the README table
    python tools/bench_train.py model=gpt2-124m data.seq_len=1024 train.micro_batch=16 train.global_batch=16
    python tools/bench_train.py --smoke                           # seconds, for CI

Both loops run the same model, batch geometry (micro-batches x accumulation) and optimizer (torch's fused AdamW,
clipping at optim.grad_clip) in the same process. The plain loop re-uses one batch of random tokens already on
the device and masks no documents (a nanoGPT-style loop); ours runs `llm.train.train` unchanged, reading its
data and masking documents as configured, with evaluation, sampling and periodic checkpoints off. A step's time
is the wall time between consecutive optimizer steps (ours: between the loop's calls to log.advance, so
logging is included); each repetition reports its median step after a warm-up, and the best of
`--repeats` repetitions (the two loops alternating) is kept. A last run of ours, not timed, splits its step
into data, forward, backward, the step decision (non-finite check, signals, clipping), DeepSpeed's step (the
optimizer itself shown apart), logging, and the loop's own remainder ("other"). On a GPU the split
synchronises at each boundary. Results go to tools/results/bench_train_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import _bootstrap  # noqa: F401
import torch
from _results import write_json

import llm.training.trainer as train_mod
from llm.data.dataset import BatchLoader
from llm.data.prepare import ensure_data
from llm.data.tokenizer import Tokenizer
from llm.model.gpt import GPT
from llm.parallel import distributed as D
from llm.train import load_config, train
from llm.training.metrics import MetricsLogger
from llm.training.optim import SkippableAdamW

ROOT = Path(__file__).resolve().parent.parent


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_step_times(cfg, vocab: int, device, steps: int, warmup: int) -> tuple[list[float], dict[str, float]]:
    """Seconds per optimizer step of a bare PyTorch loop on the same model and batch geometry, and the mean
    seconds per step in its parts (forward + backward, clipping, optimizer); on a GPU the parts are timed in
    extra synchronised steps after the timed ones."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = GPT(replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab)).to(device)
    # bf16 as ours runs it: without ZeRO autocast over fp32 weights (as nanoGPT), under ZeRO bf16 weights
    autocast = D.forward_precision(cfg, device)
    if D.resolve_precision(cfg.deepspeed.precision) == "bf16" and D.autocast_dtype(cfg) is None:
        model = model.to(torch.bfloat16)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    accum = t.global_batch // t.micro_batch
    x = torch.randint(0, vocab, (t.micro_batch, cfg.data.seq_len + 1), device=device)
    parts: dict[str, float] = defaultdict(float)

    def step(split: dict | None, synchronise: bool) -> float:
        """One optimizer step; its seconds, and (given `split`) the seconds of its parts added there."""
        marks = [time.perf_counter()]

        def mark():
            if synchronise:
                sync(device)
            marks.append(time.perf_counter())

        for _ in range(accum):
            with autocast:
                loss = model(x[:, :-1], x[:, 1:])
            (loss / accum).backward()
        mark()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        marks.append(time.perf_counter())
        if split is not None:
            for label, a, b in zip(("forward+backward", "clip", "optimizer"), marks, marks[1:], strict=False):
                split[label] += b - a
        return marks[-1] - marks[0]

    for _ in range(warmup):
        step(None, False)
    on_cpu = device.type != "cuda"
    times = [step(parts if on_cpu else None, False) for _ in range(steps)]
    if not on_cpu:  # timing the parts of a GPU step needs synchronising between them: separate steps
        for _ in range(steps):
            step(parts, True)
    return times, {k: v / steps for k, v in parts.items()}


class Stopwatch:
    """Wraps functions (attributes of classes or modules) to add up the wall time spent in each, by label and by
    step; a step ends at each call of the marked function (the loop's log.advance, after the optimizer step)."""

    def __init__(self, device, synchronise: bool, skip_steps: int = 0):
        """The first `skip_steps` steps (warm-up) and the one before the first mark (its start is unknown) are
        left out."""
        self.device, self.synchronise, self.skip_steps = device, synchronise, skip_steps
        self.marks: list[float] = []
        self.steps: list[dict[str, float]] = []  # seconds by label, one dict per step after the first mark
        self.current: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def patched(self, targets: list[tuple[object, str, str]], mark: tuple[object, str]):
        """`targets`: (owner, attribute, label); `mark`: (owner, attribute)."""
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
        mark_owner, mark_name = mark
        mark_fn = getattr(mark_owner, mark_name)
        for (owner, name, label), (_, _, fn) in zip(targets, saved, strict=True):
            setattr(owner, name, self._timed(fn, label))

        def marked(*args, **kwargs):
            if self.synchronise:
                sync(self.device)
            self.marks.append(time.perf_counter())
            if len(self.marks) > 1:
                self.steps.append(dict(self.current))
            self.current = defaultdict(float)
            return mark_fn(*args, **kwargs)

        setattr(mark_owner, mark_name, marked)
        try:
            yield self
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)
            setattr(mark_owner, mark_name, mark_fn)

    def _timed(self, fn, label):
        def timed(*args, **kwargs):
            if self.synchronise:
                sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.synchronise:
                    sync(self.device)
                self.current[label] += time.perf_counter() - t0

        return timed

    def step_times(self) -> list[float]:
        """Each step's wall time after the skipped ones."""
        marks = self.marks[self.skip_steps :]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def split(self) -> tuple[dict[str, float], int]:
        """Seconds per step in each label, nested labels ("optimizer" inside "deepspeed step") apart, and
        "other", the rest of the step; averaged over the steps within 1.5x the median step (the others, returned
        as a count, hold one-off work such as re-measuring the CPU's peak at the first logging steps)."""
        times = self.step_times()
        steps = self.steps[self.skip_steps :]
        limit = 1.5 * statistics.median(times)
        kept = [(t, parts) for t, parts in zip(times, steps, strict=True) if t <= limit]
        per_step: dict[str, float] = defaultdict(float)
        for _, parts in kept:
            for label, seconds in parts.items():
                per_step[label] += seconds / len(kept)
        if "optimizer" in per_step:
            per_step["deepspeed step"] -= per_step["optimizer"]
        per_step["other"] = sum(t for t, _ in kept) / len(kept) - sum(per_step.values())
        return dict(per_step), len(times) - len(kept)


def run_ours(cfg, steps: int, log_every: int, watch: Stopwatch, split: bool) -> dict:
    """One run of llm.train.train, `steps` optimizer steps, under the stopwatch."""
    import deepspeed

    engine = deepspeed.DeepSpeedEngine
    targets = []
    if split:
        targets = [
            (BatchLoader, "__next__", "data"),
            (train_mod, "to_device", "data"),
            (engine, "forward", "forward"),
            (engine, "backward", "backward"),
            (train_mod, "all_max", "decision"),
            (train_mod, "grad_norm_of", "decision"),
            (engine, "step", "deepspeed step"),
            (SkippableAdamW, "step", "optimizer"),
            (MetricsLogger, "log", "logging"),
        ]
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
                ckpt_every_minutes=0,
                sample_tokens=0,
                steps_per_run=None,
            ),
            logger=replace(cfg.logger, wandb=False, log_every=log_every),
        )
        with watch.patched(targets, (MetricsLogger, "advance")):
            return train(run_cfg)


def measure(cfg, vocab: int, device, steps: int, warmup: int, repeats: int, log_every: int) -> dict:
    """Best-of-`repeats` median step of both loops, then the split of ours."""
    plain, ours, out, plain_parts = [], [], None, []
    for _ in range(repeats):
        times, parts = plain_step_times(cfg, vocab, device, steps, warmup)
        plain.append(statistics.median(times))
        plain_parts.append(parts)
        watch = Stopwatch(device, synchronise=False, skip_steps=warmup)
        out = run_ours(cfg, warmup + 1 + steps, log_every, watch, split=False)
        ours.append(statistics.median(watch.step_times()))
    watch = Stopwatch(device, synchronise=device.type == "cuda", skip_steps=warmup)
    run_ours(cfg, warmup + 1 + steps, log_every, watch, split=True)
    per_step, outliers = watch.split()
    t = cfg.train
    tokens = t.global_batch * cfg.data.seq_len
    ours_s, plain_s = min(ours), min(plain)
    return {
        "micro_batch": t.micro_batch,
        "global_batch": t.global_batch,
        "seq_len": cfg.data.seq_len,
        "tokens_per_step": tokens,
        "plain_step_s": round(plain_s, 5),
        "ours_step_s": round(ours_s, 5),
        "ratio_ours_over_plain": round(ours_s / plain_s, 3),
        "plain_repeats_s": [round(v, 5) for v in plain],
        "ours_repeats_s": [round(v, 5) for v in ours],
        "plain_tokens_per_s": round(tokens / plain_s),
        "ours_tokens_per_s": round(tokens / ours_s),
        "ours_mfu": round(out["flops_per_token"] * tokens / ours_s / out["peak_flops"], 4),
        "peak_tflops": round(out["peak_flops"] / 1e12, 3),
        "peak_source": out["peak_source"],
        "plain_split_ms": {k: round(1e3 * v, 3) for k, v in plain_parts[plain.index(plain_s)].items()},
        "ours_split_ms": {k: round(1e3 * v, 3) for k, v in per_step.items()},
        "split_outlier_steps": outliers,
    }


def size_overrides(size: str) -> list[str]:
    """'12x64' -> 12 sequences of 64 tokens per step (one micro-batch)."""
    try:
        b, t = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--sizes takes BATCHxSEQ items like 12x64, got {size!r}") from None
    if b < 1 or t < 2:
        raise ValueError(f"--sizes item {size!r} needs a batch >= 1 and a sequence >= 2")
    return [f"train.micro_batch={b}", f"train.global_batch={b}", f"data.seq_len={t}", f"model.max_seq_len={t}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides, as for python -m llm.train")
    p.add_argument("--sizes", default=None, help="comma-separated BATCHxSEQ (e.g. 12x64,16x256); default: the config")
    p.add_argument("--steps", type=int, default=40, help="measured steps per repetition (after --warmup)")
    p.add_argument("--warmup", type=int, default=10, help="steps before measuring, per repetition")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of each loop; the best median is kept")
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few steps (CI)")
    p.add_argument("--out", default=None, help="JSON path (default tools/results/bench_train_<device>.json)")
    args = p.parse_args(argv)
    sizes = args.sizes.split(",") if args.sizes else [None]
    try:
        for name in ("steps", "warmup", "repeats"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        size_args = [size_overrides(size) if size else [] for size in sizes]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.smoke:
        args.steps, args.warmup, args.repeats = 4, 2, 1
        overrides += ["model.n_layer=1", "model.n_embd=32", "train.micro_batch=2", "train.global_batch=4"]
        overrides += ["data.seq_len=32", "model.max_seq_len=32"]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "overrides": overrides,
        "runs": [],
    }
    for size in size_args:
        cfg = load_config(overrides + size)
        ensure_data(cfg.data)
        vocab = Tokenizer.load(cfg.data.tokenizer).vocab_size
        r = measure(cfg, vocab, device, args.steps, args.warmup, args.repeats, log_every=10)
        result["model"] = cfg.model.name
        result["runs"].append(r)
        print(
            f"device {result['device']}, model {cfg.model.name}, {r['global_batch']} x {r['seq_len']} = "
            f"{r['tokens_per_step']:,} tokens/step (best of {args.repeats}, median of {args.steps} steps)"
        )
        print(f"  plain PyTorch loop: {1e3 * r['plain_step_s']:8.2f} ms/step  {r['plain_tokens_per_s']:>10,} tokens/s")
        print(
            f"  ours (llm.train)  : {1e3 * r['ours_step_s']:8.2f} ms/step  {r['ours_tokens_per_s']:>10,} tokens/s  "
            f"MFU {100 * r['ours_mfu']:.1f}% of {r['peak_tflops']:.2f} TFLOP/s ({r['peak_source']})"
        )
        print(f"  ratio ours/plain  : {r['ratio_ours_over_plain']:.3f}x")
        for who in ("plain", "ours"):
            split = ", ".join(f"{k} {v:.2f}" for k, v in r[f"{who}_split_ms"].items())
            print(f"  {who} step, split (ms): {split}")
    default = ROOT / "tools/results" / f"bench_train_{result['device'].replace(' ', '_')}.json"
    write_json(args.out or default, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
