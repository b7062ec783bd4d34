"""Rank-0 reporting: a console progress bar, <run_dir>/metrics.jsonl, and Weights & Biases; MFU.

Every record goes to metrics.jsonl (one JSON object per logged step, the same keys as W&B), so a run can be
inspected without W&B. W&B runs offline by default (files under <run_dir>/wandb; `wandb sync` uploads them
later), online when configured, or not at all; its run id is kept in checkpoints so a resumed run
continues the same W&B run.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from llm.config import LoggerConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device name fragment.
GPU_PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def device_peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for MFU."""
    if override_tflops:
        return override_tflops * 1e12, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 dense spec"
        return 0.0, f"unknown GPU {name}"
    return measure_matmul_flops(), "measured fp32 matmul on this CPU"


def measure_matmul_flops(n: int = 1024, repeats: int = 5, trials: int = 5) -> float:
    """The best of `trials` timings of a fp32 n x n matmul (a CPU has no spec sheet peak to quote)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * repeats / best


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


class MetricsLogger:
    """Does nothing on ranks other than 0."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        rank: int,
        run_id: str,
        run_name: str,
        config: dict,
        total_steps: int,
        start_step: int,
    ):
        self.enabled = rank == 0
        self.wandb_run = None
        if not self.enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self._drop_records_after(start_step)
        self.file = open(self.path, "a")
        if cfg.wandb:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                id=run_id,
                resume="allow",
                mode=cfg.mode,
                dir=str(run_dir),
                config=config,
                settings=wandb.Settings(silent=True, console="off"),
            )
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None,
        )

    def _drop_records_after(self, step: int) -> None:
        """On resume, forget records of steps after the checkpoint (they will be redone)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        shown = {
            "loss": "train/loss",
            "lr": "train/lr",
            "tok/s": "perf/tokens_per_s",
            "mfu": "perf/mfu",
            "val": "val/loss",
        }
        post = {}
        for short, key in shown.items():
            if key in metrics:
                v = metrics[key]
                post[short] = f"{v:.3g}" if short != "mfu" else f"{100 * v:.1f}%"
        self.bar.set_postfix(post, refresh=False)
        if self.bar.disable:  # no terminal (a batch job's log): one line per record instead of a bar
            print(f"step {step}: " + " ".join(f"{k}={v}" for k, v in post.items()), file=sys.stderr, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def print(self, msg: str) -> None:
        if self.enabled:
            self.bar.write(msg, file=sys.stderr)
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
