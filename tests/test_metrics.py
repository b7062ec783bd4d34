"""MFU's peak (GPU table, configured, measured on a CPU and never below what the run achieves) and the
append-only metrics history."""

import json

import pytest
import torch

import llm.training.metrics as metrics
from llm.training.metrics import DevicePeak, gpu_peak, read_history


@pytest.mark.parametrize(
    "name, tflops, entry",
    [
        ("NVIDIA H100 80GB HBM3", 989.4, "H100 SXM"),
        ("NVIDIA H100 PCIe", 756.0, "H100 PCIe"),
        ("NVIDIA H100 NVL", 835.0, "H100 NVL"),
        ("NVIDIA H200", 989.4, "H200 SXM"),
        ("NVIDIA H200 NVL", 835.0, "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", 312.0, "A100 (40 GB and 80 GB)"),
        ("NVIDIA A100-PCIE-40GB", 312.0, "A100 (40 GB and 80 GB)"),
        ("NVIDIA L40S", 362.05, "L40S"),
        ("NVIDIA L40", 181.05, "L40"),
        ("NVIDIA L4", 121.0, "L4"),
        ("NVIDIA B200", 2250.0, "B200"),
    ],
)
def test_gpu_peaks_come_from_the_device_name(name, tflops, entry):
    assert gpu_peak(name) == (tflops * 1e12, entry)


def test_an_unknown_gpu_has_no_peak_and_a_configured_peak_wins(monkeypatch):
    assert gpu_peak("NVIDIA GeForce GTX 1080") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    unknown = DevicePeak(torch.device("cuda", 0), None)
    assert unknown.flops == 0 and unknown.mfu(1e12) == 0.0 and "unknown" in unknown.source
    configured = DevicePeak(torch.device("cuda", 0), 100.0)
    assert configured.flops == 100e12 and configured.source == "train.peak_tflops" and configured.mfu(50e12) == 0.5


def test_a_cpu_peak_measured_at_a_busy_moment_never_gives_mfu_above_one(monkeypatch):
    measurements = iter([1e9, 4e9, 2e9, 2e9])  # busy at start-up, then the real speed at the first log steps
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda: next(measurements))
    peak = DevicePeak(torch.device("cpu"), None)
    assert peak.flops == 1e9 and peak.source == "measured fp32 matmul on this CPU"
    assert [peak.mfu(1e9) for _ in range(4)] == [0.25] * 4 and peak.flops == 4e9  # the best of the first few
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda: 5e9)
    assert peak.mfu(4.5e9) == 4.5e9 / 5e9  # faster than the peak: measured again
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda: 4e9)
    assert peak.mfu(6e9) == 1.0  # still faster: the peak is at least what the run achieved


def test_history_supersedes_rows_after_each_restart(tmp_path):
    rows = [
        {"step": 0, "event": "start"},
        *({"step": s, "train/loss": 10.0 - s} for s in (1, 2, 3, 4)),
        {"step": 2, "event": "start"},  # resumed from step 2: the first attempt's 3 and 4 are superseded
        *({"step": s, "train/loss": 20.0 - s} for s in (3, 4, 5)),
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r["step"], r["train/loss"]) for r in read_history(path)] == [(1, 9), (2, 8), (3, 17), (4, 16), (5, 15)]
