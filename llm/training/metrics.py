"""Rank-0 reporting: a console progress bar, <run_dir>/metrics.jsonl, and Weights & Biases; MFU.

Every record goes to metrics.jsonl (one JSON object per logged step, the same keys as W&B), so a run can be
inspected without W&B; the file is only ever appended to, and `read_history` reads it as the run's history.
W&B runs offline by default (files under <run_dir>/wandb; `wandb sync` uploads them later), online when
configured, or not at all; its run id is kept in checkpoints so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from llm.config.schema import LoggerConfig
from llm.store.storage import storage_error

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' spec sheets, by a fragment of the
# device name; the longest matching fragment wins (an "H100 PCIe" must not take the SXM "H100" entry).
GPU_PEAK_BF16 = [
    ("H100", 989.4, "H100 SXM"),
    ("H100 PCIe", 756.0, "H100 PCIe"),
    ("H100 NVL", 835.0, "H100 NVL"),
    ("H200", 989.4, "H200 SXM"),
    ("H200 NVL", 835.0, "H200 NVL"),
    ("GH200", 989.4, "GH200"),
    ("B200", 2250.0, "B200"),
    ("A100", 312.0, "A100 (40 GB and 80 GB)"),
    ("L40S", 362.05, "L40S"),
    ("L40", 181.05, "L40"),
    ("A10G", 70.0, "A10G"),
    ("L4", 121.0, "L4"),
]


def gpu_peak(name: str) -> tuple[float, str] | None:
    """(peak FLOP/s, table entry) for a CUDA device name, or None when the table does not know it."""
    for fragment, tflops, label in sorted(GPU_PEAK_BF16, key=lambda e: -len(e[0])):
        if fragment in name:
            return tflops * 1e12, label
    return None


def measure_matmul_flops(n: int = 1024, repeats: int = 5, trials: int = 5) -> float:
    """The best of `trials` timings of a fp32 n x n matmul (a CPU has no spec sheet peak to quote). Its inputs come
    from a generator of its own: drawing from the run's would change its dropout after a resume, which measures
    again at other steps than the uninterrupted run."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * repeats / best


class DevicePeak:
    """The peak FLOP/s that MFU divides by, and where it comes from: `train.peak_tflops` when set, the GPU
    table for a known GPU, else (a CPU) a measured fp32 matmul. A measurement at start-up can fall on a busy
    moment (data preparation or the W&B service finishing), so a measured peak is measured again at the first
    few logging steps and whenever the run goes faster than it, keeping the best; it never stays below what
    the run achieved, so MFU never exceeds 100%."""

    REMEASURES = 3

    def __init__(self, device: torch.device, override_tflops: float | None):
        self.measured, self.remeasures = False, self.REMEASURES
        if override_tflops:
            self.flops, self.source = override_tflops * 1e12, "train.peak_tflops"
        elif device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            known = gpu_peak(name)
            self.flops, self.source = (known[0], f"{known[1]} bf16 dense spec") if known else (0.0, f"unknown {name}")
        else:
            self.flops, self.source, self.measured = measure_matmul_flops(), "measured fp32 matmul on this CPU", True

    def mfu(self, achieved_flops: float) -> float:
        """Model FLOP/s utilisation of one device; 0 when the peak is unknown (set train.peak_tflops)."""
        if not self.flops:
            return 0.0
        if self.measured and (self.remeasures > 0 or achieved_flops > self.flops):
            self.remeasures -= 1
            self.flops = max(self.flops, measure_matmul_flops(), achieved_flops)
        return achieved_flops / self.flops


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
        start_info: dict | None = None,
    ):
        start_info = start_info or {}
        self.enabled = rank == 0
        self.wandb_run = None
        if not self.enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        torn = end_torn_line(self.path)
        self.file = open(self.path, "a")
        self._write({"step": start_step, "event": "start", "time": time.time(), **start_info})
        if torn:
            print(f"{self.path}: its last line was cut short (a full disk?): ended it; it is skipped", file=sys.stderr)
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

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}}
        self._write(record)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        shown = {
            "loss": "train/loss",
            "lr": "train/lr",
            "tok/s": "perf/tokens_per_s",
            "mfu": "perf/mfu",
            "val": "val/loss",
            "acc": "val/accuracy",
            "f1": "val/macro_f1",
        }
        post = {}
        for short, key in shown.items():
            if key in metrics:
                v = metrics[key]
                post[short] = f"{v:.3g}" if short != "mfu" else f"{100 * v:.1f}%"
        if not post:  # e.g. a checkpoint's save time: in metrics.jsonl and W&B only
            return
        self.bar.set_postfix(post, refresh=False)
        if self.bar.disable:  # no terminal (a batch job's log): one line per record instead of a bar
            print(f"step {step}: " + " ".join(f"{k}={v}" for k, v in post.items()), file=sys.stderr, flush=True)

    def _write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise storage_error(self.path, e) or e from None

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


def end_torn_line(path: Path) -> bool:
    """End a last line that a write cut short (a full disk, a killed process), so that the next record starts a
    line of its own; True if there was one."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return False
        fh.write(b"\n")
    return True


def read_history(path: str | Path) -> list[dict]:
    """The records of metrics.jsonl as the run's history. The file is only ever appended to; every start of
    the training writes an `"event": "start"` record at the step it starts from, which supersedes records of
    later steps written before it (by an attempt that died after its last checkpoint). A line that is not a
    whole record (a write cut short) is skipped, with a warning naming it."""
    history: list[dict] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            warnings.warn(f"{path}:{n}: skipped a line that is not a whole record: {line[:40]!r}", stacklevel=2)
            continue
        if record.get("event") == "start":
            history = [r for r in history if r["step"] <= record["step"]]
        else:
            history.append(record)
    return history
