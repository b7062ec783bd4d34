"""Rank and world from each launcher's environment variables."""

import pytest

from llm.distributed import DistEnv, detect

LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_STEP_ID",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_NODELIST",
)


@pytest.fixture
def env(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_plain_process_is_rank_zero_of_one(env):
    assert detect() == DistEnv(0, 1, 0, "plain")


def test_torchrun_and_the_deepspeed_launcher(env):
    for k, v in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}.items():
        env.setenv(k, v)
    assert detect() == DistEnv(3, 8, 1, "torchrun")


def test_srun_task(env):
    for k, v in {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "nodeA",
        "MASTER_ADDR": "10.0.0.7",
    }.items():
        env.setenv(k, v)
    assert detect() == DistEnv(5, 16, 1, "slurm")
    import os

    assert os.environ["MASTER_ADDR"] == "10.0.0.7" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_slurm_variables_without_a_step_id_are_a_plain_run(env):
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "8")  # no SLURM_STEP_ID: not a task of an srun step, so one process, not eight
    assert detect() == DistEnv(0, 1, 0, "plain")
