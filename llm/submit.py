"""Submit a pretraining or fine-tuning job (task=sft|classify: slurm/finetune.sbatch) to Slurm after checking it,
or only show what would run:

    python -m llm.submit --dry-run --nodes=2 experiment=gpt2-124m deepspeed=zero3 name=my-run
    python -m llm.submit --nodes=2 --gpus-per-node=8 --qos=high experiment=gpt2-124m name=my-run

Arguments that start with `--` are sbatch options (`--nodes`, `--gpus-per-node` and `--time` are known here;
anything else goes to sbatch unchanged); the rest are the run's Hydra overrides, passed to the job unchanged.
A bad override or setting (including one that only fails at the job's world size, nodes x GPUs per node) is
rejected here in one line, before anything is queued. `--dry-run` prints the resolved config, the generated
DeepSpeed JSON and the sbatch command line; otherwise the job is submitted with its log in the run directory
(<run_dir>/slurm-<job id>.out) and its id printed.

    python -m llm.submit --job-check [overrides]   # in a job script, before srun

checks the same inside a job, at its world size (SLURM_NTASKS), and writes a token into the run directory
for every node to look for (a node that does not see it does not share the run directory); prints its path.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from llm.config.compose import load_config, run_dir_of
from llm.config.schema import ConfigError, validate
from llm.parallel.distributed import deepspeed_config
from llm.store.storage import StorageError, check_writable, storage_error
from llm.training.outcome import CODES

SCRIPTS = Path(__file__).resolve().parent.parent / "slurm"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    p = argparse.ArgumentParser(prog="python -m llm.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print what would run; queue nothing")
    p.add_argument("--job-check", action="store_true", help="in a job script: check, write the shared-directory token")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="also the tasks per node (one task per GPU)")
    p.add_argument("--time", default=None, help="the job's time limit (sbatch --time)")
    args, rest = p.parse_known_args(argv)
    sbatch_extra = [a for a in rest if a.startswith("--")]
    overrides = [a for a in rest if not a.startswith("--")]
    if args.nodes < 1 or args.gpus_per_node < 1:
        p.error("--nodes and --gpus-per-node must be at least 1")
    return args, sbatch_extra, overrides


def sbatch_command(
    args: argparse.Namespace, extra: list[str], overrides: list[str], run_dir: Path, task: str = "pretrain"
) -> list[str]:
    cmd = [
        "sbatch",
        "--parsable",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={args.gpus_per_node}",
        f"--gpus-per-node={args.gpus_per_node}",
        f"--output={run_dir / 'slurm-%j.out'}",
    ]
    if args.time:
        cmd.append(f"--time={args.time}")
    script = SCRIPTS / ("pretrain.sbatch" if task == "pretrain" else "finetune.sbatch")
    return [*cmd, *extra, str(script), *overrides]


def job_check(overrides: list[str]) -> None:
    world = int(os.environ.get("SLURM_NTASKS", "1"))
    try:
        cfg = load_config(overrides)
        validate(cfg, world_size=world, cuda=True)  # whether the nodes have GPUs, the training itself checks
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    e = os.environ
    name = f"shared.{e.get('SLURM_JOB_ID')}.{e.get('SLURM_RESTART_COUNT', 0)}"
    token = run_dir_of(cfg).resolve() / "rendezvous" / name
    try:
        check_writable(token.parent)
        token.write_text(e.get("SLURMD_NODENAME", ""))
    except (StorageError, OSError) as problem:
        problem = problem if isinstance(problem, StorageError) else storage_error(token, problem) or problem
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(CODES["storage"])
    print(token)


def main(argv: list[str] | None = None) -> None:
    args, extra, overrides = parse(list(sys.argv[1:] if argv is None else argv))
    if args.job_check:
        job_check(overrides)
        return
    world = args.nodes * args.gpus_per_node
    try:
        cfg = load_config(overrides)
        validate(cfg, world_size=world, cuda=True)  # the job runs on GPUs
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run_dir = run_dir_of(cfg).resolve()
    cmd = sbatch_command(args, extra, overrides, run_dir, cfg.task)
    if args.dry_run:
        print(f"# resolved config ({world} ranks: {args.nodes} node(s) x {args.gpus_per_node} GPU(s))")
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        print("# DeepSpeed JSON (written to the run directory when the job starts)")
        print(json.dumps(deepspeed_config(cfg, world), indent=2))
        print("# sbatch command")
        print(shlex.join(cmd))
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"error: sbatch failed: {r.stderr.strip()}", file=sys.stderr)
        sys.exit(r.returncode)
    job = r.stdout.strip().split(";")[0]
    print(f"submitted job {job}: log {run_dir / f'slurm-{job}.out'}, run directory {run_dir}")


if __name__ == "__main__":
    main()
