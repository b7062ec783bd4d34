"""Choosing between a Triton kernel and its PyTorch reference: explicit, and logged once per op."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("llm.kernels")
_logged: set[tuple[str, str]] = set()
IMPLS = ("auto", "triton", "torch")
# every launch asks for fused multiply-adds: Triton's default until 3.9, which warns that 3.10 turns them off
# (the attention's exponent, s * scale - max, is then one FMA per score instead of a multiply and a subtract)
FP_FUSION = {"enable_fp_fusion": True}


def choose(op: str, impl: str, x: torch.Tensor, unsupported: str | None) -> str:
    """Return "triton" or "torch" for `op`. `unsupported` is None when the kernel handles the input, else
    the reason; an explicit impl="triton" with a reason raises it."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "triton" and unsupported:
        raise ValueError(f"{op}: impl='triton' cannot run: {unsupported}")
    use = "triton" if impl == "triton" or (impl == "auto" and x.is_cuda and not unsupported) else "torch"
    if (op, use) not in _logged:
        _logged.add((op, use))
        log.info("%s: using the %s implementation (impl=%s)", op, use, impl)
    return use
