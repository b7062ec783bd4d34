"""Every kernel configuration compiles for Hopper (sm_90), Ampere (sm_80) and Ada (sm_89, 99 KB of shared memory)
without a GPU, within each target's shared memory; every 16-bit attention product runs on tensor cores (wgmma
only on sm_90), every attention kernel's loops are pipelined (asynchronous copies, with documents too) and
nothing spills but fp32 attention and the norm backward at its largest rows. Runs tools/compile_check.py in a
subprocess: kernels decorated under the interpreter (as in this test process) cannot be compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


PTX = """
$L__BB0_1:
    cp.async.cg.shared.global [%r1], [%rd1], 16;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd2, %rd3;
    @%p1 bra $L__BB0_1;
$L__BB0_2:
    ld.global.v4.b32 {%r2, %r3, %r4, %r5}, [%rd4];
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f2}, {%r2}, {%r3}, {%f2};
    @%p2 bra.uni $L__BB0_2;
    bra.uni $L__BB0_3;
$L__BB0_3:
    ret;
"""


def test_loops_are_found_and_an_unpipelined_one_is_told_apart(monkeypatch):
    # two loops (backward branches), the second loading with plain ld.global: its products wait on each load;
    # a forward branch is no loop
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from compile_check import loops

    assert loops(PTX) == [
        {"lines": 3, "products": 1, "async_copies": 1},
        {"lines": 3, "products": 1, "async_copies": 0},
    ]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_sm80_and_sm89(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    r = subprocess.run(
        [sys.executable, "tools/compile_check.py", "--json", str(out)],
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
            assert r["unpipelined_loops"] == 0, r
            if r["dtype"] != "fp32":  # fp32 dots are FMAs (IEEE): no tensor-core products to find loops by
                # every loop with products is pipelined: the masked and unmasked ranges (2 loops, 3 with documents)
                assert r["product_loops"] >= (3 if r["constexprs"]["HAS_DOC"] else 2), r
                if r["arch"] == 90:
                    assert r["wgmma"] > 0 and r["mma_sync"] == 0, r
                else:
                    assert r["mma_sync"] > 0, r
        # the accepted spills: fp32 attention (checks, not training); the norm backward at 64 KB rows; a few
        # bytes in the sm_89 forward at head dim 32 (ptxas holds it to 128 registers)
        row_limit = {"bf16": 32768, "fp32": 16384}[r["dtype"]] if r["kernel"] == "_norm_bwd_kernel" else None
        largest = r["constexprs"].get("BLOCK_N") == row_limit
        small_fwd = (r["kernel"], r["arch"], r["constexprs"].get("BLOCK_D")) == ("_attn_fwd_kernel", 89, 32)
        if small_fwd and r["spill_bytes"] is not None:
            assert r["spill_bytes"] <= 16, r
        elif not (r["kernel"] in loops and r["dtype"] == "fp32" or largest) and r["spill_bytes"] is not None:
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
