"""Benchmark the data pipeline: tokenizer training, shard preparation (1 worker vs all cores), dataset reads.

    python tools/bench_data.py                 # the stdlib corpus; writes tools/results/bench_data.json
    python tools/bench_data.py --smoke         # tiny, for CI

Reports tokenizer-training time and peak memory (measured in a child process), preparation throughput
(MB/s of input, tokens/s; best of --repeat runs) with 1 worker and with every core plus their ratio, and
the packed dataset's read throughput (tokens/s on one core) for seq_len x batch, and the corpus reader's
throughput per input format (the same documents as JSONL, .jsonl.gz, .jsonl.zst and Parquet: MB of text per
second on one core, best of --repeat, and the files' size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch
from _results import write_json

from llm.data.corpus import Corpus, CorpusStats
from llm.data.dataset import BatchLoader, open_windows
from llm.data.prepare import PrepareConfig, prepare
from llm.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_tokenizer(inputs: list[str], vocab: int, out: Path) -> dict:
    """Train in a child process so that its peak RSS is the tokenizer's alone."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "llm.data.train_tokenizer", "--input", *inputs]
    cmd += ["--vocab-size", str(vocab), "--output", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1), "vocab_size": vocab}


def bench_prepare(inputs: list[str], tok: Path, out: Path, workers: int, repeat: int) -> dict:
    """The best of `repeat` full preparations into fresh directories."""
    seconds = float("inf")
    for i in range(repeat):
        t0 = time.perf_counter()
        cfg = PrepareConfig(inputs=inputs, tokenizer=str(tok), output=str(out / str(i)), workers=workers)
        manifest = prepare(cfg, progress=False, verbose=False)
        seconds = min(seconds, time.perf_counter() - t0)
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    mb = manifest["stats"]["bytes"] / 1e6
    return {
        "workers": workers,
        "seconds": round(seconds, 2),
        "mb_per_s": round(mb / seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "tokens": tokens,
        "input_mb": round(mb, 1),
    }


def bench_reads(data: Path, seq_len: int, batch: int, seconds: float) -> dict:
    torch.set_num_threads(1)
    windows = open_windows([data], "train", seq_len, seed=0)
    tok_eos = json.loads((data / "manifest.json").read_text())["tokenizer"]["eos_id"]
    loader = BatchLoader(windows, global_batch=batch, micro_batch=batch, eos_id=tok_eos)
    next(loader)  # warm the page cache and the permutation
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(loader)
        n += 1
    elapsed = time.perf_counter() - t0
    return {
        "seq_len": seq_len,
        "batch": batch,
        "batches": n,
        "tokens_per_s": round(n * batch * seq_len / elapsed),
        "windows_per_epoch": windows.n,
    }


def bench_formats(inputs: list[str], out: Path, repeat: int) -> dict:
    """Write the corpus's documents in each format, then time reading them all back (Corpus.documents)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = list(Corpus(inputs).documents(CorpusStats()))
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    out.mkdir(parents=True, exist_ok=True)
    (out / "c.jsonl").write_bytes(data)
    (out / "c.jsonl.gz").write_bytes(gzip.compress(data, compresslevel=6))
    (out / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    pq.write_table(pa.table({"text": docs}), out / "c.parquet", row_group_size=1024, compression="zstd")
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    result = {}
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        seconds = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = sum(1 for _ in Corpus([str(out / name)]).documents(CorpusStats()))
            seconds = min(seconds, time.perf_counter() - t0)
        assert n == len(docs), (name, n, len(docs))
        result[name[2:]] = {
            "seconds": round(seconds, 3),
            "text_mb_per_s": round(text_mb / seconds, 1),
            "file_mb": round((out / name).stat().st_size / 1e6, 2),
        }
    return {"documents": len(docs), "text_mb": round(text_mb, 1), "formats": result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=["stdlib"])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--read-seconds", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=3, help="preparation runs per setting; the best is reported")
    p.add_argument("--smoke", action="store_true", help="a tiny corpus and short runs (CI)")
    p.add_argument("--out", default=str(ROOT / "tools/results/bench_data.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.input = [str(Path(sysconfig.get_paths()["stdlib"]) / "json")]
        args.vocab_size, args.seq_len, args.batch, args.read_seconds, args.repeat = 400, 64, 4, 0.2, 1

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = bench_tokenizer(args.input, args.vocab_size, tmp / "tok")
        Tokenizer.load(tmp / "tok")
        one = bench_prepare(args.input, tmp / "tok", tmp / "one", 1, args.repeat)
        many = bench_prepare(args.input, tmp / "tok", tmp / "many", cores, args.repeat)
        reads = bench_reads(tmp / "many" / "0", args.seq_len, args.batch, args.read_seconds)
        formats = bench_formats(args.input, tmp / "formats", args.repeat)
    result = {
        "machine": {
            "cpu_cores": cores,
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
        "inputs": args.input,
        "tokenizer_training": tok,
        "prepare_1_worker": one,
        f"prepare_{cores}_workers": many,
        "prepare_speedup": round(one["seconds"] / many["seconds"], 2),
        "dataset_reads": reads,
        "corpus_formats": formats,
    }
    print(f"machine: {cpu_name()}, {cores} cores, {platform.platform()}")
    print(
        f"tokenizer training : {tok['seconds']:.1f} s, peak RSS {tok['peak_rss_mb']:.0f} MB (vocab {tok['vocab_size']})"
    )
    for r in (one, many):
        print(
            f"prepare, {r['workers']} worker(s): {r['mb_per_s']:.2f} MB/s, {r['tokens_per_s']:,} tokens/s "
            f"({r['input_mb']} MB in {r['seconds']} s)"
        )
    print(f"prepare speedup    : {result['prepare_speedup']:.2f}x with {cores} workers")
    print(
        f"dataset reads      : {reads['tokens_per_s'] / 1e6:.1f} M tokens/s "
        f"(seq_len {reads['seq_len']} x batch {reads['batch']}, one core)"
    )
    for name, r in formats["formats"].items():
        print(
            f"read {name:<11}: {r['text_mb_per_s']:.1f} MB/s of text (one core), file {r['file_mb']} MB "
            f"for {formats['text_mb']} MB of text"
        )
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
