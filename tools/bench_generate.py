"""Benchmark generation: new tokens per second with the KV cache against recomputing the whole sequence for
every new token (the same model, prompt, seed and greedy choices, in the same run).

    python tools/bench_generate.py                               # the demo model and gpt2-124m (random weights)
    python tools/bench_generate.py --models tiny --new-tokens 256
    python tools/bench_generate.py --smoke                       # seconds, for CI

Random weights are enough: the work per token does not depend on the values. Greedy decoding with EOS
ignored, so both paths produce exactly the requested number of tokens (and the same ones, which is checked).
Results go to tools/results/bench_generate_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import _bootstrap  # noqa: F401
import torch
import yaml
from _results import write_json

from llm.config.schema import ModelConfig
from llm.model.generation import Sampling, generate
from llm.model.gpt import GPT

ROOT = Path(__file__).resolve().parent.parent


def model_config(name: str, context: int) -> ModelConfig:
    values = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()) or {}  # tiny: the defaults
    cfg = ModelConfig(**values)
    return replace(cfg, vocab_size=cfg.vocab_size or 8192, max_seq_len=max(cfg.max_seq_len, context))


def timed(model: GPT, prompt: list[int], s: Sampling, use_cache: bool) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = generate(model, [prompt], s, eos_id=None, use_cache=use_cache)[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "gpt2-124m"])
    p.add_argument("--new-tokens", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="the tiny model, 32 new tokens (CI)")
    p.add_argument("--out", default=None, help="JSON path (default tools/results/bench_generate_<device>.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.new_tokens = ["tiny"], [32]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        cfg = model_config(name, args.prompt_tokens + max(args.new_tokens))
        model = GPT(cfg).to(device).eval()
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,)).tolist()
        generate(model, [prompt], Sampling(max_new_tokens=4, temperature=0))  # warm-up
        for n in args.new_tokens:
            s = Sampling(max_new_tokens=n, temperature=0, stop_at_eos=False)
            cached_s, cached = timed(model, prompt, s, True)
            full_s, full = timed(model, prompt, s, False)
            row = {
                "model": name,
                "params": model.num_params(),
                "context": cfg.max_seq_len,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": n,
                "cached_tokens_per_s": round(n / cached_s, 1),
                "recompute_tokens_per_s": round(n / full_s, 1),
                "speedup": round(full_s / cached_s, 2),
                "same_tokens": cached == full,
            }
            rows.append(row)
            print(
                f"{name:10s} {n:5d} new tokens: cache {row['cached_tokens_per_s']:8.1f} tok/s, recompute "
                f"{row['recompute_tokens_per_s']:8.1f} tok/s, speed-up {row['speedup']:.1f}x, same tokens: "
                f"{row['same_tokens']}",
                flush=True,
            )
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    out = args.out or ROOT / "tools" / "results" / f"bench_generate_{'cuda' if device.type == 'cuda' else 'cpu'}.json"
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
