"""Compile every Triton kernel, in every configuration its launcher can choose, for a GPU target, without a GPU.

    python tools/compile_check.py [--arch 90] [--arch 80] [--arch 89] [--json PATH]

Every attention variant a model launches (causal or not, with or without documents; bf16 at head dims 32, 64
and 128 (80 and 96 compile as 128), fp16 and fp32 at 128; the delta preprocess), for sm_90, sm_80 and sm_89
(99 KB of shared memory, as sm_86 and sm_120), with the alignment specialization a real launch gets. Fails
(exit 1) when a configuration needs more shared memory than the target allows (compilation itself does not
check that; launching would fail); when a 16-bit attention product is not on tensor cores: any `mma.sync` on
sm_90, where every product must be `wgmma`, or none on sm_80/89; when an attention kernel has no asynchronous
copy (cp.async / TMA: its main loops are not software-pipelined), or any loop of one that runs tensor-core
products (16-bit; fp32 dots are FMAs) without an asynchronous copy in its body (`loops`: one unpipelined
loop among pipelined ones); when registers spill, except the few accepted in `accepted_spill` (fp32
attention; the norm backward at 64 KB rows; 12 bytes in the sm_89 forward at head dim 32). Prints, per
configuration: shared memory, registers, spills, wgmma / mma.sync / async-copy instruction counts, and the
pipelined loops among the loops with products.
Must run with TRITON_INTERPRET unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import _bootstrap  # noqa: F401

from llm.kernels.dispatch import FP_FUSION

# bytes of shared memory per block (opt-in maximum): H100/H200, A100, L40S/RTX 4090 (as sm_86 and sm_120)
SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376}
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PTR_TYPES = {
    "LSE": "*fp32",
    "DELTA": "*fp32",
    "Mean": "*fp32",
    "Rstd": "*fp32",
    "DW": "*fp32",
    "DB": "*fp32",
    "DOC": "*i32",
    "RANGES": "*i32",
}
FLOATS = {"qk_scale", "sm_scale", "eps"}
# the attention kernels with a main loop over tiles
ATTENTION_LOOPS = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}


def accepted_spill(name: str, arch: int, dtype: str, constexprs: dict, spills: int) -> bool:
    """The register spills accepted, each for a reason: fp32 attention (checks, not training) spills at D=128 in
    every configuration tried; the norm backward at 64 KB rows (the row kept in registers by 1024 threads, at
    most 64 registers each) spills about 1 KB; on sm_89 the 16-bit forward at head dim 32 (128 x 64 tiles, 8
    warps: the gen-80 entry it shares with D=64) is held to 128 registers by ptxas and spills 12 bytes, where
    sm_80 compiles the same code to 143 registers and none (other entries spill elsewhere: until timed on a
    GPU, the entry stays)."""
    if name in ATTENTION_LOOPS:
        if arch == 89 and name == "_attn_fwd_kernel" and constexprs["BLOCK_D"] == 32 and dtype != "fp32":
            return spills <= 16
        return dtype == "fp32"
    return name == "_norm_bwd_kernel" and constexprs["BLOCK_N"] * (4 if dtype == "fp32" else 2) >= 65536


# sizes; every other capitalised argument is a tensor
INTS = {"_attn": {"H", "HKV", "GROUP", "T", "D"}, "_norm": {"M", "N"}}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in PTR_TYPES:
            sig[name] = PTR_TYPES[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        elif (
            name[0].isupper() and name not in INTS[fn.__name__[:5]]
        ):  # tensors, named in capitals, hold the input dtype
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


def _attrs(fn, signature: dict) -> dict:
    """The specialization a real launch gets (Triton marks an argument divisible by 16 when it is): every
    pointer (PyTorch allocations are aligned), every stride and the sizes T, D and N (a contiguous head dim of
    16-128, a sequence length and a row width that are multiples of 16). Without these hints Triton cannot
    vectorise or pipeline the loads, and reports less shared memory than a launch uses."""
    aligned = {"T", "D", "N"}
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or name.startswith("stride_") or name in aligned
    }


def _modules():
    from llm.kernels import attention, norm

    return attention, norm


def jobs(archs: list[int]) -> list[tuple]:
    """(kernel name, arch, dtype, constexprs, num_warps, num_stages) for every configuration."""
    import torch

    A, N = _modules()
    out = []
    for arch in archs:
        for kind, name in (
            ("fwd", "_attn_fwd_kernel"),
            ("dkdv", "_attn_bwd_dkdv_kernel"),
            ("dq", "_attn_bwd_dq_kernel"),
        ):
            # every variant a model launches in bf16 at both head-dim buckets (causal or not, with or without
            # documents: the loops and loads differ); fp16 compiles as bf16 does (one variant), fp32 (checks, not
            # training) with and without documents at the larger bucket
            variants = [("bf16", c, d, bd) for c in (True, False) for d in (True, False) for bd in (64, 128)]
            variants += [("bf16", True, d, 32) for d in (True, False)]  # D=32: its own BLOCK_D (80, 96 take 128)
            variants += [("fp16", True, True, 128), ("fp32", True, True, 128), ("fp32", True, False, 128)]
            for dtype, causal, docs, bd in variants:
                bm, bn, warps, stages = A.config(kind, bd, arch, getattr(torch, TORCH_DTYPES[dtype]), causal, docs)
                ce = dict(CAUSAL=causal, HAS_DOC=docs, IEEE=dtype == "fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
                out.append((name, arch, dtype, ce, warps, stages))
        out.append(("_attn_bwd_delta_kernel", arch, "bf16", dict(BLOCK_M=128, BLOCK_D=128), 4, 1))
        if arch == 89:  # the norms keep a row in registers: the same code as sm_80, no shared-memory table
            continue
        for dtype, sizes in (("bf16", (1024, 4096, 32768)), ("fp32", (1024, 4096, 16384))):
            for n in sizes:
                block, warps = N._block_and_warps(n)
                fwd = dict(IS_RMS=False, HAS_RES=True, HAS_BIAS=True, BLOCK_N=block)
                out.append(("_norm_fwd_kernel", arch, dtype, fwd, warps, 1))
                block, warps = N._block_and_warps(n, backward=True)
                bwd = dict(IS_RMS=False, HAS_DH=True, HAS_BIAS=True, BLOCK_N=block)
                out.append(("_norm_bwd_kernel", arch, dtype, bwd, warps, 1))
    return out


def _ptxas_report(ptx: str, arch: int) -> tuple[int | None, int | None, bool]:
    """(registers per thread, spill bytes, wgmma serialized) from Triton's bundled ptxas -v; Nones if unavailable.
    Compilation metadata lacks these: they are known only once loaded on a device."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"\.target\s+(sm_\w+)", ptx)
    try:
        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - the report is optional
        return None, None, False
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(ptx)
        fh.flush()
        r = subprocess.run(
            [ptxas, "-v", f"--gpu-name={target.group(1) if target else f'sm_{arch}'}", fh.name, "-o", os.devnull],
            capture_output=True,
            text=True,
        )
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return (
        int(regs.group(1)) if regs else None,
        max(spills) if spills else None,
        "C7512" in text or "wgmma serialized" in text,
    )


