"""Downstream tasks during training (`train.eval_tasks`; docs/evaluation.md): lm-evaluation-harness tasks over
local data, checked and loaded once, then scored on the model being trained at every evaluation, on every rank
(the requests dealt to the ranks, llm/evals/harness.py: the same scores on any number of ranks).

Each evaluation is logged as `eval/<task>/<metric>` beside `val/loss` (metrics.jsonl, W&B), with its time as
`eval/tasks_s`, and written whole as the harness's results JSON, <run_dir>/evals/step_<N>.json (named as the
checkpoint of that step). The run's random generators are restored after scoring, so a run with tasks trains
exactly as one without them, and scores depend on the weights alone: a resumed run scores as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import time
from pathlib import Path

from llm.config.schema import Config, ConfigError
from llm.data.files import atomic_write
from llm.store.checkpoint import tag_for
from llm.training.rng import rng_state, set_rng_state

EVALS_DIR = "evals"


PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar's "42%|"


@contextlib.contextmanager
def quiet():
    """The harness's progress bars and its notes (its logger below ERROR) kept out of the training log; anything
    else written to stderr meanwhile (a signal's notice, a warning) is passed on after, and everything if it fails."""
    logger, captured = logging.getLogger("lm_eval"), io.StringIO()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    else:
        lines = re.split(r"[\r\n]+", captured.getvalue())
        kept = [line for line in lines if line.strip() and not PROGRESS.search(line)]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
    finally:
        logger.setLevel(level)


class DownstreamTasks:
    """The run's downstream tasks: `check` (every rank, before the run is recorded: each loads the tasks), then
    `score` at each evaluation (every rank, collectively)."""

    def __init__(self, cfg: Config, run_dir: Path):
        t = cfg.train
        self.cfg, self.names, self.limit, self.paths = cfg, list(t.eval_tasks), t.eval_task_limit, t.eval_task_paths
        self.dir = Path(run_dir) / EVALS_DIR
        self.tasks: dict | None = None
        self.seconds, self.evaluations = 0.0, 0

    def check(self) -> None:
        """Every task known and its data on this machine, generation only where each rank holds the weights;
        ConfigError (one line) otherwise."""
        try:
            from llm.evals import suite
        except ImportError:
            raise ConfigError(
                "train.eval_tasks: scoring tasks needs the eval extra (lm-eval): pip install 'llm-pretrain[eval]'"
            ) from None
        for d in self.paths:
            if not Path(d).is_dir():
                raise ConfigError(f"train.eval_task_paths: {d} is not a directory (of task YAMLs)")
        try:
            with quiet():
                self.tasks = suite.load_tasks(self.names, self.paths)
        except suite.TaskError as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None
        if self.cfg.deepspeed.stage == 3 and "generate_until" in suite.output_types(self.tasks):
            raise ConfigError(
                "train.eval_tasks: generation tasks need the whole weights on every rank (deepspeed.stage 0-2); "
                "under ZeRO-3 score them on a checkpoint with python -m llm.evaluate --tasks"
            )

    def score(self, engine, tok, device, precision, step: int, tokens_seen: int, rank: int) -> dict[str, float]:
        """The tasks' metrics on the engine's model (every rank, collectively); rank 0 writes the results JSON."""
        from llm.evals.harness import HarnessModel, partitioned
        from llm.evals.suite import metrics, score_tasks

        t0, state, module = time.perf_counter(), rng_state(), engine.module
        engine.eval()
        try:  # ZeRO-3: through the engine, whose forward gathers the partitioned weights
            model = engine if partitioned(module) else module
            with module.whole_sequences(), precision, quiet():
                lm = HarnessModel(model=model, tokenizer=tok, batch_size=self.cfg.train.micro_batch, device=device)
                results = score_tasks(lm, self.tasks, self.limit)
        finally:
            engine.train()
            set_rng_state(state)
        seconds = time.perf_counter() - t0
        self.seconds, self.evaluations = self.seconds + seconds, self.evaluations + 1
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            record = {"step": step, "tokens_seen": tokens_seen, "limit": self.limit, **results}
            text = json.dumps(record, indent=2, default=str) + "\n"
            atomic_write(self.dir / f"{tag_for(step)}.json", text.encode())
        return {**metrics(results), "eval/tasks_s": seconds}
