"""Benchmark the cleaning's stages and the tokenization, ours against the same stages under datatrove's defaults.

    python tools/bench_clean.py               # writes tools/results/bench_clean.json
    python tools/bench_clean.py --smoke       # tiny, ours only (CI)

Each stage runs alone, in a fresh process, on one core (one task, one worker), on the same input for both
variants; reported as MB of input text per second per core (best of --repeat; the variants alternate) and
ours/defaults. The stages:

- filters (web): language ID, Gopher repetition and quality, C4, FineWeb on prose (the docstrings of the
  standard library's modules, one document per module: English text present on every machine). Ours split
  words with RegexWords; datatrove's defaults with spaCy. Both use the same local language model (datatrove's
  default model is a download).
- filters (code): our CodeFilter on the standard library's source (datatrove has no code filters: no baseline).
- signatures: MinHash signatures of every document (prose and source). Ours: RegexWords, SHA-1; defaults:
  spaCy, xxhash.
- rest of dedup: buckets, clusters, the dedup filter and the write of what is kept.
- tokenization: the kept documents into token shards. Ours: `prepare` (SentencePiece, 1 worker); defaults:
  datatrove's DocumentTokenizer with a HuggingFace BPE of the same vocabulary size trained on the same text.

The defaults need spaCy (and xxhash < 4, which datatrove 0.10.1's default hashing calls with str), which the
project does not depend on: the first run installs them from PyPI into .bench/datatrove-defaults/ (pinned
below), a folder put ahead on the path of the benchmark's own processes only.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
from _results import write_json
from bench_data import cpu_name

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_SITE = ROOT / ".bench" / "datatrove-defaults"
# spaCy 3.8.18 and what it adds to this project's lock (`pip install --dry-run spacy`, 2026-12-05), and xxhash 3
DEFAULTS_PACKAGES = [
    "spacy==3.8.18", "spacy-legacy==3.0.12", "spacy-loggers==1.0.5", "thinc==8.3.14", "blis==1.3.4",
    "catalogue==2.0.10", "cloudpathlib==0.26.0", "confection==1.3.4", "cymem==2.0.16", "murmurhash==1.0.16",
    "preshed==3.0.15", "smart_open==9.0.4", "srsly==2.5.6", "wasabi==1.1.3", "weasel==1.0.1", "wrapt==2.5.2",
    "xxhash==3.6.0",
]  # fmt: skip
STAGES = ("filters_web", "filters_code", "signatures", "dedup_rest", "tokenize")
VOCAB = 8192


# ---- the corpus -----------------------------------------------------------------------------------------------
def docstrings(out: Path, limit: int | None) -> Path:
    """The standard library's docstrings, one JSONL document per module (prose)."""
    from llm.data.corpus import stdlib_files

    rows = []
    for path in stdlib_files()[:limit]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
        text = "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))
        if len(text) > 200:
            rows.append(json.dumps({"text": text}))
    out.mkdir(parents=True, exist_ok=True)
    (out / "docstrings.jsonl").write_text("\n".join(rows) + "\n")
    return out


def text_mb(inputs: list[str]) -> float:
    from llm.data.corpus import Corpus, CorpusStats

    return sum(len(d.encode()) for d in Corpus(inputs).documents(CorpusStats())) / 1e6


