"""Clean a raw corpus before tokenizing it: the profile's quality filters, then MinHash near-duplicate removal,
with datatrove (the `data` extra) running the stages.

    python -m llm.data.clean --input PATH [PATH ...] --output DIR [--profile web|code|none] [--tasks N]

--output DIR then holds exactly the kept documents, as JSONL.zst that `python -m llm.data.prepare_data
--input DIR` reads; everything else the run writes goes beside it, in DIR.clean/: the stages' work files and
logs, the removed documents with --keep-removed (removed/<filter>/, removed/duplicates/), and summary.json
(documents in and out of every stage, dropped per filter and reason, the duplicate clusters' sizes, the
settings and tool versions; the counts are checked to add up). Rerunning the same command resumes: finished
tasks are skipped.

Profiles: `web`: FineWeb's chain (language ID with a local fastText model, Gopher repetition and quality, C4's
line rules, FineWeb's own; llm/data/cleaning.py: web_filters); `code`: source-code heuristics of the kind The
Stack / StarCoder's data used (CodeRules); `none`: near-duplicate removal only. Which copy of a near-duplicate
cluster survives depends on the task count, so the summary records it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llm.data.corpus import CorpusError, ReadOptions, cleaning_record, jsonl_rows, resolve_inputs
from llm.data.files import atomic_write_json
from llm.data.slurm_stages import (
    SlurmOptions,
    SlurmStageError,
    check_slurm,
    completed,
    job_prefix,
    queued,
    slurm_executor,
)

PROFILES = ("web", "code", "none")
EXTRA = "the data extra is not installed: pip install 'llm-pretrain[data]' (datatrove)"


class CleanError(ValueError):
    """A cleaning run that cannot start or did not finish; the message says why and what to do."""


@dataclass(frozen=True)
class CleanConfig:
    inputs: list[str]
    output: str
    profile: str = "code"
    tasks: int = 2  # tasks of the reading stages (and of the filter that must reread as they read)
    workers: int = 2  # tasks run at once
    keep_removed: bool = False
    language: str = "en"  # web: the language kept (an ISO 639-1 code fastText's lid.176 knows)
    language_threshold: float = 0.65  # web: the lowest score of that language that keeps a document
    text_field: str = "text"
    skip_bad_lines: bool = False
    n_grams: int = 5  # MinHash: words per shingle
    num_buckets: int = 14  # bands
    hashes_per_bucket: int = 8  # rows per band: ~0.87 detection at Jaccard 0.78, ~1.0 above 0.88

    @property
    def work(self) -> Path:
        return cleaning_record(self.output)


def check(cfg: CleanConfig) -> None:
    """Every setting and input, before any work; CleanError names the problem and the fix."""
    if cfg.profile not in PROFILES:
        raise CleanError(f"unknown --profile {cfg.profile!r}; choose one of {', '.join(PROFILES)}")
    if not 0 <= cfg.language_threshold < 1:
        raise CleanError(f"--language-threshold must be in [0, 1) (got {cfg.language_threshold})")
    for name in ("tasks", "workers"):
        if getattr(cfg, name) < 1:
            raise CleanError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    resolve_inputs(cfg.inputs)  # CorpusError names a missing input
    out = Path(cfg.output)
    if out.is_dir() and any(out.iterdir()) and not cfg.work.is_dir():  # not an earlier run of this command
        raise CleanError(f"--output {out} holds files this command did not write; choose an empty or new directory")
    try:
        import datatrove  # noqa: F401
        import orjson  # noqa: F401

        if cfg.profile == "web":
            from llm.data.cleaning import known_languages, language_model

            if not language_model().is_file():
                raise ImportError("lid.176.ftz")
            known = known_languages()
    except ImportError:
        raise CleanError(EXTRA) from None
    if cfg.profile == "web" and cfg.language not in known:
        raise CleanError(f"unknown --language {cfg.language!r}; the language model knows {', '.join(known)}")


def _stages(cfg: CleanConfig, slurm: SlurmOptions | None = None):
    """The datatrove executors, each depending on the one before: filter -> signatures -> buckets -> clusters ->
    dedup (running the last one runs or submits them all)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from llm.data.cleaning import CodeFilter, CorpusReader, RegexWords, TaskFileReader, web_filters

    work, opts = cfg.work, ReadOptions(cfg.text_field, cfg.skip_bad_lines)
    minhash = MinhashConfig(
        n_grams=cfg.n_grams,
        num_buckets=cfg.num_buckets,
        hashes_per_bucket=cfg.hashes_per_bucket,
        hash_config=HashConfig(precision=64, hash_fc="sha1"),  # datatrove's xxhash path needs xxhash<4
    )

    def writer(folder) -> JsonlWriter:  # zstd: unlike gzip's header, its frames hold no time, so reruns are equal
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl.zst", compression="zstd")

    removed = (lambda name: writer(work / "removed" / name)) if cfg.keep_removed else (lambda name: None)
    filters = {
        "web": lambda: web_filters(cfg.language, cfg.language_threshold, removed),
        "code": lambda: [CodeFilter(exclusion_writer=removed("code"))],
        "none": lambda: [],
    }[cfg.profile]()
    filtered = str(work / "filtered")
    reader = CorpusReader(cfg.inputs, opts, str(work / "corpus"))
    signatures = MinhashDedupSignature(str(work / "signatures"), minhash, language=RegexWords())
    buckets = MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=minhash)
    clusters = MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), minhash, save_cluster_size=True)
    dedup = MinhashDedupFilter(str(work / "remove"), removed("duplicates"))
    plan = [
        ("filter", cfg.tasks, [reader, *filters, writer(filtered)]),
        ("signatures", cfg.tasks, [TaskFileReader(filtered), signatures]),
        ("buckets", cfg.num_buckets, [buckets]),
        ("clusters", 1, [clusters]),
        ("dedup", cfg.tasks, [TaskFileReader(filtered), dedup, writer(cfg.output)]),
    ]
    executor = None
    for name, tasks, pipeline in plan:
        logs, workers = work / "logs" / name, min(cfg.workers, tasks)
        if slurm is None:
            executor = LocalPipelineExecutor(pipeline, tasks, workers, logging_dir=str(logs), depends=executor)
        else:
            name = f"{job_prefix('clean', cfg.output)}-{name}"
            executor = slurm_executor(pipeline, tasks, workers, logs, name, slurm, executor)
    return executor


