"""Rank and world from each launcher's environment, GPU binding, and the Slurm rendezvous through the run directory."""

import json
import threading

import pytest
import torch

from llm.parallel import slurm
from llm.parallel.distributed import DistEnv, detect, gpu_index
from llm.parallel.slurm import LaunchError

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
    "SLURM_STEP_NUM_NODES",
    "SLURM_NNODES",
    "SLURM_JOB_NUM_NODES",
    "SLURM_RESTART_COUNT",
    "SLURMD_NODENAME",
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
    for k, v in {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}.items():
        env.setenv(k, v)
    assert detect() == DistEnv(5, 16, 1, "slurm")


@pytest.mark.parametrize("visible, local_rank, index", [(1, 3, 0), (8, 3, 3), (4, 0, 0)])
def test_each_rank_drives_its_own_gpu(monkeypatch, visible, local_rank, index):
    # --gpus-per-task=1: every task sees one device, number 0; all devices visible: LOCAL_RANK picks one
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert gpu_index(DistEnv(local_rank, 8, local_rank, "slurm")) == index


def test_too_few_gpus_for_the_tasks_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("SLURMD_NODENAME", "gpu17")
    with pytest.raises(LaunchError, match="rank 5 on gpu17 has local rank 3 but sees 2 GPU"):
        gpu_index(DistEnv(5, 8, 3, "slurm"))


def test_the_rendezvous_goes_through_the_run_directory(env, tmp_path):
    step = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "2", "SLURM_RESTART_COUNT": "1", "SLURMD_NODENAME": "n1"}
    for k, v in step.items():
        env.setenv(k, v)
    env.setattr(slurm, "node_addr", lambda node: "127.0.0.1")
    stores = {}
    rank1 = threading.Thread(target=lambda: stores.update(r1=slurm.rendezvous(tmp_path, 1, 2, 30)))
    rank1.start()  # waits for rank 0's file
    stores["r0"] = slurm.rendezvous(tmp_path, 0, 2, 30)
    rank1.join()
    info = json.loads((tmp_path / "77.2.1.json").read_text())
    assert info == {"addr": "127.0.0.1", "port": stores["r0"].port, "node": "n1"} and info["port"] > 0
    stores["r0"].set("hello", "world")
    assert stores["r1"].get("hello") == b"world"


def test_a_node_that_does_not_see_the_run_directory_says_so(env, tmp_path):
    env.setenv("SLURMD_NODENAME", "nodeB")
    with pytest.raises(
        LaunchError,
        match=r"rank 3 on nodeB: rank 0's rendezvous file .* did not appear within 0.3 s; "
        r"the run directory must be on a filesystem shared by every node",
    ):
        slurm.rendezvous(tmp_path, 3, 4, 0.3)


def test_a_multi_node_step_never_advertises_loopback(env, tmp_path):
    env.setenv("SLURM_STEP_NUM_NODES", "2")
    env.setenv("SLURMD_NODENAME", "localhost")
    env.setattr(slurm, "node_addr", lambda node: None)
    with pytest.raises(LaunchError, match="rank 0 on localhost: this 2-node step would advertise the loopback address"):
        slurm.rendezvous(tmp_path, 0, 4, 5)


def test_a_leftover_rank_and_world_size_under_srun_is_refused(env):
    # e.g. exported from a shell where a single-process run had set them: each task would train alone
    leftover = {"RANK": "0", "WORLD_SIZE": "1"}
    for k, v in {**leftover, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}.items():
        env.setenv(k, v)
    with pytest.raises(LaunchError, match="RANK=0 WORLD_SIZE=1 are set, but this is one of 2 tasks of an srun step"):
        detect()


def test_slurm_variables_without_a_step_id_are_a_plain_run(env):
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "8")  # no SLURM_STEP_ID: not a task of an srun step, so one process, not eight
    assert detect() == DistEnv(0, 1, 0, "plain")