# ---- one stage, in a child process ----------------------------------------------------------------------------
def _pipeline(stage: str, variant: str, work: Path, inputs: dict) -> list[tuple[list, int]]:
    """The stage's datatrove pipelines (each with its task count), in order."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from llm.data.cleaning import CodeFilter, CorpusReader, LocalLanguageFilter, RegexWords, language_model, web_filters
    from llm.data.corpus import ReadOptions

    ours = variant == "ours"
    words = {"language": RegexWords()} if ours else {}  # datatrove's default: English, spaCy
    hashing = HashConfig(precision=64, hash_fc="sha1") if ours else HashConfig()  # default: xxhash
    minhash = MinhashConfig(hash_config=hashing)

    def read(name):
        return CorpusReader(inputs[name], ReadOptions(), str(work / "read" / stage))

    def write(folder):
        return JsonlWriter(str(work / folder), output_filename="${rank}.jsonl.zst", compression="zstd")

    if stage == "filters_web":
        filters = (
            web_filters("en", 0.65, lambda name: None)
            if ours
            else [
                LocalLanguageFilter(["en"], 0.65, language_model()),
                GopherRepetitionFilter(),
                GopherQualityFilter(),
                C4QualityFilter(filter_no_terminal_punct=False),
                FineWebQualityFilter(),
            ]
        )
        return [([read("prose"), *filters, write("web")], 1)]
    if stage == "filters_code":
        return [([read("code"), CodeFilter(), write("code")], 1)]
    if stage == "signatures":
        return [([read("all"), MinhashDedupSignature(str(work / "signatures"), minhash, **words)], 1)]
    if stage == "dedup_rest":
        return [
            ([MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=minhash)], 14),
            ([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), minhash)], 1),
            ([read("all"), MinhashDedupFilter(str(work / "remove")), write("kept")], 1),
        ]
    raise ValueError(stage)


OUTPUTS = {
    "filters_web": ["web"],
    "filters_code": ["code"],
    "signatures": ["signatures"],
    "dedup_rest": ["buckets", "remove", "kept"],
    "tokenize": ["shards", "ds"],
}


def run_stage(stage: str, variant: str, work: Path, inputs: dict) -> float:
    """Seconds the stage takes here (imports and set-up excluded), from scratch: what an earlier run of it
    wrote (its output, its completed tasks) removed first."""
    for name in [*OUTPUTS[stage], f"logs/{stage}", "logs/tok"]:
        shutil.rmtree(work / name, ignore_errors=True)
    if stage == "tokenize":
        return _tokenize(variant, work)
    from datatrove.executor import LocalPipelineExecutor

    pipelines = _pipeline(stage, variant, work, inputs)
    t0 = time.perf_counter()
    for i, (pipeline, tasks) in enumerate(pipelines):
        logs = str(work / "logs" / stage / str(i))
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=logs).run()
    return time.perf_counter() - t0


def _tokenize(variant: str, work: Path) -> float:
    if variant == "ours":
        from llm.data.prepare import PrepareConfig, prepare

        cfg = PrepareConfig([str(work / "kept")], str(work / "tok"), str(work / "shards"), workers=1)
        t0 = time.perf_counter()
        prepare(cfg, progress=False, verbose=False)
        return time.perf_counter() - t0
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    reader = JsonlReader(str(work / "kept"), compression="zstd")
    tokenizer = DocumentTokenizer(str(work / "ds"), tokenizer_name_or_path=str(work / "hf.json"), eos_token="</s>")
    t0 = time.perf_counter()
    LocalPipelineExecutor([reader, tokenizer], tasks=1, workers=1, logging_dir=str(work / "logs" / "tok")).run()
    return time.perf_counter() - t0


# ---- the parent -----------------------------------------------------------------------------------------------
def defaults_site() -> Path:
    """The folder holding spaCy and xxhash 3 for the defaults' runs (installed on the first use)."""
    if not (DEFAULTS_SITE / ".complete").is_file():
        print(f"installing datatrove's default word splitter (spaCy) and xxhash 3 into {DEFAULTS_SITE} ...")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(DEFAULTS_SITE)]
        subprocess.run([*cmd, *DEFAULTS_PACKAGES], check=True)
        (DEFAULTS_SITE / ".complete").write_text("\n".join(DEFAULTS_PACKAGES) + "\n")
    return DEFAULTS_SITE