ASYNC_COPY = ("cp.async.cg", "cp.async.ca", "cp.async.bulk")
PRODUCT = ("wgmma.mma_async", "mma.sync")


def loops(ptx: str) -> list[dict]:
    """The loops of a PTX kernel: each backward branch (`bra $L__BB..` to a label above it) closes one, its body
    the lines from the label to the branch (an outer loop's body holds its inner loops). Per loop: the lines,
    the tensor-core products and the asynchronous global->shared copies in its body."""
    lines, labels, out = ptx.splitlines(), {}, []
    for i, line in enumerate(lines):
        label = re.match(r"\s*(\$L__BB\d+_\d+):", line)
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if branch and labels.get(branch.group(1), i) < i:
            body = "\n".join(lines[labels[branch.group(1)] : i + 1])
            out.append(
                {
                    "lines": i - labels[branch.group(1)],
                    "products": sum(body.count(k) for k in PRODUCT),
                    "async_copies": sum(body.count(k) for k in ASYNC_COPY),
                }
            )
    return out


def compile_one(job: tuple) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    A, N = _modules()
    name, arch, dtype, constexprs, warps, stages = job
    fn = getattr(A, name, None) or getattr(N, name)
    signature = _signature(fn, dtype, constexprs)
    src = ASTSource(fn, signature, constexprs, _attrs(fn, signature))
    options = {"num_warps": warps, "num_stages": stages, **FP_FUSION}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    registers, spills, serialized = _ptxas_report(ptx, arch)
    wgmma, mma_sync = ptx.count("wgmma.mma_async"), ptx.count("mma.sync")
    tensor_cores = "wgmma" if wgmma else "mma" if mma_sync else None
    # asynchronous global->shared copies: what software pipelining is made of
    async_copies = sum(ptx.count(k) for k in ASYNC_COPY)
    product_loops = [loop for loop in loops(ptx) if loop["products"]]
    unpipelined = sum(1 for loop in product_loops if not loop["async_copies"])
    shared = kernel.metadata.shared
    problems = []
    if shared > SMEM_LIMIT[arch]:
        problems.append(f"needs {shared} bytes of shared memory, sm_{arch} allows {SMEM_LIMIT[arch]}")
    attention = name in ATTENTION_LOOPS
    if attention and dtype != "fp32":
        if arch == 90 and (mma_sync or not wgmma):
            problems.append(f"{mma_sync} products on mma.sync, {wgmma} on wgmma: every one must be wgmma on sm_90")
        if arch != 90 and not mma_sync:
            problems.append("no tensor-core (mma.sync) instruction in the PTX")
    if attention and not async_copies:
        problems.append("no asynchronous copy (cp.async / TMA): the main loops are not pipelined")
    elif attention and unpipelined:
        problems.append(f"{unpipelined} of {len(product_loops)} loops with products have no asynchronous copy")
    if spills and not accepted_spill(name, arch, dtype, constexprs, spills):
        problems.append(f"spills {spills} bytes of registers")
    return {
        "kernel": name,
        "arch": arch,
        "dtype": dtype,
        "constexprs": constexprs,
        "num_warps": warps,
        "num_stages": stages,
        "shared_bytes": shared,
        "tensor_cores": tensor_cores,
        "wgmma": wgmma,
        "mma_sync": mma_sync,
        "async_copies": async_copies,
        "product_loops": len(product_loops),
        "unpipelined_loops": unpipelined,
        "registers": registers,
        "spill_bytes": spills,
        "wgmma_serialized": serialized,
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT))
    p.add_argument("--json", help="write every result here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    todo = jobs(args.arch or [90, 80, 89])
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(pool.map(compile_one, todo))
    bad = [r for r in results if r["problems"]]
    for r in results:
        flag = "FAIL" if r["problems"] else "ok  "
        shape = {k: v for k, v in r["constexprs"].items() if k.startswith("BLOCK")}
        if r["kernel"] in ATTENTION_LOOPS:
            shape |= {k: int(r["constexprs"][k]) for k in ("CAUSAL", "HAS_DOC")}
        note = " WGMMA-SERIALIZED" if r["wgmma_serialized"] else ""
        print(
            f"{flag} sm_{r['arch']} {r['kernel']:<22} {r['dtype']:<5} {shape} warps={r['num_warps']} "
            f"smem={r['shared_bytes']} wgmma={r['wgmma']} mma={r['mma_sync']} async={r['async_copies']} "
            f"pipelined loops={r['product_loops'] - r['unpipelined_loops']}/{r['product_loops']} "
            f"regs={r['registers']} spill={r['spill_bytes']}"
            f"{note} {'; '.join(r['problems'])}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print(f"{len(results) - len(bad)}/{len(results)} configurations compile within their target's limits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
