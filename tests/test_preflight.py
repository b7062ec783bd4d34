"""The launch's pre-flight (llm/training/preflight.py) on two real gloo ranks: a healthy launch passes; a rank
that does not see rank 0's run directory, or whose all-reduce gives a wrong answer, fails the launch on every
rank with one message naming that rank and its node. (Two ranks driving one GPU needs GPUs: not tested here.)"""

import subprocess
import sys
import textwrap

import pytest
from launch import environment, free_port

pytestmark = pytest.mark.distributed

RANK = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from llm.training.preflight import PreflightError, preflight

    rank, fault, run_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 1 and fault == "unshared":  # as a node that mounts something else at the run directory's path
        seen = Path.is_file
        Path.is_file = lambda p: False if "preflight-" in p.name else seen(p)
    if rank == 1 and fault == "allreduce":
        real = dist.all_reduce
        dist.all_reduce = lambda t, *a, **k: (real(t, *a, **k), t.add_(1))[0]  # a broken link's wrong sum
    try:
        preflight(rank, 2, torch.device("cpu"), run_dir, "launch-1")
        print("passed")
    except PreflightError as e:
        print(e)
    dist.destroy_process_group()
    """
)


def run_two_ranks(tmp_path, fault: str) -> list[str]:
    env = {**environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), fault, str(tmp_path / "run")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [out.strip() for out, _ in outs]


def test_a_healthy_launch_passes_and_leaves_no_token(tmp_path):
    assert run_two_ranks(tmp_path, "none") == ["passed", "passed"]
    assert list((tmp_path / "run" / "rendezvous").iterdir()) == []


@pytest.mark.parametrize(
    "fault, problem",
    [
        (
            "unshared",
            "rank 1 on {node} does not see rank 0's run directory {run}: it must be on a filesystem shared by "
            "every node",
        ),
        ("allreduce", "rank 1 on {node}: an all-reduce gave a wrong answer (check the network/NCCL setup)"),
    ],
)
def test_a_broken_rank_fails_every_rank_naming_it(tmp_path, fault, problem):
    from llm.parallel.slurm import node_name

    said = run_two_ranks(tmp_path, fault)
    expected = "pre-flight: " + problem.format(node=node_name(), run=tmp_path / "run")
    assert said == [expected, expected]
