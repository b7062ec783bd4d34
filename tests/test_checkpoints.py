"""Damaged checkpoints (in-process, world size 1, ZeRO-1): each kind of damage is detected before loading,
the run falls back to the newest intact checkpoint saying which one it skipped and why, and continues exactly
as an undamaged run; with none intact it stops instead of starting over; history is never lost."""

import shutil
from dataclasses import replace

import pytest
from helpers import flip_bytes, make_cfg, records

from llm.store.checkpoint import MARKER, CheckpointError, Checkpoints
from llm.train import train

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_dir, tokenizer_dir):
    """A run stopped at step 6 with checkpoints at 2, 4 and 6, and the same run done in one go to step 8."""
    tmp = tmp_path_factory.mktemp("ckpt")

    def cfg(name, **train_fields):
        fields = {"ckpt_every_steps": 2, "max_steps": 8, **train_fields}
        return make_cfg(tmp, prepared_dir, tokenizer_dir, name, deepspeed={"stage": 1}, train=fields)

    train(cfg("base", steps_per_run=6))
    whole = train(cfg("whole"))
    return tmp, cfg, records(whole["run_dir"])


def damaged_copy(runs, name: str):
    tmp, cfg, _ = runs
    shutil.copytree(tmp / "runs" / "base", tmp / "runs" / name)
    return cfg(name), tmp / "runs" / name / "checkpoints"


