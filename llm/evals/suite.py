"""Running lm-evaluation-harness tasks on our model (llm/evals/harness.py), offline: the shipped tasks
(llm/evals/tasks/, built by tools/make_eval_tasks.py) and the YAMLs of an --include-path; a task whose data
would come from the network is refused before any work, naming it and the fix.

    run_tasks(model, names, include, limit)      # once, as the harness's CLI does (its full results JSON)
    tasks = load_tasks(names, include)            # during training: the tasks loaded once,
    results = score_tasks(model, tasks, limit)    # then scored at every evaluation
    metrics(results)                              # {"eval/<task>/<metric>": value}
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "tasks"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


class TaskError(ValueError):
    """Tasks that cannot run here; one line naming the task and the fix."""


def task_manager(include: list[str] | None = None, defaults: bool = False):
    """The harness's task index over the shipped tasks, `include` directories, and (`defaults`) its own."""
    from lm_eval.tasks import TaskManager

    for d in include or []:
        if not Path(d).is_dir():
            raise TaskError(f"--include-path {d}: no such directory of task YAMLs")
    return TaskManager(include_path=[str(SHIPPED), *(include or [])], include_defaults=defaults)


def _local(config: dict, yaml_dir: Path) -> bool:
    if "custom_dataset" in config:
        return True
    path = str(config.get("dataset_path", ""))
    if path in LOCAL_BUILDERS:
        files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
        files = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
        flat = [f for v in files for f in ([v] if isinstance(v, str) else v)]
        return bool(flat) and all(Path(f).exists() or (yaml_dir / f).exists() for f in flat)
    return bool(path) and (Path(path).exists() or (yaml_dir / path).exists())


def check_offline(manager, names: list[str]) -> None:
    """Every task known and its data on this machine, the tasks of a group or tag included; TaskError otherwise."""
    for name in names:
        _check(manager, name, {}, ())


def _check(manager, name: str, overrides: dict, within: tuple[str, ...]) -> None:
    """One name: a YAML task (with a group's `overrides` of it), or a group or tag, whose tasks are checked."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    where = f" (in {' > '.join(within)})" if within else ""
    if entry is None:
        shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
        raise TaskError(
            f"unknown task {name!r}{where}; shipped: {shipped}; others come from a directory of task YAMLs "
            "(--include-path DIR, train.eval_task_paths)"
        )
    if name in within:
        raise TaskError(f"group {name} contains itself{where}")
    if name in manager.all_tags:  # a tag: every task that carries it
        for tagged in sorted(e.name for e in manager.task_index.values() if name in e.tags):
            _check(manager, tagged, {}, (*within, name))
        return
    if entry.yaml_path is None:
        raise TaskError(f"{name}{where} is defined in Python, not YAML: its data cannot be checked; name YAML tasks")
    config, here = load_yaml(entry.yaml_path, resolve_func=False, recursive=True), Path(entry.yaml_path).parent
    if name not in manager.all_groups:
        _need_local(name, {**config, **overrides}, here, where)
        return
    children = config.get("task") or []
    for child in [children] if isinstance(children, str | dict) else children:
        child_name, child_overrides = (child, {}) if isinstance(child, str) else (child.get("task"), child)
        if not isinstance(child_name, str):
            raise TaskError(f"group {name}{where}: a member without a task name: {child!r}")
        if child_name in manager.task_index:
            _check(manager, child_name, child_overrides, (*within, name))
        else:  # a task defined inside the group's YAML
            _need_local(child_name, child_overrides, here, f" (in {' > '.join((*within, name))})")


def _need_local(name: str, config: dict, yaml_dir: Path, where: str) -> None:
    if not _local(config, yaml_dir):
        raise TaskError(
            f"task {name}{where} reads its data from {config.get('dataset_path')!r}, which is not on this machine, "
            "and nothing is downloaded here: mirror the data and point a task YAML at the local files "
            "(--include-path DIR or train.eval_task_paths; docs/evaluation.md)"
        )


def run_tasks(model, names: list[str], include: list[str] | None = None, limit: int | None = None) -> dict:
    """The harness's results (its JSON-able dict) of `names` on `model` (a HarnessModel)."""
    import lm_eval

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # belt and braces: checked above already
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manager = task_manager(include)
    check_offline(manager, names)
    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit, log_samples=False)


FEWSHOT_SEED = 1234  # the harness's default seed for drawing few-shot examples


def load_tasks(names: list[str], include: list[str] | None = None) -> dict:
    """The harness's task objects of `names` (checked offline first), set up as its CLI sets them up: zero-shot
    unless a task's YAML says otherwise (score_tasks seeds their few-shot draws)."""
    manager = task_manager(include)
    check_offline(manager, names)
    loaded = manager.load(names)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return loaded


def output_types(tasks: dict) -> set[str]:
    return {task.get_config("output_type") for task in tasks["tasks"].values()}


def score_tasks(model, tasks: dict, limit: int | None) -> dict:
    """The harness's results of loaded `tasks` on `model` (no standard errors: they would cost a bootstrap). The
    few-shot samplers are seeded again first: every evaluation draws the same examples, as a fresh load would."""
    from lm_eval.evaluator import evaluate

    for task in tasks["tasks"].values():
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return evaluate(lm=model, task_dict=tasks, limit=limit, bootstrap_iters=0, log_samples=False)


def metrics(results: dict) -> dict[str, float]:
    """Each task's metrics as `eval/<task>/<metric>` (a filter other than none appended: `<metric>_<filter>`)."""
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, filtered = key.split(",", 1)
            if not metric.endswith("_stderr"):
                out[f"eval/{task}/{metric if filtered == 'none' else f'{metric}_{filtered}'}"] = float(value)
    return out
