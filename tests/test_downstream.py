"""Downstream tasks during training (train.eval_tasks, llm/training/downstream.py): scored at every evaluation,
logged as eval/<task>/<metric>, written as the harness's results JSON per evaluation, plotted over steps; the
scores are those of the checkpoint saved at that step, a run trains the same with or without them, a resumed run
scores as the uninterrupted one, and on two ranks (ZeRO-3, sequence parallel) as one process on the same weights."""

import json

import pytest

pytest.importorskip("lm_eval")

from helpers import one_thread, records  # noqa: E402

from llm.config.schema import ConfigError  # noqa: E402
from llm.train import train  # noqa: E402

TASKS = ["stdlib_next_line", "stdlib_docstring", "stdlib_completion", "stdlib_rolling"]
LIMIT = 4
# a 2-rank ZeRO-3 + sequence-parallel run's in-loop scores against one process on its saved checkpoint: measured
# 2.5e-9 relative on bits per byte, 1.2e-7 on word perplexity (the exponential of a sum over ~16k bytes; 2026-12-05,
# CPU); a wrong weight or a lost window moves them by percents
SHARDED_RTOL = 1e-6
# in-loop scores in bf16 (autocast at ZeRO-0, bf16 weights at ZeRO-1) against the fp32 checkpoint: measured at
# most 4.3e-6 relative on bits per byte and byte perplexity (averages over ~16k bytes; 2026-12-05, CPU)
BF16_RTOL = 2e-5
KEYS = [
    "eval/stdlib_next_line/acc", "eval/stdlib_docstring/acc", "eval/stdlib_docstring/acc_norm",
    "eval/stdlib_completion/exact_match", "eval/stdlib_rolling/bits_per_byte", "eval/stdlib_rolling/word_perplexity",
]  # fmt: skip


def with_tasks(cfg_factory, name, tasks=TASKS, **train):
    settings = {"eval_tasks": list(tasks), "eval_task_limit": LIMIT, "max_steps": 8, "eval_every": 4, **train}
    return cfg_factory(name, model={"dropout": 0.1}, train=settings)  # dropout: the run's generators matter


def scores(run_dir) -> dict[int, dict[str, float]]:
    by_step = {}
    for key in KEYS:
        for step, value in records(run_dir, key).items():
            by_step.setdefault(step, {})[key] = value
    return by_step


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_dir, tokenizer_dir):
    """Three runs of 8 steps: with the tasks, the same resumed after step 4, and without the tasks."""
    from helpers import make_cfg

    tmp = tmp_path_factory.mktemp("downstream")
    factory = lambda name, **sections: make_cfg(tmp, prepared_dir, tokenizer_dir, name, **sections)  # noqa: E731
    whole = train(with_tasks(factory, "whole"))
    train(with_tasks(factory, "split", steps_per_run=4))
    split = train(with_tasks(factory, "split"))
    plain = train(factory("plain", model={"dropout": 0.1}, train={"max_steps": 8, "eval_every": 4}))
    return whole, split, plain


def test_scores_are_logged_written_and_plotted_at_every_evaluation(runs):
    from pathlib import Path

    from llm.training.scores_plot import score_series

    whole = Path(runs[0]["run_dir"])
    logged = scores(whole)
    assert sorted(logged) == [4, 8] and all(len(v) == len(KEYS) for v in logged.values())
    for step, values in logged.items():
        written = json.loads((whole / "evals" / f"step_{step:08d}.json").read_text())
        assert written["step"] == step and written["limit"] == LIMIT
        for key, value in values.items():
            _, task, metric = key.split("/")
            assert written["results"][task][f"{metric},none"] == value and written["results"][task]["sample_len"] == 4
    assert all(r > 0 for r in records(whole, "eval/tasks_s").values())
    png = whole / "evals" / "scores.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from llm.training.metrics import read_history

    panels = score_series(read_history(whole / "metrics.jsonl"))
    assert panels["stdlib_next_line"]["acc"] == ([4, 8], [logged[4][KEYS[0]], logged[8][KEYS[0]]])
    assert panels["val"]["loss"][0] == [4, 8] and "word_perplexity" in panels["stdlib_rolling (perplexity)"]


def test_the_scores_are_the_checkpoints_scores_at_that_step(runs, tokenizer_dir):
    from pathlib import Path

    from llm.evals.harness import HarnessModel
    from llm.evals.suite import load_tasks, metrics, score_tasks
    from llm.store.weights import load_model

    whole = Path(runs[0]["run_dir"])
    for step in (4, 8):
        _, model, tok = load_model(str(whole / "checkpoints" / f"step_{step:08d}"), "cpu")
        got = metrics(score_tasks(HarnessModel(model=model, tokenizer=tok, batch_size=4), load_tasks(TASKS), LIMIT))
        assert {k: got[k] for k in KEYS} == scores(whole)[step]  # the same model, the same batches: bitwise


