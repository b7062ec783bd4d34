"""Shard preparation split into encode tasks and a shards step (what `prepare_data --slurm` runs as Slurm jobs),
run here task by task: byte-identical to the local preparation, whatever the task count; missing or foreign
task results refused; an interrupted shards step resumes. The Slurm runs themselves: tests/test_slurm.py."""

import json
import shutil
from dataclasses import replace

import pytest

pytest.importorskip("datatrove")

from llm.data.prepare import PrepareConfig, plan, prepare  # noqa: E402
from llm.data.prepare_cluster import encode_task, stored, work_dir, write_shards  # noqa: E402
from llm.data.shards import ShardError, verify  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, corpus_dir):
    """The synthetic corpus and, sorting after it (in the last tasks), exact copies of three of its documents:
    the de-duplication must see across tasks."""
    d = tmp_path_factory.mktemp("cluster-corpus") / "raw"
    shutil.copytree(corpus_dir, d)
    for i in (1, 50, 200):
        shutil.copy(d / f"doc_{i:04d}.txt", d / f"zz_copy_{i:04d}.txt")
    return d


def config(corpus, tok, out) -> PrepareConfig:
    return PrepareConfig(
        [str(corpus)], str(tok), str(out), val_fraction=0.1, workers=1, shard_tokens=3000, chunk_bytes=2048
    )


@pytest.fixture(scope="module")
def local(tmp_path_factory, corpus, tokenizer_dir):
    out = tmp_path_factory.mktemp("cluster-local") / "data"
    prepare(config(corpus, tokenizer_dir, out), progress=False, verbose=False)
    return out


def files(out) -> dict[str, bytes]:
    """Every file of a prepared dataset; the manifest without what names the command, the time and the output."""
    found = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"].pop("output") == str(out)
    found["manifest.json"] = {k: v for k, v in manifest.items() if k not in ("command", "created")}
    return found


@pytest.mark.parametrize("tasks", [1, 3, 64])  # 64: more tasks than work items, some with none
def test_encode_tasks_then_the_shards_step_write_exactly_the_local_preparation(
    tmp_path, corpus, tokenizer_dir, local, tasks
):
    cfg = config(corpus, tokenizer_dir, tmp_path / "data")
    assert len(plan(cfg)[3].items) > 3 * 10  # work items enough for every task of three to have several
    for rank in reversed(range(tasks)):  # the order array tasks finish in does not matter
        encode_task(cfg, rank, tasks)
    manifest = write_shards(cfg, tasks, command=["the", "command"])
    assert files(tmp_path / "data") == files(local)
    assert manifest["stats"]["duplicates_dropped"] == 3 and manifest["command"] == ["the", "command"]
    assert verify(tmp_path / "data") == []
    assert not (work_dir(cfg.output) / "encoded").exists()  # as large as the dataset: removed once it is written


def test_a_missing_or_foreign_task_result_is_refused(tmp_path, corpus, tokenizer_dir):
    cfg = config(corpus, tokenizer_dir, tmp_path / "data")
    encode_task(cfg, 0, 2)
    with pytest.raises(ShardError, match=r"encode task 1's results are missing .*; rerun the same command"):
        write_shards(cfg, 2)
    assert not (tmp_path / "data" / "manifest.json").exists()
    encode_task(replace(cfg, val_fraction=0.2), 1, 2)  # the same place, another preparation
    with pytest.raises(ShardError, match=r"00001.npz was written by another preparation; delete .* and rerun"):
        write_shards(cfg, 2)


class Interrupt(Exception):
    pass


def test_an_interrupted_shards_step_resumes_to_the_same_bytes(tmp_path, corpus, tokenizer_dir, local):
    cfg = config(corpus, tokenizer_dir, tmp_path / "data")
    for rank in range(3):
        encode_task(cfg, rank, 3)
    _tok, dtype, _opts, c, fingerprint = plan(cfg)

    def stop(items_done):
        raise Interrupt

    with pytest.raises(Interrupt):
        prepare(
            cfg,
            progress=False,
            verbose=False,
            on_checkpoint=stop,
            encoded=stored(cfg, 3, len(c.items), fingerprint, dtype),
        )
    assert (tmp_path / "data" / ".prepare_state.json").is_file()
    write_shards(cfg, 3)  # the job resubmitted: it takes up from the checkpoint
    assert files(tmp_path / "data") == files(local)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "0"], "error: --tasks must be at least 1 (got 0)"),
        (["--time", "4h"], "error: --time '4h' is not a Slurm time limit; give e.g. 90, 4:00:00 or 1-12:00:00"),
        (["--cpus-per-task", "0"], "error: --cpus-per-task must be at least 1 (got 0)"),
    ],
)
def test_bad_slurm_options_are_one_line_before_any_work(tmp_path, corpus, tokenizer_dir, flags, message, capsys):
    from llm.data.prepare_data import main

    args = ["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--output", str(tmp_path / "data")]
    assert main([*args, "--slurm", *flags]) == 2
    assert capsys.readouterr().err.strip() == message
    assert list(tmp_path.iterdir()) == []
