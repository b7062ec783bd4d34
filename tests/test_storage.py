"""Storage faults on real file systems (llm/store/storage.py): a disk that fills up during a checkpoint save or a
metrics append, a read-only run directory or checkpoints directory, too little room for a checkpoint, paths
that cannot exist. Each is one line, outcome `storage` (exit 6, which the job script does not requeue), damages
nothing earlier, and once the cause is gone the run resumes exactly.

Small tmpfs mounts need root: without it these tests skip, saying so (CI runs as root; LLM_REQUIRE_SLURM=1,
which CI sets, turns the skip into a failure)."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import ROOT, WORKER, environment, launch, losses, outcome, overrides

from llm.store.checkpoint import MARKER, POINTER

pytestmark = pytest.mark.slow
SMALL = ("train.max_steps=6", "train.ckpt_every_steps=2", "train.eval_every=3")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64m", read_only: bool = False):
    """A fresh tmpfs of `size` mounted at `path` for the block's duration."""
    if os.geteuid() != 0:
        if os.environ.get("LLM_REQUIRE_SLURM") == "1":
            pytest.fail("LLM_REQUIRE_SLURM=1 but not root: the storage tests need to mount a tmpfs")
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run(args, fault=None, fill=None, cwd=ROOT) -> subprocess.CompletedProcess:
    env = environment(fault)
    if fill:
        env["LLM_FILL"] = str(fill)
    cmd = [sys.executable, WORKER if fault else "-m", *([] if fault else ["llm.train"]), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared_dir, tokenizer_dir):
    """The small run uninterrupted: its train and val losses."""
    tmp = tmp_path_factory.mktemp("reference")
    launch(overrides(tmp, prepared_dir, tokenizer_dir, "ref", *SMALL))
    return losses(tmp, "ref"), losses(tmp, "ref", "val/loss")


@pytest.mark.parametrize("when", ["fill_at_save:0:4", "fill_at_step:0:3"])
def test_a_disk_that_fills_up_stops_the_run_in_one_line_and_the_resume_is_exact(
    tmp_path, prepared_dir, tokenizer_dir, reference, when
):
    disk = tmp_path / "disk"
    with tmpfs(disk):
        args = overrides(disk, prepared_dir, tokenizer_dir, "full", *SMALL)
        r = run(args, fault=when, fill=disk / "filler")
        line = one_error_line(r)
        assert r.returncode == 6, r.stderr[-3000:]
        assert line.startswith(f"error: cannot write {disk / 'runs' / 'full'}"), line
        assert "no space left on its device; free space there or set runs_dir elsewhere" in line
        o = outcome(disk, "full")
        assert o.returncode == 6 and o.stdout.startswith("storage: cannot write"), o.stdout  # recorded on a full disk
        ckpt = disk / "runs" / "full" / "checkpoints"
        assert (ckpt / POINTER).read_text() == "step_00000002" and (ckpt / "step_00000002" / MARKER).is_file()
        assert not (ckpt / "step_00000004").exists()  # the torn save gave its space back
        (disk / "filler").unlink()
        r = run(args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from" in r.stderr
        assert (losses(disk, "full"), losses(disk, "full", "val/loss")) == reference


def test_a_history_cut_short_is_ended_and_skipped(tmp_path, prepared_dir, tokenizer_dir):
    args = overrides(tmp_path, prepared_dir, tokenizer_dir, "torn", "train.max_steps=4", "train.ckpt_every_steps=2")
    assert run([*args, "train.steps_per_run=2"]).returncode == 0
    history = tmp_path / "runs" / "torn" / "metrics.jsonl"
    with open(history, "a") as fh:
        fh.write('{"step": 3, "train/l')  # as a full disk leaves it
    r = run(args)
    assert r.returncode == 0 and "its last line was cut short (a full disk?): ended it" in r.stderr, r.stderr
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: skipped a line that is not a whole record"):
        assert sorted(losses(tmp_path, "torn")) == [1, 2, 3, 4]
    assert '{"step": 3, "train/l\n' in history.read_text()  # kept, on a line of its own


@pytest.mark.parametrize("part", ["run directory", "checkpoints"])
def test_a_read_only_place_stops_the_run_before_its_first_step_naming_it(tmp_path, prepared_dir, tokenizer_dir, part):
    run_dir = tmp_path / "runs" / "ro"
    target = run_dir if part == "run directory" else run_dir / "checkpoints"
    with tmpfs(target, "1m", read_only=True):
        r = run(overrides(tmp_path, prepared_dir, tokenizer_dir, "ro", *SMALL))
        line = one_error_line(r)
        assert r.returncode == 6 and line == (
            f"error: cannot write {target}: its file system is read-only; set runs_dir to a writable place"
        ), r.stderr[-2000:]
        assert "step 1:" not in r.stderr and not (run_dir / "metrics.jsonl").exists()  # no step was run


def test_too_little_room_for_a_checkpoint_is_refused_before_the_first_step(tmp_path, prepared_dir, tokenizer_dir):
    disk = tmp_path / "disk"
    with tmpfs(disk, "2m"):  # a checkpoint of the model below takes about 10 MB
        r = run(overrides(disk, prepared_dir, tokenizer_dir, "small", *SMALL, "model.n_embd=160"))
        line = one_error_line(r)
        assert r.returncode == 6 and " free, and a checkpoint of this run needs about " in line, r.stderr[-2000:]
        assert line.startswith(f"error: {disk / 'runs' / 'small'} has ")
        assert not (disk / "runs" / "small" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "override, code, message",
    [
        ("runs_dir=/proc/nope", 6, "error: cannot write /proc/nope/bad: the path cannot be created; correct runs_dir"),
        (
            "runs_dir=/dev/null/x",
            6,
            "error: cannot write /dev/null/x/bad: a part of the path is not a directory; correct runs_dir",
        ),
        ("name=" + "n" * 300, 2, "error: name: 'nnnnnnnnnnnnnnnnnnnn'... is 300 bytes long; a directory name has at"),
    ],
)
def test_paths_that_cannot_exist_are_one_line(tmp_path, prepared_dir, tokenizer_dir, override, code, message):
    r = run([*overrides(tmp_path, prepared_dir, tokenizer_dir, "bad", *SMALL), override])
    assert r.returncode == code and one_error_line(r).startswith(message), r.stderr[-2000:]
    if code == 6:
        o = subprocess.run(
            [sys.executable, "-m", "llm.outcome", "--run-dir", override.split("=")[1] + "/bad"],
            capture_output=True,
            text=True,
            env=environment(),
            timeout=120,
        )
        assert o.returncode == 6 and o.stdout.startswith("storage: cannot write"), o.stdout
