"""`python -m llm.outcome`: how a run's newest launch ended, as one line and its exit code, whatever launched it.

    python -m llm.outcome [--since EPOCH_SECONDS] [--run-dir DIR | the run's overrides ...]

A job script runs it after the launcher (`--since` the launch's start time, so an older launch's records are
never mistaken for this one's) and decides on its code (`llm/training/outcome.py: OUTCOMES`).
"""

from __future__ import annotations

import argparse
import sys

from llm.config.compose import load_config, run_dir_of, run_dir_problem
from llm.config.schema import ConfigError
from llm.training.outcome import CODES, summarize, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llm.outcome",
        description="Print how a run ended and exit with its code.",
        epilog=table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--since", type=float, help="ignore records of launches started before this Unix time")
    parser.add_argument("--run-dir", help="the run directory (default: from the overrides, as llm.train finds it)")
    parser.add_argument("overrides", nargs="*", help="the run's Hydra overrides (to find its run directory)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir
    if run_dir is None:  # the overrides fail here as they failed the training (neither leaves a record)
        try:
            cfg = load_config(args.overrides)
            problem = run_dir_problem(cfg)
        except ConfigError as e:
            problem = str(e)
        if problem:
            print(f"bad_input: {problem}")
            sys.exit(CODES["bad_input"])
        run_dir = run_dir_of(cfg)
    code, line = summarize(run_dir, args.since)
    print(line)
    sys.exit(code)


if __name__ == "__main__":
    main()
