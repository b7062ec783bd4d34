"""`sbatch slurm/pretrain.sbatch` on a real Slurm cluster started on this machine (tools/slurm_cluster.py):
2 tasks of a CPU run, preempted with USR1, requeued, resumed, up to the requeue limit; a bad override.

Without root the cluster cannot start and these tests skip saying so; CI sets LLM_REQUIRE_SLURM=1, which
turns that skip into a failure so that they can never silently not run there.
"""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REFERENCE
from launch import ROOT, launch, losses, overrides

sys.path.insert(0, str(ROOT / "tools"))
from slurm_cluster import Cluster, SlurmUnavailable, run  # noqa: E402

from llm.store.checkpoint import check_checkpoint
from llm.training.metrics import read_history

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # all in this file: one worker runs them (conftest.py)
SHIM = str(ROOT / "tests" / "python_with_faults.sh")


def start_cluster(nodes: int) -> Cluster:
    try:
        return Cluster(nodes).start()
    except SlurmUnavailable as e:
        if os.environ.get("LLM_REQUIRE_SLURM") == "1":
            pytest.fail(f"LLM_REQUIRE_SLURM=1 but no Slurm cluster: {e}")
        pytest.skip(f"{e}; run pytest as root to start a local Slurm cluster for these tests")


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def two_nodes():
    """nodeA (10.200.0.2) and nodeB (10.200.0.3): one network namespace, one slurmd and one CPU each."""
    c = start_cluster(2)
    yield c
    c.stop()


