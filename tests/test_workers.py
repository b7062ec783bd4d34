"""Worker processes end when told to: a pool started by a process that catches SIGTERM/SIGUSR1 (the training,
llm/training/faults.py: StopSignal) runs its workers with the default dispositions (llm/data/workers.py). With the
handlers inherited, `Pool.terminate()`'s SIGTERM was recorded instead of ending a worker, and the data
preparation the training starts hung after tokenizing everything."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import llm.data.prepare as prepare_module
from llm.data.prepare import PrepareConfig, prepare
from llm.data.workers import worker_pool
from llm.training.faults import StopSignal

STOP = (signal.SIGTERM, signal.SIGUSR1)


def dispositions() -> dict:
    """This process's handler and blocked state of each stop signal (run in a worker)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return {s.name: {"default": signal.getsignal(s) == signal.SIG_DFL, "blocked": s in blocked} for s in STOP} | {
        "pid": os.getpid()
    }


def assert_default(seen: list[dict]) -> None:
    assert seen, "no worker reported"
    for worker in seen:
        for s in STOP:
            assert worker[s.name] == {"default": True, "blocked": False}, (s.name, worker)


def test_pool_workers_start_with_the_default_dispositions_under_the_trainings_handlers():
    stop = StopSignal()
    try:
        with worker_pool(2) as pool:
            seen = pool.map(dispositions_of, range(8), chunksize=1)
    finally:
        stop.restore()
    assert_default(seen)


def dispositions_of(_):
    return dispositions()


def test_the_preparations_workers_run_with_the_default_dispositions(tmp_path, monkeypatch, corpus_dir, tokenizer_dir):
    reports = tmp_path / "reports"
    reports.mkdir()
    original = prepare_module._init_worker

    def recording_init(tokenizer: str) -> None:  # runs in each worker (forked: the patch is inherited)
        (reports / f"{os.getpid()}.json").write_text(json.dumps(dispositions()))
        original(tokenizer)

    monkeypatch.setattr(prepare_module, "_init_worker", recording_init)
    stop = StopSignal()
    try:
        cfg = PrepareConfig([str(corpus_dir)], str(tokenizer_dir), str(tmp_path / "data"), workers=2, chunk_bytes=4096)
        prepare(cfg, progress=False, verbose=False)
    finally:
        stop.restore()
    seen = [json.loads(f.read_text()) for f in reports.iterdir()]
    assert len(seen) == 2
    assert_default(seen)


def test_the_preparation_ends_every_time_inside_a_process_with_the_trainings_handlers(
    tmp_path, corpus_dir, tokenizer_dir
):
    # the training's situation: StopSignal installed, then the data prepared by a pool. With inherited handlers
    # most runs of this hung at a pool's exit on a 2-core machine (a healthy one takes seconds); the process is
    # killed (SIGKILL: it catches SIGTERM) when it runs past the limit
    script = textwrap.dedent(
        f"""
        from llm.data.prepare import PrepareConfig, prepare
        from llm.training.faults import StopSignal

        stop = StopSignal()
        for i in range(20):
            cfg = PrepareConfig([{str(corpus_dir)!r}], {str(tokenizer_dir)!r}, {str(tmp_path)!r} + f"/data{{i}}",
                                workers=2, chunk_bytes=256)
            prepare(cfg, progress=False, verbose=False)
        print("prepared", i + 1, "times; signal received:", stop.received)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung workers too
        proc.communicate()
        raise AssertionError("the preparation hung (killed after 60 s)") from None
    assert proc.returncode == 0, err[-2000:]
    assert "prepared 20 times; signal received: None" in out