DAMAGE = {
    "garbage in latest": (
        lambda c: (c / "latest").write_bytes(b"\xff\xfe\x00garbage"),
        6,
        "checkpoints/latest does not name a checkpoint of this run",
    ),
    "latest names another run": (
        lambda c: (c / "latest").write_text(str(c.parent.parent / "whole" / "checkpoints" / "step_00000008")),
        6,
        "does not name a checkpoint of this run",
    ),
    "latest names a missing tag": (
        lambda c: (c / "latest").write_text("step_00000099"),
        6,
        "names step_00000099, which does not exist",
    ),
    "truncated model file": (
        lambda c: (c / "step_00000006" / MODEL_FILE).write_bytes((c / "step_00000006" / MODEL_FILE).read_bytes()[:999]),
        4,
        f"skipping checkpoint step_00000006: {{}}/step_00000006/{MODEL_FILE} is 999 bytes, expected",
    ),
    "truncated optimizer file": (
        lambda c: (c / "step_00000006" / OPTIM_FILE).write_bytes((c / "step_00000006" / OPTIM_FILE).read_bytes()[:99]),
        4,
        f"skipping checkpoint step_00000006: {{}}/step_00000006/{OPTIM_FILE} is 99 bytes, expected",
    ),
    "deleted model file": (
        lambda c: (c / "step_00000006" / MODEL_FILE).unlink(),
        4,
        f"skipping checkpoint step_00000006: {{}}/step_00000006 is missing {MODEL_FILE}",
    ),
    "deleted optimizer file": (
        lambda c: (c / "step_00000006" / OPTIM_FILE).unlink(),
        4,
        f"skipping checkpoint step_00000006: {{}}/step_00000006 is missing {OPTIM_FILE}",
    ),
    "flipped bytes in the model file": (
        lambda c: flip_bytes(c / "step_00000006" / MODEL_FILE),
        4,
        f"{MODEL_FILE} does not match its sha256 (damaged)",
    ),
    "flipped bytes in the optimizer file": (
        lambda c: flip_bytes(c / "step_00000006" / OPTIM_FILE),
        4,
        f"{OPTIM_FILE} does not match its sha256 (damaged)",
    ),
    "a checkpoint under another step's name": (
        lambda c: (shutil.rmtree(c / "step_00000006"), shutil.copytree(c / "step_00000004", c / "step_00000006")),
        4,
        "skipping checkpoint step_00000006: {}/step_00000006 holds step 4, not the one its name says",
    ),
    "a checkpoint of another run linked in (same model, data and seed)": (
        lambda c: (
            shutil.rmtree(c / "step_00000006"),
            (c / "step_00000006").symlink_to(c.parent.parent / "whole" / "checkpoints" / "step_00000006"),
        ),
        4,
        "skipping checkpoint step_00000006: {}/step_00000006 was written by another run (",
    ),
    "COMPLETE.json deleted from the checkpoint `latest` names": (
        lambda c: (c / "step_00000006" / MARKER).unlink(),
        4,
        "skipping checkpoint step_00000006: {}/step_00000006 is incomplete (no COMPLETE.json",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_detected_and_the_run_continues_exactly_from_an_intact_checkpoint(runs, capsys, case):
    damage, resumed_at, message = DAMAGE[case]
    cfg, ckpt = damaged_copy(runs, case.replace(" ", "-"))
    damage(ckpt)
    out = train(cfg)
    err = capsys.readouterr().err
    saying_why = [line for line in err.splitlines() if message.format(ckpt) in line]
    assert len(saying_why) == 1 and "Traceback" not in err, err  # one line says why
    assert f"resumed from {ckpt / f'step_{resumed_at:08d}'} at step {resumed_at}" in err
    assert out["step"] == 8 and records(out["run_dir"]) == runs[2]  # bitwise the undamaged run's losses


def test_an_explicitly_named_damaged_checkpoint_is_refused(runs):
    cfg, ckpt = damaged_copy(runs, "explicit")
    flip_bytes(ckpt / "step_00000004" / MODEL_FILE)
    with pytest.raises(CheckpointError, match=rf"cannot resume: .*/step_00000004/{MODEL_FILE} does not match its sha"):
        train(replace(cfg, resume=str(ckpt / "step_00000004")))


def test_no_intact_checkpoint_stops_the_run_and_resume_none_keeps_everything(runs):
    cfg, ckpt = damaged_copy(runs, "all-damaged")
    for step in (2, 4, 6):
        flip_bytes(ckpt / f"step_{step:08d}" / OPTIM_FILE)
    history = (ckpt.parent / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"has 3 checkpoint\(s\) and none is intact .*resume=none starts over"):
        train(cfg)
    assert (ckpt.parent / "metrics.jsonl").read_text() == history  # nothing written, nothing overwritten
    out = train(replace(cfg, resume="none"))
    assert out["step"] == 8 and records(out["run_dir"]) == runs[2]
    moved = list(ckpt.parent.glob("checkpoints.superseded-*"))
    assert len(moved) == 1 and sorted(p.name for p in moved[0].glob("step_*")) == [f"step_{s:08d}" for s in (2, 4, 6)]
    assert (ckpt.parent / "metrics.jsonl").read_text().startswith(history)  # appended to, never truncated


def test_only_interrupted_saves_start_from_step_zero(runs, capsys):
    # a run killed during its first save: directories without COMPLETE.json and no `latest`
    cfg, ckpt = damaged_copy(runs, "interrupted")
    for marker in ckpt.glob(f"step_*/{MARKER}"):
        marker.unlink()
    (ckpt / "latest").unlink()
    out = train(cfg)
    assert "holds only interrupted saves (step_00000006, step_00000004, step_00000002), no checkpoint: starting" in (
        capsys.readouterr().err
    )
    assert out["step"] == 8 and records(out["run_dir"]) == runs[2]


def test_an_unfinished_attempt_leaves_its_rows_in_the_history_file(runs):
    # base stopped at 6; a resume from 4 (6 damaged) supersedes rows 5 and 6 without deleting them
    cfg, ckpt = damaged_copy(runs, "history")
    flip_bytes(ckpt / "step_00000006" / MODEL_FILE)
    train(cfg)
    lines = (ckpt.parent / "metrics.jsonl").read_text().splitlines()
    loss_rows = [line for line in lines if '"train/loss"' in line]
    assert len(loss_rows) == 6 + 4  # steps 1-6 of the first attempt, 5-8 of the second
    assert sum('"event": "start"' in line for line in lines) == 2
    assert Checkpoints(ckpt).resolve("auto").name == "step_00000008"


def test_a_universal_conversion_is_never_reused_for_another_save_of_the_same_step(runs):
    cfg, ckpt = damaged_copy(runs, "universal")
    ckpts = Checkpoints(ckpt)
    converted = ckpts.universal(ckpt / "step_00000004")
    assert (converted / MARKER).is_file()
    assert ckpts.universal(ckpt / "step_00000004") == converted  # the same checkpoint: reused
    train(replace(cfg, resume=str(ckpt / "step_00000002")))  # saves step 4 again (other bytes: another run's RNG)
    assert not converted.exists()