def sbatch_pretrain(cluster, tmp_path, args, resources, fault=None, env=None) -> int:
    """sbatch slurm/pretrain.sbatch as a user would, with `resources` (sbatch options) sized for this machine;
    `fault` runs the training under tests/fault_worker.py. Returns the job id."""
    job_env = {"PYTHON": SHIM, "REAL_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    if fault:
        job_env["LLM_FAULT"] = fault
    log = f"--output={tmp_path}/%x-%j.out"
    if not any(r.startswith("--time=") for r in resources):
        resources = [*resources, "--time=10"]
    return cluster.sbatch(*resources, log, "slurm/pretrain.sbatch", *args, cwd=ROOT, env=job_env)


@pytest.fixture
def submit(cluster, tmp_path, prepared_dir, tokenizer_dir):
    """The REFERENCE run as a job of 2 tasks on one node, each with one (pretend) GPU and one CPU."""

    def sbatch(name, *extra, fault=None, env=None, options=()):
        args = overrides(tmp_path, prepared_dir, tokenizer_dir, name, *REFERENCE, *extra)
        resources = ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", *options]
        return sbatch_pretrain(cluster, tmp_path, args, resources, fault, env)

    return sbatch


def log_of(tmp_path, job: int) -> str:
    return (tmp_path / f"pretrain-{job}.out").read_text()


def wait_for_step(cluster, job, tmp_path, name: str, step: int, after: int = 0, timeout: float = 120) -> None:
    """Until the run's history has `step` (counting only records after the first `after` lines)."""
    path, deadline = tmp_path / "runs" / name / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        cluster.release(job)
        if path.is_file():
            lines = path.read_text().splitlines()[after:]
            if any(json.loads(x).get("step", 0) >= step and "train/loss" in x for x in lines):
                return
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached")


def test_a_two_task_job_trains_exactly_as_torchrun_does(cluster, submit, tmp_path, two_rank_reference):
    job = submit("job")
    info = cluster.wait(job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "finished: reached step 10" in log and "2 rank(s) x 1 micro-batch(es)" in log
    assert (losses(tmp_path, "job"), losses(tmp_path, "job", "val/loss")) == two_rank_reference


def test_llm_submit_queues_a_job_that_trains_as_torchrun_does_and_nothing_on_bad_input(
    cluster, tmp_path, prepared_dir, tokenizer_dir, two_rank_reference
):
    env = {**cluster.env, "PYTHON": SHIM, "REAL_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}

    def submit(*args):
        cmd = [sys.executable, "-m", "llm.submit", "--nodes=1", "--gpus-per-node=2", "--cpus-per-task=1", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    args = overrides(tmp_path, prepared_dir, tokenizer_dir, "submitted", *REFERENCE)
    r = submit("--time=10", *args)
    run_dir = tmp_path / "runs" / "submitted"
    m = re.fullmatch(rf"submitted job (\d+): log {run_dir}/slurm-(\d+).out, run directory {run_dir}\n", r.stdout)
    assert r.returncode == 0 and m and m.group(1) == m.group(2), r.stdout + r.stderr
    job = int(m.group(1))
    info = cluster.wait(job)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert (losses(tmp_path, "submitted"), losses(tmp_path, "submitted", "val/loss")) == two_rank_reference
    # refused in one line before anything is queued: the next job queued gets the next id
    r = submit("--time=10", *args, "train.global_batch=7")  # not divisible by 2 ranks x 4 sequences
    assert r.returncode == 2 and r.stderr.startswith("error: train.global_batch: 7 is not divisible"), r.stderr
    assert r.stderr.count("\n") == 1 and r.stdout == ""
    probe = cluster.sbatch("--wrap=true", f"--output={tmp_path}/probe-%j.out", cwd=tmp_path, env=env)
    assert probe == job + 1


def test_preemption_requeues_and_resumes_exactly_up_to_the_requeue_limit(cluster, submit, tmp_path, two_rank_reference):
    run = tmp_path / "runs" / "preempted"
    job = submit("preempted", "logger.wandb=true", fault="slow", env={"LLM_MAX_REQUEUES": "1"})
    scancel = ["scancel", "--signal=USR1", "--batch", str(job)]
    wait_for_step(cluster, job, tmp_path, "preempted", 3)
    subprocess.run(scancel, check=True, env=cluster.env)  # preemption 1: checkpoint, requeue, resume
    wait_for_step(cluster, job, tmp_path, "preempted", 7, after=len((run / "metrics.jsonl").read_text().splitlines()))
    subprocess.run(scancel, check=True, env=cluster.env)  # preemption 2: checkpoint, but the limit is 1 restart
    info = cluster.wait(job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "4:0" and info["Restarts"] == "1", log[-3000:]
    assert "start 1 (restart count 0)" in log and "requeued (restart 1)" in log and "start 2 (restart count 1)" in log
    assert "not requeued: it has restarted 1 times (LLM_MAX_REQUEUES=1)" in log
    assert log.count("interrupted: stopped by SIGUSR1 at step ") == 2
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    assert check_checkpoint(latest) is None and 7 <= int(latest.name.split("_")[1]) < 10

    job2 = submit("preempted", "logger.wandb=true")  # the user resubmits: same run directory, same W&B run
    info = cluster.wait(job2)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log_of(tmp_path, job2)[-3000:]
    assert (losses(tmp_path, "preempted"), losses(tmp_path, "preempted", "val/loss")) == two_rank_reference
    starts = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event")]
    assert len(starts) == 3 and [r["world_size"] for r in starts] == [2, 2, 2]
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and len({f.name for p in runs for f in p.glob("run-*.wandb")}) == 1  # one W&B run id
    assert [r["step"] for r in read_history(run / "metrics.jsonl") if "train/loss" in r] == list(range(1, 11))


def test_a_time_limit_shorter_than_the_run_requeues_at_each_limit_and_finishes_exactly(
    cluster, submit, tmp_path, two_rank_reference
):
    # 10 steps of 4 s against a 1-minute limit, USR1 45 s ahead of it: Slurm checks limits every ~30 s, so the
    # signal comes 15-45 s into an allocation and the run needs at least two of them. The steps are slow only in
    # the first allocation (the later ones finish within one limit or two, instead of a step or two each)
    job = submit("limited", fault="slow=4:first", options=["--time=1", "--signal=B:USR1@45"])
    info = cluster.wait(job, timeout=600)
    log, restarts = log_of(tmp_path, job), int(info["Restarts"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and restarts >= 1, log[-3000:]
    assert log.count("USR1 (time limit or preemption): checkpointing") >= restarts
    assert [f"requeued (restart {i})" in log for i in range(1, restarts + 2)] == [True] * restarts + [False]
    assert (losses(tmp_path, "limited"), losses(tmp_path, "limited", "val/loss")) == two_rank_reference
    history = read_history(tmp_path / "runs" / "limited" / "metrics.jsonl")
    assert [r["step"] for r in history if "train/loss" in r] == list(range(1, 11))


def log_time(log: str, pattern: str) -> float:
    """The Unix time of the job script's log line matching `pattern` ("[<ISO time>] job <id>: <pattern>")."""
    stamp = re.search(r"\[(\S+)\] job \d+: " + pattern, log).group(1)
    return datetime.datetime.fromisoformat(stamp).timestamp()


def ran_for(info: dict) -> float:
    """Seconds from a job's start to its end, as Slurm records them (to the second)."""
    start, end = (datetime.datetime.fromisoformat(info[k]) for k in ("StartTime", "EndTime"))
    return (end - start).total_seconds()


def test_a_rank_killed_mid_save_ends_the_step_in_seconds_naming_it_and_the_job_resumes_exactly(
    cluster, submit, tmp_path, two_rank_reference
):
    # rank 1 SIGKILLs itself half-way through writing its optimizer shard of step 4 (first start only)
    job = submit("killed", fault="mid_shard:1:4:first")
    info = cluster.wait(job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-3000:]
    assert re.search(r"rank_failure: rank 1 \(\S+, pid \d+\) died without recording an outcome", log), log[-3000:]
    killed = float(re.search(r"fault: rank 1 SIGKILLs itself at ([\d.]+)", log).group(1))
    # srun --kill-on-bad-exit ends the other rank at once (at most KillWait, 10 s here), not at the 300 s
    # collective timeout: measured 0.2 s from the kill to the job script's requeue (2026-12-05)
    assert log_time(log, r"requeued \(restart 1\)") - killed < 12
    assert re.search(r"resumed from \S+step_0+2 at step 2", log.split("requeued (restart 1)")[1])  # not torn step 4
    assert (losses(tmp_path, "killed"), losses(tmp_path, "killed", "val/loss")) == two_rank_reference


def test_a_finetune_job_is_preempted_requeued_and_resumes_exactly(cluster, tmp_path, prepared_dir, tokenizer_dir):
    # slurm/finetune.sbatch runs the pretraining job logic with task=sft: the same preemption round trip, and the
    # same losses as one uninterrupted run in this process (2 ranks x 1 micro-batch sum as 1 rank x 2)
    from helpers import make_cfg, one_thread, records, sft_rows, write_jsonl

    from llm.config.compose import load_config
    from llm.train import train

    with one_thread():  # as the job's ranks
        base = train(make_cfg(tmp_path, prepared_dir, tokenizer_dir, "base", train={"max_steps": 2}))["run_dir"]
        sft = ["finetune.init_from=" + base, "optim.grad_clip=0", "train.max_steps=8", "train.ckpt_every_steps=2"]
        sft += ["finetune.train_file=" + write_jsonl(tmp_path / "t.jsonl", sft_rows(80))]
        train(load_config(["task=sft", *overrides(tmp_path, prepared_dir, tokenizer_dir, "reference", *sft)]))
    args = overrides(tmp_path, prepared_dir, tokenizer_dir, "sft", *sft)
    resources = ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=10"]
    job_env = {"PYTHON": SHIM, "REAL_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "LLM_FAULT": "slow"}
    job = cluster.sbatch(
        *resources, f"--output={tmp_path}/%x-%j.out", "slurm/finetune.sbatch", *args, cwd=ROOT, env=job_env
    )
    wait_for_step(cluster, job, tmp_path, "sft", 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, env=cluster.env)
    info = cluster.wait(job)
    log = (tmp_path / f"finetune-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "interrupted: stopped by SIGUSR1 at step" in log and "finished: reached step 8" in log
    assert records(tmp_path / "runs" / "sft") == records(tmp_path / "runs" / "reference")


def test_an_unknown_override_fails_the_job_in_its_first_seconds_without_requeue(cluster, submit, tmp_path):
    job = submit("typo", "model.n_layr=3")
    info = cluster.wait(job)
    assert ran_for(info) <= 10, info  # its first seconds: measured 1 s (2026-12-05)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", log[-2000:]
    assert "error: bad override: Could not override 'model.n_layr'." in log and "requeued" not in log
    assert "parameters;" not in log  # rejected by the job script's check, before the training step started


def test_a_run_directory_that_cannot_be_written_ends_the_job_without_requeue(cluster, submit, tmp_path):
    job = submit("nowhere", "runs_dir=/proc/nope")
    info = cluster.wait(job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "6:0" and info["Restarts"] == "0", log[-2000:]
    assert "error: cannot write /proc/nope/nowhere/rendezvous: the path cannot be created; correct runs_dir" in log
    assert "requeued" not in log and "Traceback" not in log


def test_a_two_node_zero3_job_trains_exactly_as_one_node_does(two_nodes, tmp_path, prepared_dir, tokenizer_dir):
    args = overrides(tmp_path, prepared_dir, tokenizer_dir, "two-nodes", *REFERENCE, "deepspeed=zero3")
    resources = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]
    # the namespaces share the machine's hostname, which resolves to 127.0.0.1: gloo must use each node's eth0
    job = sbatch_pretrain(two_nodes, tmp_path, args, resources, env={"GLOO_SOCKET_IFNAME": "eth0"})
    info = two_nodes.wait(job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "on nodeA,nodeB" in log or "on node[A-B]" in log
    one_node = tmp_path / "one-node"
    launch(overrides(one_node, prepared_dir, tokenizer_dir, "ref", *REFERENCE, "deepspeed=zero3"), nproc=2)
    assert losses(tmp_path, "two-nodes") == losses(one_node, "ref")
    assert losses(tmp_path, "two-nodes", "val/loss") == losses(one_node, "ref", "val/loss")


def test_a_node_that_does_not_share_the_run_directory_is_named_and_the_job_ends(
    two_nodes, tmp_path, prepared_dir, tokenizer_dir
):
    # the run directory is under a path that nodeB sees as its own empty tmpfs
    args = overrides(two_nodes.unshared, prepared_dir, tokenizer_dir, "unshared", *REFERENCE)
    resources = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]
    job = sbatch_pretrain(two_nodes, tmp_path, args, resources)
    info = two_nodes.wait(job)
    assert ran_for(info) <= 10, info  # in seconds: measured 2 s (2026-12-05)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", log[-3000:]
    assert "error: pre-flight: node nodeB does not see the run directory" in log and "requeued" not in log
    assert "parameters;" not in log  # no training step started


# ---- python -m llm.data.clean --slurm -------------------------------------------------------------------------
def clean_corpus(folder: Path) -> Path:
    """Stdlib modules and near-copies of four of them: near-duplicates for MinHash to find."""
    from llm.data.corpus import stdlib_files

    folder.mkdir()
    files = [f for f in stdlib_files() if 3_000 < f.stat().st_size < 20_000 and "encodings" not in f.parts][:16]
    for i, f in enumerate(files):
        text = f.read_text()
        (folder / f"m{i:02d}.py").write_text(text)
        if i < 4:
            (folder / f"copy{i:02d}.py").write_text(text.replace("\n", "\n# edited\n", 1))
    return folder


def data_command(cluster, module, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**cluster.env, "OMP_NUM_THREADS": "1"})


def clean_command(cluster, *args) -> subprocess.CompletedProcess:
    return data_command(cluster, "llm.data.clean", *args)


def follow(cluster, args, timeout=300, module="llm.data.clean") -> tuple[list[str], subprocess.CompletedProcess]:
    """Rerun the command until it reports the finished run (as a user following it would); the states seen."""
    states, deadline = [], time.time() + timeout
    while time.time() < deadline:
        r = data_command(cluster, module, *args)
        assert r.returncode == 0, r.stderr[-2000:]
        states.append(r.stdout.split()[0])
        if r.stdout.startswith("wrote"):
            return states, r
        time.sleep(2)
    raise TimeoutError(f"{module} did not finish in {timeout} s: {states}")


def queue_empties(cluster, timeout: float = 180) -> None:
    """Wait until no job is left in the queue (finished, failed or cancelled); fail after `timeout` seconds."""
    deadline = time.time() + timeout
    while run("squeue", "-h", env=cluster.env).stdout.strip():
        assert time.time() < deadline, run("squeue", env=cluster.env).stdout
        time.sleep(1)


def output_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def clean_local(tmp_path_factory):
    """The same cleaning, run here (the reference for the Slurm runs)."""
    d = tmp_path_factory.mktemp("clean-local")
    raw = clean_corpus(d / "raw")
    cmd = [sys.executable, "-m", "llm.data.clean", "--input", raw, "--output", d / "out", "--tasks", 2]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return raw, d / "out"


def test_clean_on_slurm_submits_the_stages_as_array_jobs_and_writes_what_a_local_run_writes(
    cluster, clean_local, tmp_path
):
    pytest.importorskip("datatrove")
    raw, local = clean_local
    args = ["--input", raw, "--output", tmp_path / "out", "--tasks", 2, "--slurm", "--time", "5"]
    states, r = follow(cluster, args)
    assert states[0] == "submitted" and states[-1] == "wrote", states
    assert output_bytes(tmp_path / "out") == output_bytes(local)
    summary = json.loads((tmp_path / "out.clean" / "summary.json").read_text())
    assert summary["duplicates_removed"] == 4 and summary["kept"] == 16
    launch = (tmp_path / "out.clean" / "logs" / "filter" / "launch_script.slurm").read_text()
    assert "--qos" not in launch and "--kill-on-invalid-dep=yes" in launch and "--array=0-1" in launch


def test_a_failed_stage_on_slurm_cancels_the_later_ones_and_the_rerun_finishes_it(cluster, clean_local, tmp_path):
    pytest.importorskip("datatrove")
    raw, local = clean_local
    work = tmp_path / "out.clean"
    work.mkdir()
    (work / "signatures").write_text("a file where the signature stage makes its folder")
    args = ["--input", raw, "--output", tmp_path / "out", "--tasks", 2, "--slurm", "--time", "5"]
    r = clean_command(cluster, *args)
    assert r.returncode == 0 and r.stdout.startswith("submitted"), r.stdout + r.stderr[-2000:]
    queue_empties(cluster)  # the later stages must not pend forever
    logs = work / "logs"
    assert len(list((logs / "filter" / "completions").iterdir())) == 2  # the stage before the failure finished
    assert not (logs / "dedup" / "completions").exists() and not (work / "summary.json").exists()
    (work / "signatures").unlink()  # the cause fixed: the same command takes it from there
    states, _ = follow(cluster, args)
    assert states[0] == "submitted" and states[-1] == "wrote", states
    assert output_bytes(tmp_path / "out") == output_bytes(local)


def test_clean_on_two_nodes_writes_what_a_local_run_writes(two_nodes, clean_local, tmp_path):
    pytest.importorskip("datatrove")
    raw, local = clean_local
    args = ["--input", raw, "--output", tmp_path / "out", "--tasks", 2, "--slurm", "--time", "5"]
    states, _ = follow(two_nodes, args)
    assert states[0] == "submitted" and states[-1] == "wrote", states
    assert output_bytes(tmp_path / "out") == output_bytes(local)


# ---- python -m llm.data.prepare_data --slurm ------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepare_local(tmp_path_factory, tokenizer_dir):
    """A corpus of several work items (1 MB each) and its preparation here (the reference for the Slurm runs)."""
    from llm.data.corpus import stdlib_files

    d = tmp_path_factory.mktemp("prepare-local")
    raw = d / "raw"
    raw.mkdir()
    size = 0
    for i, f in enumerate(sorted(stdlib_files(), key=lambda f: f.stat().st_size, reverse=True)[:150]):
        shutil.copy(f, raw / f"m{i:03d}.py")
        size += f.stat().st_size
    assert size > 4e6, size  # four work items at least
    shutil.copy(raw / "m000.py", raw / "z_copy.py")  # a copy in the last task of the first task's document
    args = ["--input", raw, "--tokenizer", tokenizer_dir, "--val-fraction", 0.05, "--shard-tokens", 200_000]
    cmd = [sys.executable, "-m", "llm.data.prepare_data", *args, "--output", d / "data", "--no-progress"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return args, d / "data"


def dataset_files(out: Path) -> dict:
    """Every file of a prepared dataset; the manifest without the command, the time and the output path."""
    found = output_bytes(out)
    manifest = json.loads(found.pop("manifest.json"))
    assert manifest["config"].pop("output") == str(out) and manifest["stats"]["duplicates_dropped"] == 1
    found["manifest.json"] = {k: v for k, v in manifest.items() if k not in ("command", "created")}
    return found


def test_prepare_data_on_slurm_tokenizes_in_array_tasks_and_writes_what_a_local_run_writes(
    cluster, prepare_local, tmp_path
):
    pytest.importorskip("datatrove")
    args, local = prepare_local
    args = [*args, "--output", tmp_path / "data", "--slurm", "--tasks", 3, "--cpus-per-task", 1, "--time", "5"]
    states, r = follow(cluster, args, module="llm.data.prepare_data")
    assert states[0] == "submitted" and states[-1] == "wrote", states
    assert dataset_files(tmp_path / "data") == dataset_files(local)
    assert "--verify" in r.stdout
    verify = data_command(cluster, "llm.data.prepare_data", "--verify", tmp_path / "data")
    assert verify.returncode == 0, verify.stderr
    work = tmp_path / "data.prepare"
    assert len(list((work / "logs" / "encode" / "completions").iterdir())) == 3
    assert not (work / "encoded").exists()  # the tokens in between, removed once the shards were written
    launch = (work / "logs" / "encode" / "launch_script.slurm").read_text()
    assert "--array=0-2" in launch and "--kill-on-invalid-dep=yes" in launch and "--qos" not in launch


def test_a_failed_encode_task_cancels_the_shards_job_and_the_rerun_runs_only_that_task(
    cluster, prepare_local, tmp_path
):
    pytest.importorskip("datatrove")
    args, local = prepare_local
    args = [*args, "--output", tmp_path / "data", "--slurm", "--tasks", 3, "--cpus-per-task", 1, "--time", "5"]
    encoded = tmp_path / "data.prepare" / "encoded"
    (encoded / "00001.tokens").mkdir(parents=True)  # task 1 cannot write its tokens
    r = data_command(cluster, "llm.data.prepare_data", *args)
    assert r.returncode == 0 and r.stdout.startswith("submitted"), r.stdout + r.stderr[-2000:]
    queue_empties(cluster)  # the shards job must not pend forever
    done = {p.name: p.stat().st_mtime_ns for p in encoded.glob("*.npz")}
    assert sorted(done) == ["00000.npz", "00002.npz"] and not (tmp_path / "data").exists()
    (encoded / "00001.tokens").rmdir()  # the cause fixed: the same command takes it from there
    states, _ = follow(cluster, args, module="llm.data.prepare_data")
    assert states[0] == "submitted" and states[-1] == "wrote", states
    ranks = json.loads((tmp_path / "data.prepare" / "logs" / "encode" / "ranks_to_run.json").read_text())
    assert ranks == [1]  # only the failed task ran again
    assert dataset_files(tmp_path / "data") == dataset_files(local)


def test_prepare_data_on_two_nodes_writes_what_a_local_run_writes(two_nodes, prepare_local, tmp_path):
    pytest.importorskip("datatrove")
    args, local = prepare_local
    args = [*args, "--output", tmp_path / "data", "--slurm", "--tasks", 2, "--cpus-per-task", 1, "--time", "5"]
    states, _ = follow(two_nodes, args, module="llm.data.prepare_data")
    assert states[-1] == "wrote", states
    assert dataset_files(tmp_path / "data") == dataset_files(local)
    logs = "".join(p.read_text() for p in (tmp_path / "data.prepare" / "logs" / "encode" / "slurm").glob("*"))
    assert "on nodeA" in logs and "on nodeB" in logs, logs[-3000:]  # one CPU per node: a task on each