STAGES = ("filter", "signatures", "buckets", "clusters", "dedup")


def _stats(work: Path, stage: str) -> list[dict]:
    """A finished stage's counters, step by step, summed over its tasks' statistics files (logs/<stage>/stats/:
    datatrove's merged stats.json lost the counters of a multi-task stage in its Slurm merge job)."""
    steps: list[dict] = []
    for path in sorted((work / "logs" / stage / "stats").glob("*.json")):
        for i, step in enumerate(json.loads(path.read_text())):
            if i == len(steps):
                steps.append({})
            for k, v in step["stats"].items():
                if not isinstance(v, dict):
                    steps[i][k] = steps[i].get(k, 0) + v
    return steps


def _kept(output: Path) -> int:
    """The documents in the output."""
    return sum(1 for path in sorted(output.glob("*.jsonl.zst")) for _ in jsonl_rows(path))


def _clusters(work: Path, kept: int) -> tuple[int, dict[int, int]]:
    """(documents removed as near-duplicates, the survivors counted by the size of their cluster), from the
    cluster stage's files: NNNNNN.remove lists task N's removed documents, NNNNNN.sizes every clustered
    document's cluster size."""
    import numpy as np

    folder = work / "remove"
    removed = {int(p.stem): set(np.fromfile(p, dtype="<u4").tolist()) for p in folder.glob("*.remove")}
    sizes = {}
    for p in sorted(folder.glob("*.sizes")):
        for doc, size in np.fromfile(p, dtype="<u4").reshape(-1, 2).tolist():
            if doc not in removed.get(int(p.stem), ()):
                sizes[size] = sizes.get(size, 0) + 1
    survivors = {1: kept - sum(sizes.values()), **sizes}
    return sum(len(r) for r in removed.values()), dict(sorted(survivors.items()))