def child(stage: str, variant: str, work: Path, inputs: dict, site: Path | None) -> float:
    one_core = {"OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env = {**os.environ, **one_core, "PYTHONPATH": os.pathsep.join(filter(None, [str(site or "")]))}
    cmd = [sys.executable, __file__, "--stage", stage, "--variant", variant, "--work", str(work)]
    r = subprocess.run([*cmd, "--inputs", json.dumps(inputs)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"error: stage {stage} ({variant}) failed:\n{r.stderr[-3000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def train_tokenizers(inputs: list[str], work: Path) -> None:
    """Ours (SentencePiece BPE) and a HuggingFace byte-level BPE, both of VOCAB pieces, on the same text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llm.data.corpus import Corpus, CorpusStats
    from llm.data.tokenizer import train_tokenizer

    train_tokenizer(inputs, work / "tok", vocab_size=VOCAB)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["</s>"], show_progress=False)
    hf.train_from_iterator(Corpus(inputs).documents(CorpusStats()), trainer)
    hf.save(str(work / "hf.json"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs of each stage and variant; the best is reported")
    p.add_argument("--smoke", action="store_true", help="a tiny corpus, one run, ours only (CI)")
    p.add_argument("--out", default=str(ROOT / "tools/results/bench_clean.json"))
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a child's one stage
    p.add_argument("--variant", choices=("ours", "defaults"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        print(run_stage(args.stage, args.variant, Path(args.work), json.loads(args.inputs)))
        return 0
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    variants = ("ours",) if args.smoke else ("ours", "defaults")
    site = None if args.smoke else defaults_site()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        code = [str(Path(sysconfig.get_paths()["stdlib"]) / "json")] if args.smoke else ["stdlib"]
        prose = [str(docstrings(tmp / "prose", 40 if args.smoke else None))]
        inputs = {"prose": prose, "code": code, "all": prose + code}
        mb = {"filters_web": text_mb(prose), "filters_code": text_mb(code)}
        mb["signatures"] = mb["dedup_rest"] = text_mb(inputs["all"])
        train_tokenizers(inputs["all"], tmp)
        stages = {}
        for stage in STAGES:
            best = {}
            for _ in range(1 if args.smoke else args.repeat):
                for variant in variants if stage != "filters_code" else ("ours",):
                    work = tmp / variant
                    work.mkdir(exist_ok=True)
                    for name in ("tok", "hf.json"):
                        if not (work / name).exists():
                            os.symlink(tmp / name, work / name)
                    seconds = child(stage, variant, work, inputs, site)
                    best[variant] = min(best.get(variant, float("inf")), seconds)
            if stage == "tokenize":
                mb[stage] = text_mb([str(tmp / "ours" / "kept")])
            stages[stage] = _row(stage, mb[stage], best)
    result = _result(stages, args, variants)
    write_json(args.out, result)
    return 0


def _row(stage: str, mb: float, best: dict) -> dict:
    if mb <= 0:
        raise SystemExit(f"error: stage {stage} had no input: nothing to measure")
    row = {"input_mb": round(mb, 2)}
    for variant, seconds in best.items():
        row[variant] = {"seconds": round(seconds, 3), "mb_per_s_per_core": round(mb / seconds, 3)}
    if "defaults" in best:
        row["ours_over_defaults"] = round(best["defaults"] / best["ours"], 2)
    speeds = ", ".join(f"{v} {row[v]['mb_per_s_per_core']:.2f} MB/s" for v in best)
    ratio = f" ({row['ours_over_defaults']:.2f}x)" if "defaults" in row else ""
    print(f"{stage:<13}: {mb:6.2f} MB; {speeds}{ratio}")
    return row


def _result(stages: dict, args, variants) -> dict:
    cleaning = ("filters_web", "signatures", "dedup_rest")
    whole = {}
    for variant in variants:
        seconds = sum(stages[s][variant]["seconds"] for s in cleaning)
        whole[variant] = {"seconds": round(seconds, 3)}
    if "defaults" in whole:
        whole["ours_over_defaults"] = round(whole["defaults"]["seconds"] / whole["ours"]["seconds"], 2)
        print(f"whole cleaning (web filters + signatures + rest of dedup): {whole['ours_over_defaults']:.2f}x")
    from importlib.metadata import version

    return {
        "machine": {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"datatrove": version("datatrove"), "defaults": None if args.smoke else DEFAULTS_PACKAGES},
        "per_core": "one task, one worker, one process per stage run; best of the runs",
        "stages": stages,
        "whole_cleaning": whole,
    }


if __name__ == "__main__":
    sys.exit(main())
