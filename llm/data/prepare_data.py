"""Tokenize a corpus into packed token shards, or verify prepared shards.

    python -m llm.data.prepare_data --input stdlib --tokenizer data/tok --output data/stdlib
    python -m llm.data.prepare_data --verify data/stdlib

Rerunning an interrupted command resumes it; the manifest is written last, so a directory without
manifest.json is never mistaken for a complete dataset.

On a Slurm cluster, the same command with --slurm --tasks N tokenizes in N array tasks and writes the shards and
manifest in a final job, byte-identical to the preparation here (llm/data/prepare_cluster.py); rerun the command
to follow the run.
"""

from __future__ import annotations

import argparse
import os
import sys

from llm.data.corpus import CorpusError
from llm.data.prepare import PrepareConfig, prepare
from llm.data.shards import ShardError, verify
from llm.data.slurm_stages import SlurmOptions
from llm.data.tokenizer import TokenizerError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llm.data.prepare_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--verify", metavar="OUT", help="re-check every shard of OUT against its manifest and exit")
    p.add_argument("--input", nargs="+", help="files, directories, globs, or 'stdlib'")
    p.add_argument("--tokenizer", help="directory holding tokenizer.model and tokenizer.json")
    p.add_argument("--output", help="output directory for the shards and manifest.json")
    p.add_argument("--val-fraction", type=float, default=0.005)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (about)")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed JSONL lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("Slurm (tokenize in array tasks, then write the shards; rerun the command to follow)")
    s.add_argument("--slurm", action="store_true", help="submit the preparation to Slurm instead of running it here")
    s.add_argument("--tasks", type=int, default=8, help="array tasks that tokenize (the output does not depend on it)")
    s.add_argument("--partition", default=None, help="default: the cluster's default partition")
    s.add_argument("--time", default="4:00:00", help="each task's time limit")
    s.add_argument("--cpus-per-task", type=int, default=8, help="tokenizing processes per task")
    s.add_argument("--mem-per-cpu-gb", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)

    if args.verify:
        try:
            problems = verify(args.verify)
        except ShardError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for line in problems:
            print(f"BAD {line}", file=sys.stderr)
        if problems:
            print(f"error: {len(problems)} bad shard(s) in {args.verify}; re-prepare the data", file=sys.stderr)
            return 1
        print(f"ok: every shard of {args.verify} matches its manifest")
        return 0

    missing = [f"--{n}" for n in ("input", "tokenizer", "output") if not getattr(args, n)]
    if missing:
        p.error(f"missing {', '.join(missing)} (or use --verify OUT)")
    cfg = PrepareConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        output=args.output,
        val_fraction=args.val_fraction,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        dtype=args.dtype,
        text_field=args.text_field,
        skip_bad_lines=args.skip_bad_lines,
    )
    try:
        if args.slurm:
            slurm = SlurmOptions(args.partition, args.time, args.cpus_per_task, args.mem_per_cpu_gb)
            return _on_slurm(cfg, args.tasks, slurm)
        prepare(cfg, progress=not args.no_progress, command=sys.argv)
    except (CorpusError, ShardError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _on_slurm(cfg: PrepareConfig, tasks: int, slurm: SlurmOptions) -> int:
    try:
        from llm.data.prepare_cluster import prepare_on_slurm
    except ImportError:
        print("error: --slurm needs the data extra: pip install 'llm-pretrain[data]' (datatrove)", file=sys.stderr)
        return 2
    state, result = prepare_on_slurm(cfg, tasks, slurm, command=sys.argv)
    if state == "running":
        print(f"still running: jobs {', '.join(result)}; run the same command when they end")
    elif state == "submitted":
        print(
            f"submitted jobs {', '.join(result)}; run the same command when they end: it reports the dataset, or "
            "resubmits the tasks that did not finish (a failed task cancels the shards job)"
        )
    else:
        splits = result["splits"]
        print(
            f"wrote {cfg.output}: train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} "
            f"tokens; check it with python -m llm.data.prepare_data --verify {cfg.output}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
