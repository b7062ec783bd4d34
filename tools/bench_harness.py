"""Benchmark and measure the evaluation harness on a checkpoint: our model class against the harness's `hf`
model on our export of the same weights (requests per second, same run, same tasks; their scores must agree),
and the checkpoint's task scores against the same model with random weights (the baseline).

    python tools/bench_harness.py --checkpoint runs/demo            # writes tools/results/bench_harness_cpu.json
    python tools/bench_harness.py --checkpoint runs/demo --limit 20 --smoke
    python tools/bench_harness.py --in-loop    # the demo run with the tasks on: their share of its time

--in-loop trains the demo (`python -m llm.train`, its own run directory) with `train.eval_tasks` set to the
shipped tasks and reports the time they took (eval/tasks_s, summed over its evaluations) against the whole
process's wall time (tools/results/bench_harness_in_loop_cpu.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch
from _results import write_json
from bench_data import cpu_name

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["stdlib_next_line", "stdlib_docstring", "stdlib_completion", "stdlib_rolling"]


def scores(result: dict) -> dict:
    return {
        task: {k.split(",")[0]: round(v, 4) for k, v in m.items() if isinstance(v, float) and "stderr" not in k}
        for task, m in result["results"].items()
    }


def agree(a: dict, b: dict) -> bool:
    """The same tasks and metrics; accuracies equal, perplexities within 1e-6 relative (a word perplexity is
    exp of a sum over thousands of tokens: round-off far below the scores' 1e-4 moves its 8th digit)."""
    if a.keys() != b.keys() or any(a[t].keys() != b[t].keys() for t in a):
        return False
    return all(abs(a[t][m] - b[t][m]) <= 1e-6 * max(1.0, abs(b[t][m])) for t in a for m in a[t])


def timed(model, tasks: list[str], limit: int | None) -> tuple[dict, float, int]:
    """(scores, seconds, requests) of one evaluation."""
    from llm.evals.suite import run_tasks

    calls = {"n": 0}
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        original = getattr(model, kind)

        def counted(requests, *a, _original=original, **k):
            calls["n"] += len(requests)
            return _original(requests, *a, **k)

        setattr(model, kind, counted)
    t0 = time.perf_counter()
    result = run_tasks(model, tasks, limit=limit)
    return scores(result), time.perf_counter() - t0, calls["n"]


def in_loop(args) -> int:
    """The demo run with the tasks on; their share of its wall time."""
    import json
    import subprocess

    from llm.training.metrics import read_history

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "llm.train", f"runs_dir={tmp}", "logger=none", f"train.eval_tasks=[{args.tasks}]",
            f"train.eval_task_limit={args.limit or 100}", *args.overrides,
        ]  # fmt: skip
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"error: the run failed:\n{r.stderr[-3000:]}")
        history = read_history(next(Path(tmp).glob("*/metrics.jsonl")))
    evaluations = [rec for rec in history if "eval/tasks_s" in rec]
    tasks_s = sum(rec["eval/tasks_s"] for rec in evaluations)
    result = {
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(cmd[1:]).replace(tmp, "TMP"),
        "evaluations": len(evaluations),
        "tasks_s": round(tasks_s, 1),
        "wall_s": round(wall, 1),
        "share": round(tasks_s / wall, 4),
        "last_scores": {k: v for k, v in evaluations[-1].items() if k.startswith("eval/") and k.count("/") == 2}
        if evaluations
        else {},
    }
    print(json.dumps(result, indent=2))
    write_json(args.out.replace("bench_harness_cpu", "bench_harness_in_loop_cpu"), result)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="our model only, no hf comparison")
    p.add_argument("--out", default=str(ROOT / "tools/results/bench_harness_cpu.json"))
    p.add_argument("--in-loop", action="store_true", help="the demo run with the tasks on (their share of it)")
    p.add_argument("overrides", nargs="*", help="--in-loop: settings for the run (e.g. train.max_steps=4)")
    args = p.parse_args(argv)
    if args.in_loop:
        return in_loop(args)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from llm.evals.harness import HarnessModel
    from llm.model.gpt import GPT
    from llm.store.weights import load_weights

    tasks = args.tasks.split(",")
    cfg, weights, tok, _ = load_weights(args.checkpoint)
    ours = HarnessModel(checkpoint=args.checkpoint, batch_size=args.batch_size, device="cpu")
    trained, ours_s, n = timed(ours, tasks, args.limit)
    torch.manual_seed(0)
    baseline = HarnessModel(model=GPT(cfg.model), tokenizer=tok, batch_size=args.batch_size, device="cpu")
    random_init = timed(baseline, tasks, args.limit)[0]
    result = {
        "machine": {"cpu": cpu_name(), "threads": 1, "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "checkpoint": str(args.checkpoint),
        "limit": args.limit,
        "requests": n,
        "scores": {"checkpoint": trained, "random_init": random_init},
        "ours": {"seconds": round(ours_s, 2), "requests_per_s": round(n / ours_s, 1)},
    }
    if not args.smoke:
        from lm_eval.models.huggingface import HFLM

        from llm.model.hf import write_hf

        with tempfile.TemporaryDirectory() as tmp:
            write_hf(cfg.model, weights, tok, Path(tmp) / "hf")
            hf = HFLM(
                pretrained=str(Path(tmp) / "hf"), batch_size=args.batch_size, device="cpu", prefix_token_id=tok.eos_id
            )
            hf_scores, hf_s, hf_n = timed(hf, tasks, args.limit)
        if not agree(hf_scores, trained) or hf_n != n:
            raise SystemExit(f"error: the hf model scored differently: {hf_scores} vs ours {trained}")
        result["hf"] = {"seconds": round(hf_s, 2), "requests_per_s": round(hf_n / hf_s, 1)}
        result["ours_over_hf"] = round(hf_s / ours_s, 2)
    for name, s in result["scores"].items():
        print(f"{name}: {s}")
    speed = f"ours {result['ours']['requests_per_s']} requests/s"
    if "hf" in result:
        speed += f", hf {result['hf']['requests_per_s']} requests/s: {result['ours_over_hf']}x"
    print(f"{n} requests; {speed} (one thread, {cpu_name()})")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
