"""Every kernel configuration compiles for Hopper (sm_90) and Ampere (sm_80) without a GPU, within each target's
shared memory, and the 16-bit attention kernels use tensor cores. Runs kernels.compile_check in a subprocess:
kernels decorated under the interpreter (as in this test process) cannot be compiled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    r = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(out.read_text())
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "_attn_fwd_kernel",
        "_attn_bwd_dkdv_kernel",
        "_attn_bwd_dq_kernel",
        "_norm_fwd_kernel",
        "_norm_bwd_kernel",
    }
    assert {r["arch"] for r in results} == {80, 90}
    for r in results:
        assert r["shared_bytes"] <= {90: 232448, 80: 166912}[r["arch"]]
        if r["kernel"].startswith("_attn") and r["dtype"] != "fp32":
            assert r["tensor_cores"] == ("wgmma" if r["arch"] == 90 else "mma"), r
