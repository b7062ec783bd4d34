"""LayerNorm and RMSNorm over the last dimension, with an optional fused residual add.

`layer_norm(x, weight, bias=None, eps=1e-5, residual=None, impl="auto")`
`rms_norm(x, weight, eps=1e-6, residual=None, impl="auto")`
x: (..., N). With `residual` given, the input is h = x + residual and the result is the pair
(normalised output, h: the new residual stream); otherwise just the normalised output.

Triton kernels: one program per row computes the statistics in fp32 (forward). The backward is the
LayerNorm VJP in one pass per row, with xhat = (h - mean) * rstd and g = weight * dy:
    dh = rstd * (g - xhat * mean(g * xhat) - mean(g))        (RMSNorm: no mean(g) term, no centring)
and dweight = sum_rows dy * xhat, dbias = sum_rows dy accumulated per program over a contiguous block of
rows into a (programs, N) fp32 buffer and summed afterwards: deterministic, no atomics. With a fused
residual, x and residual both receive dh plus the gradient flowing into h.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .dispatch import FP_FUSION, choose

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the references still work
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROW_BYTES = 65536  # a row lives in registers: at most 16384 fp32 or 32768 fp16/bf16 values
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def layer_norm_ref(x, weight, bias=None, eps=1e-5, residual=None):
    h = x if residual is None else x + residual
    y = F.layer_norm(h.float(), (h.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    h = x if residual is None else x + residual
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)


if triton is not None:

    @triton.jit
    def _norm_fwd_kernel(
        X,  # (M, N) input rows
        R,  # (M, N) residual rows (HAS_RES)
        W,  # (N,) weight
        B,  # (N,) bias (HAS_BIAS)
        Y,  # (M, N) normalised output
        H,  # (M, N) x + residual: the new residual stream (HAS_RES)
        Mean,  # (M,) fp32 row means (LayerNorm)
        Rstd,  # (M,) fp32 reciprocal standard deviations
        N,
        eps,
        IS_RMS: tl.constexpr,
        HAS_RES: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(R + row * N + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(H + row * N + cols, x, mask=mask)
        x = x.to(tl.float32)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=0) / N
            tl.store(Mean + row, mean)
            xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        tl.store(Rstd + row, rstd)
        y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_bwd_kernel(
        H,  # (M, N) the normalised input (x + residual when fused)
        W,  # (N,) weight
        DY,  # (M, N) gradient of the output
        DH_OUT,  # (M, N) gradient flowing into the residual output h (HAS_DH)
        DX,  # (M, N) gradient of the input
        DW,  # (programs, N) fp32 partial sums of dweight
        DB,  # (programs, N) fp32 partial sums of dbias (HAS_BIAS)
        Mean,  # (M,) fp32
        Rstd,  # (M,) fp32
        M,
        N,
        rows_per_program,
        IS_RMS: tl.constexpr,
        HAS_DH: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program  # int64: row * N may pass 2**31
        for row in range(first, tl.minimum(first + rows_per_program, M)):
            off = row * N + cols
            h = tl.load(H + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + row)
            if IS_RMS:
                xhat = h * rstd
            else:
                xhat = tl.where(mask, (h - tl.load(Mean + row)) * rstd, 0.0)
            g = w * dy
            dx = g - xhat * (tl.sum(g * xhat, axis=0) / N)
            if not IS_RMS:
                dx -= tl.sum(g, axis=0) / N
            dx *= rstd
            if HAS_DH:
                dx += tl.load(DH_OUT + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            if HAS_BIAS:
                db += dy
        tl.store(DW + pid * N + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB + pid * N + cols, db, mask=mask)


def _block_and_warps(n: int, backward: bool = False) -> tuple[int, int]:
    """A row per program: the power-of-two block holding it, and warps to spread it (the backward keeps more
    row-sized values live, so it takes up to 32 warps: fewer register spills per ptxas at 8192+ columns)."""
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 32 if backward else 16)


def _programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))  # the interpreter: few programs, long loops


def norm_fwd(x, weight, bias, residual, eps: float, is_rms: bool):
    """x, residual: (M, N) contiguous -> (y, h, mean, rstd); h is empty without a residual."""
    M, N = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block, warps = _block_and_warps(N)
    _norm_fwd_kernel[(M,)](
        x,
        residual if residual is not None else x,
        weight,
        bias if bias is not None else weight,
        y,
        h,
        mean,
        rstd,
        N,
        eps,
        IS_RMS=is_rms,
        HAS_RES=residual is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block,
        num_warps=warps,
        **FP_FUSION,
    )
    return y, h, mean, rstd


def norm_bwd(dy, dh_out, h, weight, has_bias: bool, mean, rstd, is_rms: bool):
    """-> (dh, dweight, dbias); dh is the gradient of the normalised input h (and so of x and residual)."""
    M, N = h.shape
    dx = torch.empty_like(h)
    programs = _programs(M, h.device)
    dw = torch.empty(programs, N, dtype=torch.float32, device=h.device)
    db = torch.empty(programs, N, dtype=torch.float32, device=h.device) if has_bias else dw
    block, warps = _block_and_warps(N, backward=True)
    _norm_bwd_kernel[(programs,)](
        h,
        weight,
        dy,
        dh_out if dh_out is not None else dy,
        dx,
        dw,
        db,
        mean,
        rstd,
        M,
        N,
        triton.cdiv(M, programs),
        IS_RMS=is_rms,
        HAS_DH=dh_out is not None,
        HAS_BIAS=has_bias,
        BLOCK_N=block,
        num_warps=warps,
        **FP_FUSION,
    )
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype) if has_bias else None


@torch.library.custom_op("llm_kernels::norm", mutates_args=())
def _norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return norm_fwd(x, weight, bias, residual, eps, is_rms)


@_norm_op.register_fake
def _(x, weight, bias, residual, eps, is_rms):
    M = x.shape[0]
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    stats = x.new_empty(M, dtype=torch.float32)
    return torch.empty_like(x), h, stats, stats.clone()


@torch.library.custom_op("llm_kernels::norm_bwd", mutates_args=())
def _norm_bwd_op(
    dy: torch.Tensor,
    dh_out: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = norm_bwd(dy, dh_out, h, weight, has_bias, mean, rstd, is_rms)
    return dx, dw, db if db is not None else dw.new_empty(0)


@_norm_bwd_op.register_fake
def _(dy, dh_out, h, weight, has_bias, mean, rstd, is_rms):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(weight) if has_bias else weight.new_empty(0)


def _setup(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.has_bias, ctx.has_res, ctx.is_rms = bias is not None, residual is not None, is_rms


def _backward(ctx, dy, dh_out, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _norm_bwd_op(
        dy.contiguous(), dh_out.contiguous() if ctx.has_res else None, h, weight, ctx.has_bias, mean, rstd, ctx.is_rms
    )
    return dx, dw, db if ctx.has_bias else None, dx if ctx.has_res else None, None, None


_norm_op.register_autograd(_backward, setup_context=_setup)


def supports(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> str | None:
    """None when the Triton kernel handles these inputs, else the reason it does not."""
    if triton is None:
        return "triton is not installed"
    if not (x.is_cuda or INTERPRET):
        return "the input is not on a CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} is not fp16, bf16 or fp32"
    if x.shape[-1] * x.element_size() > MAX_ROW_BYTES:
        return f"rows of {x.shape[-1]} {x.dtype} values exceed {MAX_ROW_BYTES} bytes"
    if weight.shape != (x.shape[-1],):
        return f"weight shape {tuple(weight.shape)} is not ({x.shape[-1]},)"
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return "residual must match x in shape and dtype"
    return None


def _norm(x, weight, bias, eps, residual, is_rms):
    shape = x.shape
    rows = lambda t: t.reshape(-1, shape[-1]).contiguous()  # noqa: E731
    y, h, _, _ = _norm_op(
        rows(x),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        None if residual is None else rows(residual),
        float(eps),
        is_rms,
    )
    return y.view(shape) if residual is None else (y.view(shape), h.view(shape))


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None, impl="auto"):
    if choose("layer_norm", impl, x, supports(x, weight, residual)) == "triton":
        return _norm(x, weight, bias, eps, residual, is_rms=False)
    return layer_norm_ref(x, weight, bias, eps, residual)


def rms_norm(x, weight, eps=1e-6, residual=None, impl="auto"):
    if choose("rms_norm", impl, x, supports(x, weight, residual)) == "triton":
        return _norm(x, weight, None, eps, residual, is_rms=True)
    return rms_norm_ref(x, weight, eps, residual)