def test_a_run_trains_the_same_with_the_tasks_and_a_resumed_run_scores_the_same(runs):
    whole, split, plain = (r["run_dir"] for r in runs)
    assert records(whole) == records(plain)  # train losses, bitwise: the tasks leave the run's generators as they were
    assert records(whole, "val/loss") == records(plain, "val/loss")
    assert scores(split) == scores(whole)
    assert len(set(records(whole, "eval/stdlib_rolling/bits_per_byte").values())) == 2  # the weights did move


@pytest.mark.parametrize(
    "tasks, train_extra, ds, message",
    [
        (["no_such_task"], {}, {}, "train.eval_tasks: unknown task 'no_such_task'; shipped: stdlib_completion, "),
        (["stdlib_rolling"], {"eval_task_paths": ["missing-dir"]}, {}, "train.eval_task_paths: "),
        (
            ["stdlib_completion"], {}, {"stage": 3},
            "train.eval_tasks: generation tasks need the whole weights on every rank (deepspeed.stage 0-2)",
        ),
    ],
    ids=["unknown", "no-dir", "generation-under-zero3"],
)  # fmt: skip
def test_tasks_that_cannot_run_are_refused_before_any_work(cfg_factory, tmp_path, tasks, train_extra, ds, message):
    unbuilt = tmp_path / "data-to-build"  # the run would build its data here first (from the stdlib)
    data = {"paths": [str(unbuilt)], "prepare_if_missing": True}
    cfg = cfg_factory("refused", train={"eval_tasks": tasks, **train_extra}, deepspeed=ds, data=data)
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    from pathlib import Path

    run_dir = Path(cfg.runs_dir) / "refused"  # nothing recorded: no run.json, config, tokenizer, metrics
    assert [p for p in run_dir.rglob("*") if p.is_file()] == [], list(run_dir.rglob("*"))
    assert not unbuilt.exists()  # refused before the data was built


def test_two_ranks_zero3_and_sequence_parallel_score_as_one_process(tmp_path, prepared_dir, tokenizer_dir):
    from launch import launch, overrides

    from llm.evals.harness import HarnessModel
    from llm.evals.suite import load_tasks, metrics, score_tasks
    from llm.store.weights import load_model

    tasks = ["stdlib_next_line", "stdlib_rolling"]  # log-likelihoods: what ZeRO-3 can score in lockstep
    args = overrides(
        tmp_path, prepared_dir, tokenizer_dir, "sp", "deepspeed=zero3", "parallel.sequence=2", "train.max_steps=4",
        "train.eval_every=4", "train.ckpt_every_steps=4", f"train.eval_tasks=[{','.join(tasks)}]",
        f"train.eval_task_limit={LIMIT}", "train.collective_timeout_s=60",  # (every weight partitioned: launch.py)
    )  # fmt: skip
    launch(args, nproc=2)
    run = tmp_path / "runs" / "sp"
    logged = {k: v for k, v in records_at(run, 4).items() if k.startswith("eval/") and k != "eval/tasks_s"}
    assert len(logged) == 4, logged
    _, model, tok = load_model(str(run / "checkpoints" / "step_00000004"), "cpu")
    with one_thread():  # as the launched ranks
        want = metrics(score_tasks(HarnessModel(model=model, tokenizer=tok, batch_size=4), load_tasks(tasks), LIMIT))
    assert logged == pytest.approx({k: want[k] for k in logged}, rel=SHARDED_RTOL)


def records_at(run_dir, step: int) -> dict:
    from llm.training.metrics import read_history

    merged = {}
    for r in read_history(run_dir / "metrics.jsonl"):
        if r["step"] == step:
            merged.update(r)
    return merged


