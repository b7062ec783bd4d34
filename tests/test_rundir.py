"""A run directory stands on its own (llm/store/rundir.py): a run trained with relative paths, as the demo is, is
resumed, exported, sampled, evaluated and fine-tuned from any other working directory, and from a copy of its
tree mounted elsewhere (with the original gone), using the tokenizer it carries or, without it, the one its
settings name, found again where the tree moved."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import records, sft_rows, write_jsonl
from launch import environment, overrides

from llm.data.tokenizer import Tokenizer
from llm.store.checkpoint import CheckpointError
from llm.store.rundir import RECORD, TOKENIZER_DIR, Origin
from llm.store.weights import load_weights

pytestmark = pytest.mark.slow


def relative_overrides(*extra) -> list[str]:
    """The launch helpers' small run, with the data, tokenizer and runs directory relative to the working dir."""
    placed = ("data.paths", "data.tokenizer", "runs_dir")
    keep = [o for o in overrides(Path("x"), "x", "x", "demo") if not o.startswith(placed)]
    return ["data.paths=[data/prep]", "data.tokenizer=data/tok", "runs_dir=runs", *keep, *extra]


def run(cwd: Path, module: str, *args, timeout=300) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=environment(), timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> str:
    """The output of a command that succeeded (the progress messages are on stderr)."""
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def home(tmp_path_factory, prepared_dir, tokenizer_dir) -> Path:
    """<home>/data/{tok,prep} and the run <home>/runs/demo, trained 6 steps from <home> with relative paths."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(tokenizer_dir, home / "data" / "tok")
    shutil.copytree(prepared_dir, home / "data" / "prep")
    ok(run(home, "llm.train", *relative_overrides()))
    return home


def test_a_run_records_where_it_started_and_carries_its_tokenizer(home):
    run_dir = home / "runs" / "demo"
    record = json.loads((run_dir / RECORD).read_text())
    assert record == {"started_in": str(home), "run_dir": str(run_dir), "run_id": record["run_id"]}
    assert len(record["run_id"]) == 16
    assert Tokenizer.load(run_dir / TOKENIZER_DIR).sha256 == Tokenizer.load(home / "data" / "tok").sha256
    saved = (run_dir / "config.yaml").read_text()
    assert f"- {home / 'data' / 'prep'}\n" in saved and f"tokenizer: {home / 'data' / 'tok'}\n" in saved


def test_every_command_works_from_another_directory(home, tmp_path):
    run_dir, elsewhere = home / "runs" / "demo", tmp_path / "elsewhere"
    out = ok(run(elsewhere, "llm.generate", "--checkpoint", run_dir, "--prompt", "def ", "--max-new-tokens", 4))
    assert out.startswith("def ")  # the sample (stdout) comes first
    assert "val" in ok(run(elsewhere, "llm.evaluate", "--checkpoint", run_dir, "--max-windows", 2))
    ok(run(elsewhere, "llm.export", "--checkpoint", run_dir, "--output", "exported"))
    assert Tokenizer.load(elsewhere / "exported").sha256 == Tokenizer.load(home / "data" / "tok").sha256
    write_jsonl(elsewhere / "sft.jsonl", sft_rows(20))
    finetune = [f"finetune.init_from={run_dir}", "finetune.train_file=sft.jsonl", "runs_dir=ft", "name=sft"]
    small = ["data.seq_len=32", "train.max_steps=2", "train.micro_batch=4", "train.global_batch=8"]
    ok(run(elsewhere, "llm.finetune", *finetune, *small, "logger.wandb=false"))
    assert max(records(elsewhere / "ft" / "sft")) == 2
    assert (elsewhere / "ft" / "sft" / TOKENIZER_DIR / "tokenizer.model").is_file()  # fine-tuned runs carry theirs
    # resumed from here: the relative data paths are those of the directory the run started in
    out = ok(run(elsewhere, "llm.train", *relative_overrides("train.max_steps=8"), f"runs_dir={home / 'runs'}"))
    assert "resumed from" in out and max(records(run_dir)) == 8
    assert not (elsewhere / "data").exists()  # nothing was prepared here


def test_a_tree_mounted_elsewhere_is_found_again_and_what_is_missing_is_named(home, tmp_path):
    moved = tmp_path / "mnt" / "project"
    shutil.copytree(home, moved)
    hidden = home.with_name(home.name + ".away")
    os.rename(home, hidden)  # the original is gone, as on another machine
    try:
        run_dir = moved / "runs" / "demo"
        assert load_weights(run_dir).tok.directory == run_dir / TOKENIZER_DIR
        shutil.rmtree(run_dir / TOKENIZER_DIR)  # without the run's copy: the settings' tokenizer, where it moved
        cfg, _, tok, _ = load_weights(run_dir)
        assert tok.directory == moved / "data" / "tok" and cfg.data.paths == [str(moved / "data" / "prep")]
        os.rename(moved / "data" / "tok", moved / "data" / "tok.away")
        looked = f"looked for {home / 'data' / 'tok'} and {moved / 'data' / 'tok'}"
        with pytest.raises(CheckpointError, match=f"the run's tokenizer not found: {looked} \\(and the run direc"):
            load_weights(run_dir)
        r = run(tmp_path, "llm.generate", "--checkpoint", run_dir, "--prompt", "x")
        assert r.returncode == 2 and r.stderr.startswith("error: the run's tokenizer not found"), r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        os.rename(moved / "data" / "tok.away", moved / "data" / "tok")
        # resumed in the moved tree: the relative data paths are found again there
        steps = max(records(run_dir))
        out = ok(run(moved, "llm.train", *relative_overrides(f"train.max_steps={steps + 2}")))
        assert "resumed from" in out and max(records(run_dir)) == steps + 2
    finally:
        os.rename(hidden, home)


def test_paths_resolve_against_the_start_and_follow_a_moved_run_directory(tmp_path):
    origin = Origin(started_in="/old/proj", run_dir="/old/proj/runs/demo")
    assert origin.resolve("data/x") == "/old/proj/data/x"  # nothing exists: as recorded
    assert origin.resolve("hf:exports/m") == "hf:/old/proj/exports/m"
    (tmp_path / "data" / "x").mkdir(parents=True)
    now = tmp_path / "runs" / "demo"
    assert origin.resolve("data/x", now) == str(tmp_path / "data" / "x")
    assert origin.resolve("/old/proj/data/x", now) == str(tmp_path / "data" / "x")
    assert origin.candidates("data/y", Path("/old/proj/runs/demo")) == [Path("/old/proj/data/y")]  # not moved
