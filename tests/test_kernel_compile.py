"""Every kernel configuration compiles for Hopper (sm_90), Ampere (sm_80) and Ada (sm_89, 99 KB of shared memory)
without a GPU, within each target's shared memory; every 16-bit attention product runs on tensor cores (wgmma
only on sm_90), every attention kernel's loops are pipelined (asynchronous copies, with documents too) and
nothing spills but fp32 attention and the norm backward at its largest rows. Runs kernels.compile_check in a
subprocess: kernels decorated under the interpreter (as in this test process) cannot be compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_sm80_and_sm89(tmp_path):
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
        "_attn_bwd_delta_kernel",
        "_norm_fwd_kernel",
        "_norm_bwd_kernel",
    }
    assert {r["arch"] for r in results} == {80, 89, 90}
    loops = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    for r in results:
        assert r["shared_bytes"] <= {90: 232448, 80: 166912, 89: 101376}[r["arch"]]
        if r["kernel"] in loops:
            assert r["async_copies"] > 0, r  # pipelined: tiles arrive by asynchronous copies, documents or not
            if r["dtype"] != "fp32":
                if r["arch"] == 90:
                    assert r["wgmma"] > 0 and r["mma_sync"] == 0, r
                else:
                    assert r["mma_sync"] > 0, r
        # the accepted spills: fp32 attention (checks, not training); the norm backward at 64 KB rows
        row_limit = {"bf16": 32768, "fp32": 16384}[r["dtype"]] if r["kernel"] == "_norm_bwd_kernel" else None
        largest = r["constexprs"].get("BLOCK_N") == row_limit
        if not (r["kernel"] in loops and r["dtype"] == "fp32" or largest) and r["spill_bytes"] is not None:
            assert r["spill_bytes"] == 0, r
    assert {
        (r["constexprs"].get("BLOCK_D"), r["constexprs"].get("HAS_DOC")) for r in results if r["kernel"] in loops
    } >= {(d, docs) for d in (32, 64, 128) for docs in (True, False)}
    # every variant a model can launch, with the alignment a real launch has: the sm_90 bf16 D=128 forward
    # without documents (128 x 64 tiles) is pipelined in 3 stages and needs 128 KB
    (fwd,) = [
        r
        for r in results
        if r["kernel"] == "_attn_fwd_kernel"
        and r["arch"] == 90
        and r["dtype"] == "bf16"
        and r["constexprs"] == {**r["constexprs"], "CAUSAL": True, "HAS_DOC": False, "BLOCK_D": 128}
    ]
    assert fwd["shared_bytes"] == 131072
