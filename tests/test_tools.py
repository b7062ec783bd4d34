"""The command-line tools as a user runs them: exit codes, one-line errors, outputs."""

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm.kernels.cross_entropy import linear_cross_entropy_ref
from llm.kernels.norm import layer_norm_ref, rms_norm_ref

ROOT = Path(__file__).resolve().parent.parent


def tool(name, *args):
    """tools/NAME, or the command `python -m llm.NAME` for a name without .py"""
    script = [str(ROOT / "tools" / name)] if name.endswith(".py") else ["-m", f"llm.{name}"]
    return subprocess.run([sys.executable, *script, *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_train_tokenizer_then_prepare_then_verify(tmp_path, corpus_dir):
    r = tool("data.train_tokenizer", "--input", corpus_dir, "--vocab-size", 400, "--output", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / "tok" / "tokenizer.model").is_file()
    r = tool(
        "data.prepare_data",
        "--input",
        corpus_dir,
        "--tokenizer",
        tmp_path / "tok",
        "--output",
        tmp_path / "out",
        "--workers",
        2,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "300 documents" in r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["command"][1:] == [
        "--input",
        str(corpus_dir),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--output",
        str(tmp_path / "out"),
        "--workers",
        "2",
        "--no-progress",
    ]
    r = tool("data.prepare_data", "--verify", tmp_path / "out")
    assert r.returncode == 0 and r.stdout.startswith("ok")

    shard = tmp_path / "out" / "train_00000.bin"
    shard.write_bytes(b"\x01\x00" + shard.read_bytes()[2:])
    r = tool("data.prepare_data", "--verify", tmp_path / "out")
    assert r.returncode == 1
    assert "BAD train shard train_00000.bin: sha256" in r.stderr


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("data.train_tokenizer", ["--input", "/nonexistent/x", "--output", "o"], "input path does not exist"),
        ("data.prepare_data", ["--verify", "/nonexistent/d"], "data directory does not exist"),
        (
            "data.prepare_data",
            ["--input", "stdlib", "--tokenizer", "/nonexistent/t", "--output", "o"],
            "tokenizer file missing",
        ),
        ("bench_train.py", ["--sizes", "12by64"], "--sizes takes BATCHxSEQ items like 12x64"),
        ("bench_train.py", ["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_input_gives_one_error_line(name, args, message):
    r = tool(name, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_prepare_without_inputs_shows_usage():
    r = tool("data.prepare_data", "--output", "x")
    assert r.returncode == 2 and "missing --input, --tokenizer" in r.stderr


def test_bench_data_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = tool("bench_data.py", "--smoke", "--out", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["tokenizer_training"]["seconds"] > 0 and result["tokenizer_training"]["peak_rss_mb"] > 10
    assert result["prepare_1_worker"]["tokens_per_s"] > 0 and result["prepare_speedup"] > 0
    assert result["dataset_reads"]["tokens_per_s"] > 0
    assert "dataset reads" in r.stdout
    formats = result["corpus_formats"]["formats"]
    assert set(formats) == {"jsonl", "jsonl.gz", "jsonl.zst", "parquet"}
    assert all(f["text_mb_per_s"] > 0 for f in formats.values())
    assert formats["jsonl.zst"]["file_mb"] < formats["jsonl"]["file_mb"]


@pytest.mark.slow
def test_bench_clean_smoke(tmp_path):
    pytest.importorskip("datatrove")
    out = tmp_path / "bench.json"
    r = tool("bench_clean.py", "--smoke", "--out", out)
    assert r.returncode == 0, r.stderr
    stages = json.loads(out.read_text())["stages"]
    assert list(stages) == ["filters_web", "filters_code", "signatures", "dedup_rest", "tokenize"]
    for name, row in stages.items():  # every stage ran on input of its own, and took time
        assert row["input_mb"] > 0 and row["ours"]["seconds"] > 0, (name, row)
    assert stages["tokenize"]["input_mb"] <= stages["dedup_rest"]["input_mb"]  # what the dedup kept
    assert "tokenize" in r.stdout


def test_bench_sequence_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = tool("bench_sequence.py", "--smoke", "--out", out)
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"1", "2", "4"} and runs["1"]["exchange_share"] == 0
    assert (
        runs["4"]["activation_mb_per_rank"] < runs["2"]["activation_mb_per_rank"] < runs["1"]["activation_mb_per_rank"]
    )
    assert all(0 < runs[n]["exchange_share"] < 1 for n in ("2", "4"))


def test_bench_train_smoke(tmp_path, prepared_dir, tokenizer_dir):
    out = tmp_path / "bench.json"
    r = tool(
        "bench_train.py",
        "--smoke",
        "--sizes",
        "2x32",
        "--out",
        out,
        f"data.paths=[{prepared_dir}]",
        f"data.tokenizer={tokenizer_dir}",
        "data.prepare_if_missing=false",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["ours_step_s"] > 0 and run["plain_step_s"] > 0 and run["ratio_ours_over_plain"] > 0
    assert run["ours_mfu"] > 0 and run["peak_source"].startswith("measured")
    split = run["ours_split_ms"]
    assert {"data", "forward", "backward", "decision", "optimizer", "deepspeed step", "other"} <= set(split)
    assert all(v > 0 for k, v in split.items() if k not in ("other", "logging"))
    assert set(run["plain_split_ms"]) == {"forward+backward", "clip", "optimizer"}
    assert "ratio ours/plain" in r.stdout and "ours step, split (ms)" in r.stdout


@pytest.mark.slow
def test_bench_checkpoint_smoke(tmp_path, prepared_dir, tokenizer_dir):
    out = tmp_path / "bench.json"
    data = [f"data.paths=[{prepared_dir}]", f"data.tokenizer={tokenizer_dir}", "data.prepare_if_missing=false"]
    r = tool("bench_checkpoint.py", "--smoke", "--out", out, *data)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["zero_stage"] == 1 and row["world_size"] == 1 and row["params"] > 100_000
    assert 15 < row["bytes_per_param"] < 17  # fp32 weights, master copy and two Adam moments
    assert len(row["save_s"]) == 2 and all(x > 0 for x in row["save_s"]) and row["load_s"] > 0
    assert row["disk_write_s"] > 0 and row["disk_read_s"] > 0


def test_bench_generate_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = tool("bench_generate.py", "--smoke", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["new_tokens"] == 32 and row["same_tokens"] is True
    assert row["cached_tokens_per_s"] > 0 and row["recompute_tokens_per_s"] > 0


def test_bench_loss_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = tool("bench_loss.py", "--smoke", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    plain, fused = result["rows"]
    assert (plain["fused_loss"], fused["fused_loss"]) == (False, True)
    assert result["loss_difference"] < 1e-4 and plain["first_loss"] > 5  # the same model and batch: ~ln(4000)
    assert all(row["step_s"] > 0 and row["step_peak_bytes"] > 0 for row in result["rows"])


@pytest.mark.slow
def test_bench_kernels_smoke(tmp_path):
    r = tool("bench_kernels.py", "--smoke", "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    impls = {(row["op"], row["impl"]) for row in result["rows"]}
    assert {("attention", "ours"), ("attention", "sdpa_math"), ("layer_norm", "ours"), ("rms_norm", "torch")} <= impls
    paths = {(row["path"], row["impl"]): row for row in result["rows"] if row["op"] == "attention_paths"}
    assert {("gqa", "ours"), ("gqa", "sdpa"), ("docs", "ours"), ("docs", "sdpa_mask")} <= set(paths)
    assert 0 < paths["docs", "ours"]["visible_fraction"] < 1 and paths["docs", "ours"]["vs_causal"] > 0
    assert all(row["ms"] > 0 and row["fraction_of_ceiling"] > 0 for row in result["rows"])
    assert result["ceilings"]["matmul_tflops"] > 0 and result["ceilings"]["copy_gbs"] > 0
    assert {"results.csv", "attention_d32.png", "norms.png"} <= {p.name for p in tmp_path.iterdir()}


def tools_module(name: str):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "tools"))


def test_the_liger_baselines_compute_what_ours_do(monkeypatch):
    # Liger-Kernel is GPU-only and no dependency: its functional API (the signatures of liger-kernel 0.8) stands
    # in as PyTorch, so that what the wrappers pass and return is checked against our references
    fake = types.ModuleType("liger_kernel.transformers.functional")
    fake.liger_layer_norm = lambda X, W, B, eps: F.layer_norm(X, X.shape[-1:], W, B, eps)
    fake.liger_rms_norm = lambda X, W, eps: rms_norm_ref(X, W, eps)
    fake.liger_fused_add_rms_norm = lambda X, R, W, eps: (rms_norm_ref(X + R, W, eps), X + R)
    fake.liger_fused_linear_cross_entropy = lambda input, weight, target, ignore_index=-100: F.cross_entropy(
        input @ weight.T, target, ignore_index=ignore_index
    )
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", fake)
    liger = tools_module("_liger")
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    for got, expected in (
        (liger.layer_norm(x, w), layer_norm_ref(x, w)),
        (liger.layer_norm(x, w, b, residual=r), layer_norm_ref(x, w, b, residual=r)),
        (liger.rms_norm(x, w), rms_norm_ref(x, w)),
        (liger.rms_norm(x, w, residual=r), rms_norm_ref(x, w, residual=r)),
    ):
        for a, e in zip(*((got, expected) if isinstance(got, tuple) else ((got,), (expected,))), strict=True):
            torch.testing.assert_close(a, e)
    h, head = torch.randn(12, 32, generator=g), torch.randn(40, 32, generator=g)  # 40 rows: 30 real, 10 padding
    targets = torch.randint(0, 30, (12,), generator=g)
    targets[:3] = -100
    torch.testing.assert_close(
        liger.linear_cross_entropy(h, head, targets, 30, -100), linear_cross_entropy_ref(h, head, targets, 30, -100)
    )
    assert liger.missing() in (None, "liger-kernel's kernels need a CUDA GPU")


def test_tune_attention_picks_the_least_total_and_variants_only_when_clearly_faster():
    choose = tools_module("tune_attention").choose
    a, b, c = (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2)
    ms = {  # (causal, docs) -> {config: ms}; c fails to launch with documents
        (True, False): {a: 10.0, b: 8.0, c: 7.9},
        (True, True): {a: 6.0, b: 7.0},
        (False, False): {a: 20.0, b: 15.0, c: 14.5},
    }
    rows = [
        {"kind": "fwd", "bucket": 128, "causal": k[0], "docs": k[1], "config": cfg, "ms": t}
        for k, at in ms.items()
        for cfg, t in at.items()
    ]
    shared, variants = choose(rows)
    assert shared == {("fwd", 128): b}  # least total over the variants it launched in (c: not in all)
    assert variants == {("fwd", 128, True, True): a}  # 6.0 < 7.0 / 1.05; c's 1% gains are no reason


@pytest.mark.slow
def test_tune_attention_smoke(tmp_path):
    r = tool("tune_attention.py", "--smoke", "--compile-jobs", 2, "--out", tmp_path / "tune.json")
    assert r.returncode == 0, r.stderr[-2000:]
    # every candidate pass run once in the compiling processes before the timing
    assert "compiled 18 candidate passes in 2 processes" in r.stdout and "(0 failed)" in r.stdout, r.stdout
    result = json.loads((tmp_path / "tune.json").read_text())
    kinds = {(row["kind"], row["causal"], row["docs"]) for row in result["rows"]}
    assert kinds == {(k, c, d) for k in ("fwd", "dkdv", "dq") for c, d in ((True, False), (True, True), (False, False))}
    assert {e["kind"] for e in result["shared"]} == {"fwd", "dkdv", "dq"} and all(r["ms"] > 0 for r in result["rows"])
    assert "CONFIGS['fwd']" in r.stdout
    bad = tool("tune_attention.py", "--seq", 0)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --seq 0 must be at least 1"
    bad = tool("tune_attention.py", "--compile-jobs", -1)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --compile-jobs -1 must be 0 or more"


def test_gpu_check_runs_every_step_and_reports_each_failure(tmp_path):
    # a stand-in GPU machine: nvidia-smi names a GPU, the Python interpreter records each call and fails the
    # kernel benchmark: every later step must still run, and the failure be reported at the end
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU'\n")
    log = tmp_path / "calls"
    (tmp_path / "python").write_text(
        f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *bench_kernels.py*) exit 3;; esac\nexit 0\n'
    )
    for f in ("nvidia-smi", "python"):
        (tmp_path / f).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": str(tmp_path / "python")}
    r = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh")], env=env, capture_output=True, text=True)
    calls = log.read_text()
    assert r.returncode == 1 and "FAILED: kernel benchmark (exit 3)" in r.stderr, r.stdout + r.stderr
    for later in ("tune_attention.py", "bench_loss.py", "bench_train.py model=gpt2-124m", "model=gpt2-350m"):
        assert later in calls, calls
    assert r.stderr.count("FAILED") == 1 and "all steps passed" not in r.stdout


def test_gpu_check_runs_the_steps_asked_for(tmp_path):
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU'\n")
    log = tmp_path / "calls"
    (tmp_path / "python").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit 0\n')
    for f in ("nvidia-smi", "python"):
        (tmp_path / f).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": str(tmp_path / "python")}
    r = subprocess.run(
        ["bash", str(ROOT / "tools/gpu_check.sh"), "kernels", "loss"], env=env, capture_output=True, text=True
    )
    calls = log.read_text()
    assert r.returncode == 0 and "all steps passed (kernels loss)" in r.stdout, r.stdout + r.stderr
    assert "bench_kernels.py" in calls and "bench_loss.py" in calls, calls
    assert not any(other in calls for other in ("pytest", "tune_attention.py", "bench_train.py")), calls
    assert "== kernel benchmark: 0 s" in r.stdout  # each step's wall time
    bad = subprocess.run(
        ["bash", str(ROOT / "tools/gpu_check.sh"), "kernels", "bench"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: unknown step 'bench'; the steps are: tests tune kernels loss train"
    )


def test_gpu_check_installs_the_carried_wheels_where_the_image_lacks_deepspeed(tmp_path):
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU'\n")
    log = tmp_path / "calls"
    (tmp_path / "python").write_text(  # the image without deepspeed: that import fails
        f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *"import deepspeed"*) exit 1;; esac\nexit 0\n'
    )
    for f in ("nvidia-smi", "python"):
        (tmp_path / f).chmod(0o755)
    (tmp_path / "whl").mkdir()
    (tmp_path / "whl" / "deepspeed-0.19.8-py3-none-any.whl").write_bytes(b"")
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": str(tmp_path / "python"), "GPU_WHEELS": str(tmp_path / "whl")}
    r = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "loss"], env=env, capture_output=True, text=True)
    calls = log.read_text().splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    install = next(c for c in calls if c.startswith("-m pip install"))
    assert "--no-index --no-deps" in install and install.endswith(f"{tmp_path}/whl/deepspeed-0.19.8-py3-none-any.whl")
    assert "tools/check_lock.py --overlap --report" in calls