def test_zero3_ranks_run_the_same_number_of_forwards_with_unequal_shares(tmp_path, tokenizer_dir):
    # each forward gathers the partitioned weights from every rank: a rank with fewer batches would leave the
    # other waiting in a gather (here: the run hangs, then the timeout fails it)
    import subprocess
    import sys
    from pathlib import Path

    from launch import ROOT, environment, free_port

    out = tmp_path / "scores.json"
    worker = Path(__file__).resolve().parent / "zero3_harness_worker.py"
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    r = subprocess.run(
        [*run, str(worker), str(out), str(tokenizer_dir)], capture_output=True, text=True, cwd=ROOT,
        env=environment(), timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads(out.read_text())
    assert len(scores["sharded"]) == 9 and all(s[0] < -1 for s in scores["sharded"])
    assert scores["sharded"] == scores["alone"]  # bitwise (measured): the same batches on the same weights


def test_few_shot_examples_are_the_same_at_every_evaluation(tmp_path, tokenizer_dir):
    from llm.evals.suite import load_tasks, score_tasks

    copy_shipped(tmp_path, "stdlib_next_line", "next_line_2shot", "num_fewshot: 2\n")
    lm = tiny_harness_model(tokenizer_dir)
    tasks = load_tasks(["next_line_2shot"], [str(tmp_path)])
    task = tasks["tasks"]["next_line_2shot"]

    def contexts():
        score_tasks(lm, tasks, 3)
        return [instance.args[0] for instance in task.instances]

    first, second = contexts(), contexts()
    assert first == second and first[0].count("\n") > 16  # two examples of eight lines each before the question


def test_the_plot_command_redraws_a_runs_scores_and_refuses_a_directory_without_history(runs, tmp_path):
    from pathlib import Path

    from launch import run_module

    whole = Path(runs[0]["run_dir"])
    png = whole / "evals" / "scores.png"
    png.unlink()
    r = run_module("llm.evaluate", "--plot", whole)
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {png}" and png.stat().st_size > 10_000, r.stderr
    r = run_module("llm.evaluate", "--plot", tmp_path)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path} has no metrics.jsonl: name a run directory\n"


@pytest.mark.parametrize("stage", [0, 1])
def test_tasks_score_in_bf16_as_the_fp32_checkpoint_within_bf16_round_off(cfg_factory, stage):
    # ZeRO-0: autocast over fp32 weights; ZeRO-1: bf16 weights (DeepSpeed's bf16 engine), generation included
    from pathlib import Path

    from llm.evals.harness import HarnessModel
    from llm.evals.suite import load_tasks, metrics, score_tasks
    from llm.store.weights import load_model

    settings = {"eval_tasks": TASKS, "eval_task_limit": 2, "max_steps": 2, "eval_every": 0, "ckpt_every_steps": 2}
    out = train(cfg_factory(f"bf16-{stage}", deepspeed={"stage": stage, "precision": "bf16"}, train=settings))
    logged = records_at(Path(out["run_dir"]), 2)
    _, model, tok = load_model(str(Path(out["run_dir"]) / "checkpoints" / "step_00000002"), "cpu")  # fp32 weights
    want = metrics(score_tasks(HarnessModel(model=model.float(), tokenizer=tok, batch_size=4), load_tasks(TASKS), 2))
    assert set(want) <= set(logged)
    for key in ("eval/stdlib_rolling/bits_per_byte", "eval/stdlib_rolling/byte_perplexity"):
        assert logged[key] == pytest.approx(want[key], rel=BF16_RTOL), key


def test_a_group_and_a_tag_expand_to_their_tasks_and_the_group_logs_its_aggregate(tmp_path, tokenizer_dir):
    from llm.evals.suite import load_tasks, metrics, score_tasks

    (tmp_path / "choice.yaml").write_text(
        "group: stdlib_choice\ntask:\n  - stdlib_next_line\n  - stdlib_docstring\naggregate_metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n"
    )
    copy_shipped(tmp_path, "stdlib_rolling", "rolling_copy", "tag: [prose]\n")
    lm = tiny_harness_model(tokenizer_dir)
    tasks = load_tasks(["stdlib_choice"], [str(tmp_path)])
    assert sorted(tasks["tasks"]) == ["stdlib_docstring", "stdlib_next_line"]
    got = metrics(score_tasks(lm, tasks, 3))
    members = got["eval/stdlib_next_line/acc"], got["eval/stdlib_docstring/acc"]
    assert got["eval/stdlib_choice/acc"] == pytest.approx(sum(members) / 2)  # 3 examples each
    assert sorted(load_tasks(["prose"], [str(tmp_path)])["tasks"]) == ["rolling_copy"]


def copy_shipped(directory, task: str, name: str, extra: str) -> None:
    """A shipped task renamed `name` with `extra` YAML lines, in `directory` with the shipped loader and data."""
    import shutil

    from llm.evals.suite import SHIPPED

    for f in ("utils.py", f"{task}.jsonl"):
        shutil.copy(SHIPPED / f, directory / f)
    yaml = (SHIPPED / f"{task}.yaml").read_text().replace(f"task: {task}", f"task: {name}")
    (directory / f"{name}.yaml").write_text(yaml + extra)


def tiny_harness_model(tokenizer_dir):
    from llm.config.schema import ModelConfig
    from llm.data.tokenizer import Tokenizer
    from llm.evals.harness import HarnessModel
    from llm.model.gpt import GPT

    tok = Tokenizer.load(tokenizer_dir)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, max_seq_len=64))
    return HarnessModel(model=model, tokenizer=tok, batch_size=8)