def _model(cfg: CleanConfig) -> dict:
    """The language ID model a web run used: its file and sha256."""
    if cfg.profile != "web":
        return {}
    import hashlib

    from llm.data.cleaning import language_model

    path = language_model()
    return {"language_model": {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}


def summarize(cfg: CleanConfig) -> dict:
    """What every stage took in and let through, checked to add up (CleanError if not)."""
    from importlib.metadata import version

    work = cfg.work
    read = {}
    for path in sorted((work / "corpus").glob("*.json")):
        for k, v in json.loads(path.read_text()).items():
            read[k] = read.get(k, 0) + v
    filtered = _stats(work, "filter")
    dropped = {}
    for step in filtered[1:-1]:
        reasons = {k.removeprefix("dropped_"): v for k, v in step.items() if k.startswith("dropped_")}
        if step.get("dropped", 0) > sum(reasons.values()):  # a filter that gives no reason for some
            reasons["unspecified"] = step["dropped"] - sum(reasons.values())
        for reason, n in reasons.items():
            dropped[reason] = dropped.get(reason, 0) + n
    after_filters = filtered[-1].get("total", 0)
    dedup = _stats(work, "dedup")[1]
    kept = _kept(Path(cfg.output))
    listed, clusters = _clusters(work, kept)
    summary = {
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("output", "workers")},
        "versions": {"datatrove": version("datatrove"), "llm-pretrain": version("llm-pretrain"), **_model(cfg)},
        "read": read,
        "dropped_by_filter": dropped,
        "after_filters": after_filters,
        "duplicates_removed": dedup.get("dropped", 0),
        "kept": kept,
        "cluster_sizes": clusters,  # survivors by the size of their near-duplicate cluster (1: unique)
    }
    sums = {
        "read = kept by filters + dropped": read.get("documents", 0) == after_filters + sum(dropped.values()),
        "after filters = duplicates removed + kept": after_filters == summary["duplicates_removed"] + kept,
        "duplicates removed = those the clusters listed": summary["duplicates_removed"] == listed,
        "duplicates removed = sum of (cluster size - 1)": listed == sum((size - 1) * n for size, n in clusters.items()),
    }
    wrong = [name for name, ok in sums.items() if not ok]
    if wrong:
        raise CleanError(f"the counts do not add up ({'; '.join(wrong)}): see {work / 'logs'}")
    return summary


def _pin(cfg: CleanConfig) -> None:
    """Record what this run cleans (the settings and every input file's size and mtime) at its first start;
    refuse a rerun that would resume it with other inputs or settings: its finished tasks read the old ones."""
    from llm.data.corpus import Corpus

    plan = {"settings": asdict(cfg) | {"workers": None}, "files": Corpus(cfg.inputs).fingerprint()}
    path = cfg.work / "plan.json"
    if not path.is_file():
        cfg.work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, plan)
    elif json.loads(path.read_text()) != json.loads(json.dumps(plan)):
        raise CleanError(
            f"the inputs or settings differ from those this run started with ({path}); rerun with those, or "
            f"delete {cfg.output} and {cfg.work} to start over"
        )


def clean(cfg: CleanConfig) -> dict:
    """Run (or resume) the cleaning here; write and return the summary."""
    check(cfg)
    _pin(cfg)
    try:
        _stages(cfg).run()
    except Exception as e:
        raise _failed(cfg, e) from None
    summary = summarize(cfg)
    atomic_write_json(cfg.work / "summary.json", summary)
    return summary


