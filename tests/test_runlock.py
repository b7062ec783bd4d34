"""One process at a time in a run directory (llm/training/runlock.py): a second launch on a live run refuses in one line
naming the holder and touches nothing of it; a lock whose holder is gone is taken over (a dead pid on this
host, the same Slurm job requeued, a holder on another host that stopped renewing it). The Slurm requeue
tests (test_slurm.py) take over the lock of the attempt they replace."""

import json
import socket
import subprocess
import sys
import time

import pytest
from launch import ROOT, WORKER, environment, losses, outcome, overrides, wait_for_step

from llm.training import runlock
from llm.training.runlock import RunLock, RunLocked


def test_a_second_launch_on_a_live_run_refuses_naming_it_and_touches_nothing(tmp_path, prepared_dir, tokenizer_dir):
    args = overrides(tmp_path, prepared_dir, tokenizer_dir, "shared", "train.max_steps=30")
    log = open(tmp_path / "first.err", "w")  # noqa: SIM115 - the first run writes it while the second runs
    first = subprocess.Popen([sys.executable, WORKER, *args], cwd=ROOT, env=environment("slow=0.5"), stderr=log)
    try:
        wait_for_step(tmp_path, "shared", 2, first)
        second = subprocess.run(
            [sys.executable, "-m", "llm.train", *args], cwd=ROOT, env=environment(), capture_output=True, text=True
        )
        first.wait(timeout=300)
    finally:
        first.kill()
        log.close()
    err = (tmp_path / "first.err").read_text()
    host = socket.gethostname()
    assert second.returncode == 2 and second.stderr.startswith(
        f"error: {tmp_path / 'runs' / 'shared'} is in use by pid {first.pid} on {host} since "
    ), second.stderr[-2000:]
    assert second.stderr.count("\n") == 1 and first.returncode == 0, err[-2000:]
    assert sorted(losses(tmp_path, "shared")) == list(range(1, 31))  # one row per step: nothing of the second
    o = outcome(tmp_path, "shared")
    assert o.returncode == 0 and o.stdout.startswith("finished: reached step 30"), o.stdout  # its record, intact
    assert not (tmp_path / "runs" / "shared" / runlock.NAME).exists()  # released at the end


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, prepared_dir, tokenizer_dir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / "runs" / "stale"
    run_dir.mkdir(parents=True)
    record = {"host": socket.gethostname(), "pid": dead.pid, "launch": "old", "since": 0, "renewed": 0}
    (run_dir / runlock.NAME).write_text(json.dumps(record))
    args = overrides(tmp_path, prepared_dir, tokenizer_dir, "stale", "train.max_steps=2")
    cmd = [sys.executable, "-m", "llm.train", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=environment(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"took over the lock of {run_dir} from pid {dead.pid} on {socket.gethostname()}: pid {dead.pid} is not " in (
        r.stderr
    )


def test_holders_on_other_hosts_and_earlier_attempts_of_the_same_job(tmp_path, monkeypatch):
    path = tmp_path / runlock.NAME
    elsewhere = {"host": "other-node", "pid": 4242, "launch": "theirs", "since": time.time(), "renewed": time.time()}
    path.write_text(json.dumps(elsewhere))
    with pytest.raises(RunLocked, match=r"is in use by pid 4242 on other-node since .*: wait for that run to end"):
        RunLock(tmp_path, "mine").acquire()
    path.write_text(json.dumps({**elsewhere, "renewed": time.time() - runlock.STALE_S - 1}))  # stopped renewing
    lock = RunLock(tmp_path, "mine")
    lock.acquire()
    assert "not renewed for" in lock.note and json.loads(path.read_text())["launch"] == "mine"
    lock.release()
    assert not path.exists()
    # a requeued Slurm job: its earlier attempt's lock, from whatever host, is its own to take
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    path.write_text(json.dumps({**elsewhere, "slurm_job": "77"}))
    lock = RunLock(tmp_path, "requeued")
    lock.acquire()
    assert "an earlier attempt of this Slurm job (77)" in lock.note
    lock.release()


def test_the_lock_is_renewed_while_the_run_lives(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "RENEW_S", 0.05)
    lock = RunLock(tmp_path, "mine")
    lock.acquire()
    first = json.loads((tmp_path / runlock.NAME).read_text())["renewed"]
    time.sleep(0.3)
    assert json.loads((tmp_path / runlock.NAME).read_text())["renewed"] > first
    lock.release()