def _failed(cfg: CleanConfig, e: Exception) -> CleanError:
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    return CleanError(
        f"a cleaning task failed ({type(e).__name__}: {reason}); its log is under {cfg.work / 'logs'}; fix the "
        "cause and rerun the same command (finished tasks are kept)"
    )


def _finished(cfg: CleanConfig) -> bool:
    """Every task of every stage done."""
    tasks = {"buckets": cfg.num_buckets, "clusters": 1}
    return all(completed(cfg.work / "logs" / name) >= tasks.get(name, cfg.tasks) for name in STAGES)


def clean_on_slurm(cfg: CleanConfig, slurm: SlurmOptions) -> tuple[str, dict | list[str]]:
    """One step of a cleaning on Slurm: ("running", job ids) while this run's jobs are queued; ("done", summary)
    once every stage finished; else ("submitted", job ids) for the stages' tasks not finished yet."""
    check(cfg)
    check_slurm(slurm)
    _pin(cfg)
    if jobs := queued(job_prefix("clean", cfg.output)):
        return "running", jobs
    if _finished(cfg):
        summary = summarize(cfg)
        atomic_write_json(cfg.work / "summary.json", summary)
        return "done", summary
    try:
        _stages(cfg, slurm).run()
    except Exception as e:
        raise _failed(cfg, e) from None
    return "submitted", queued(job_prefix("clean", cfg.output))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llm.data.clean", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", required=True, help="files, directories, globs, or 'stdlib'")
    p.add_argument("--output", required=True, help="directory for the kept documents (JSONL.zst)")
    p.add_argument("--profile", default="code", help=f"filters before near-dedup: {' or '.join(PROFILES)}")
    p.add_argument("--tasks", type=int, default=2, help="tasks of the reading stages (survivors depend on it)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tasks run at once")
    p.add_argument("--keep-removed", action="store_true", help="keep removed documents in DIR.clean/removed/")
    p.add_argument("--language", default="en", help="web: the language to keep (ISO 639-1)")
    p.add_argument("--language-threshold", type=float, default=0.65, help="web: its lowest score kept")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed JSONL lines")
    s = p.add_argument_group("Slurm (the stages as array jobs; rerun the command to follow them)")
    s.add_argument("--slurm", action="store_true", help="submit the stages to Slurm instead of running them here")
    s.add_argument("--partition", default=None, help="default: the cluster's default partition")
    s.add_argument("--time", default="4:00:00", help="each array task's time limit")
    s.add_argument("--cpus-per-task", type=int, default=1)
    s.add_argument("--mem-per-cpu-gb", type=int, default=2)
    return p


def _print(cfg: CleanConfig, state: str, result) -> None:
    if state == "running":
        print(f"still running: jobs {', '.join(result)}; run the same command when they end")
    elif state == "submitted":
        print(
            f"submitted jobs {', '.join(result)}; run the same command when they end: it writes the summary, or "
            "resubmits the tasks that did not finish (a failed stage cancels the stages after it)"
        )
    else:
        dropped = ", ".join(f"{n:,} {reason}" for reason, n in result["dropped_by_filter"].items()) or "none"
        print(
            f"wrote {cfg.output}: kept {result['kept']:,} of {result['read']['documents']:,} documents; filters "
            f"dropped {dropped}; {result['duplicates_removed']:,} near-duplicates removed; summary in "
            f"{cfg.work / 'summary.json'}"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = CleanConfig(
        args.input, args.output, args.profile, args.tasks, args.workers, args.keep_removed, args.language,
        args.language_threshold, args.text_field, args.skip_bad_lines,
    )  # fmt: skip
    try:
        if args.slurm:
            slurm = SlurmOptions(args.partition, args.time, args.cpus_per_task, args.mem_per_cpu_gb)
            state, result = clean_on_slurm(cfg, slurm)
        else:
            state, result = "done", clean(cfg)
    except (CleanError, CorpusError, SlurmStageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print(cfg, state, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
