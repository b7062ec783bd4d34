"""Causal attention with grouped-query heads and document masking: FlashAttention-2 in Triton.

`attention(q, k, v, causal=True, doc_ids=None, softmax_scale=None, impl="auto")`
q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq % Hkv == 0; doc_ids: (B, T) integer document index of each
position (a token attends only to tokens with the same id); returns (B, Hq, T, D).

Forward (FlashAttention-2, Dao 2023): one program per (query block, batch x head) streams key/value
tiles, keeping a running max m and sum l of the base-2 exponentials (the scale is folded into log2(e)), and
stores the output and the log-sum-exp (base 2) per row. Backward recomputes the probabilities from the
LSE: a preprocess delta = rowsum(dO * O); then one program per key block of each K/V head computes dK, dV,
summing over the query heads that share it (grouped-query attention without atomics, so gradients are
deterministic); then one program per query block computes dQ:
    P = exp2(S * scale * log2(e) - LSE),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),
    dK = scale * dS^T Q,  dQ = scale * dS K.
Tiles that masking empties entirely (above the causal diagonal, or outside every document of the query
block) are skipped, not computed. Accumulation is fp32; fp32 inputs use full-precision (not tf32) dots.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from kernels.dispatch import choose

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference still works
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def attention_mask(doc_ids: torch.Tensor | None, T: int, causal: bool, device) -> torch.Tensor | None:
    """(B, 1, T, T) boolean mask (True = may attend), or None when plain causal/full attention suffices."""
    if doc_ids is None:
        return None
    same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, T, T)
    if causal:
        same_doc = same_doc & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return same_doc


def attention_ref(q, k, v, causal=True, doc_ids=None, softmax_scale=None):
    """The reference: scaled dot-product attention, GQA by repeating K/V heads, masks as documented."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    mask = attention_mask(doc_ids, T, causal, q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _head(X, b, h, stride_b, stride_h):
        """Pointer to the (T, D) matrix of batch b, head h (int64 offsets: large tensors pass 2**31 elements)."""
        return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h

    @triton.jit
    def _load_rows(ptr, rows, stride_t, T, offs_d, D):
        """A (len(rows), BLOCK_D) tile of a (T, D) matrix, zero outside it."""
        mask = (rows[:, None] < T) & (offs_d[None, :] < D)
        return tl.load(ptr + rows[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _doc_span(DOC, idx, T):
        """(ids, lowest id, highest id) of the in-range positions idx of one row of document ids."""
        ids = tl.load(DOC + idx, mask=idx < T, other=-1)
        lo = tl.min(tl.where(idx < T, ids, 2147483647), axis=0)
        hi = tl.max(ids, axis=0)
        return ids, lo, hi

    @triton.jit
    def _allowed(rows, cols, T, q_doc, k_doc, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
        """(BLOCK_M, BLOCK_N) mask: query row may attend to key col."""
        ok = (rows[:, None] < T) & (cols[None, :] < T)
        if CAUSAL:
            ok = ok & (rows[:, None] >= cols[None, :])
        if HAS_DOC:
            ok = ok & (q_doc[:, None] == k_doc[None, :])
        return ok

    @triton.jit
    def _attn_fwd_kernel(
        Q,  # (B, Hq, T, D)
        K,  # (B, Hkv, T, D)
        V,  # (B, Hkv, T, D)
        O,  # (B, Hq, T, D) contiguous  # noqa: E741
        LSE,  # (B, Hq, T) fp32, base-2 log-sum-exp of the scaled scores
        DOC,  # (B, T) int32 document ids (HAS_DOC)
        qk_scale,  # softmax scale * log2(e)
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        H, GROUP, T, D,
        CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        Kb = _head(K, b, h // GROUP, stride_kb, stride_kh)
        Vb = _head(V, b, h // GROUP, stride_vb, stride_vh)
        q = _load_rows(_head(Q, b, h, stride_qb, stride_qh), rows, stride_qt, T, offs_d, D)
        q_doc, q_lo, q_hi = rows, 0, 0
        if HAS_DOC:
            q_doc, q_lo, q_hi = _doc_span(DOC + b * T, rows, T)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T) if CAUSAL else T
        for start in range(0, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k_doc, visit = cols, True
            if HAS_DOC:
                k_doc, k_lo, k_hi = _doc_span(DOC + b * T, cols, T)
                visit = (k_hi >= q_lo) & (k_lo <= q_hi)  # some pair may share a document
            if visit:
                k = _load_rows(Kb, cols, stride_kt, T, offs_d, D)
                v = _load_rows(Vb, cols, stride_vt, T, offs_d, D)
                s = _dot(q, tl.trans(k), IEEE) * qk_scale
                s = tl.where(_allowed(rows, cols, T, q_doc, k_doc, CAUSAL, HAS_DOC), s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing to attend to yet
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
                m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(
            O + pid_bh.to(tl.int64) * T * D + rows[:, None] * D + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=(rows[:, None] < T) & (offs_d[None, :] < D),
        )
        tl.store(LSE + pid_bh.to(tl.int64) * T + rows, m_i + tl.log2(l_safe), mask=rows < T)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V,  # (B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D)
        DO,  # (B, Hq, T, D) contiguous: gradient of the output
        LSE, DELTA,  # (B, Hq, T) fp32
        DOC,  # (B, T) int32 (HAS_DOC)
        DK, DV,  # (B, Hkv, T, D) contiguous
        qk_scale, sm_scale,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        HKV, GROUP, T, D,
        CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        b, hk = pid_bh // HKV, pid_bh % HKV
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_rows(_head(K, b, hk, stride_kb, stride_kh), cols, stride_kt, T, offs_d, D)
        v = _load_rows(_head(V, b, hk, stride_vb, stride_vh), cols, stride_vt, T, offs_d, D)
        k_doc, k_lo, k_hi = cols, 0, 0
        if HAS_DOC:
            k_doc, k_lo, k_hi = _doc_span(DOC + b * T, cols, T)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0  # earlier queries cannot see these keys
        for g in range(GROUP):  # every query head sharing this K/V head: summed here, no atomics
            h = hk * GROUP + g
            Qh = _head(Q, b, h, stride_qb, stride_qh)
            stats = (b * HKV * GROUP + h).to(tl.int64) * T  # row offset of (b, h) in LSE, DELTA; times D in DO
            for start in range(lo, T, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                q_doc, visit = rows, True
                if HAS_DOC:
                    q_doc, q_lo, q_hi = _doc_span(DOC + b * T, rows, T)
                    visit = (k_hi >= q_lo) & (k_lo <= q_hi)
                if visit:
                    q = _load_rows(Qh, rows, stride_qt, T, offs_d, D)
                    do = _load_rows(DO + stats * D, rows, D, T, offs_d, D)
                    lse = tl.load(LSE + stats + rows, mask=rows < T, other=0.0)
                    delta = tl.load(DELTA + stats + rows, mask=rows < T, other=0.0)
                    s = _dot(q, tl.trans(k), IEEE) * qk_scale
                    ok = _allowed(rows, cols, T, q_doc, k_doc, CAUSAL, HAS_DOC)
                    p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
                    dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
                    dp = _dot(do, tl.trans(v), IEEE)
                    ds = p * (dp - delta[:, None])
                    dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        out_mask = (cols[:, None] < T) & (offs_d[None, :] < D)
        out = pid_bh.to(tl.int64) * T * D + cols[:, None] * D + offs_d[None, :]
        tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO,  # as in the dK/dV kernel
        LSE, DELTA,  # (B, Hq, T) fp32
        DOC,  # (B, T) int32 (HAS_DOC)
        DQ,  # (B, Hq, T, D) contiguous
        qk_scale, sm_scale,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        H, GROUP, T, D,
        CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        k_base = _head(K, b, h // GROUP, stride_kb, stride_kh)
        v_base = _head(V, b, h // GROUP, stride_vb, stride_vh)
        q = _load_rows(_head(Q, b, h, stride_qb, stride_qh), rows, stride_qt, T, offs_d, D)
        do = _load_rows(DO + pid_bh.to(tl.int64) * T * D, rows, D, T, offs_d, D)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        q_doc, q_lo, q_hi = rows, 0, 0
        if HAS_DOC:
            q_doc, q_lo, q_hi = _doc_span(DOC + b * T, rows, T)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T) if CAUSAL else T
        for start in range(0, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k_doc, visit = cols, True
            if HAS_DOC:
                k_doc, k_lo, k_hi = _doc_span(DOC + b * T, cols, T)
                visit = (k_hi >= q_lo) & (k_lo <= q_hi)
            if visit:
                k = _load_rows(k_base, cols, stride_kt, T, offs_d, D)
                v = _load_rows(v_base, cols, stride_vt, T, offs_d, D)
                s = _dot(q, tl.trans(k), IEEE) * qk_scale
                ok = _allowed(rows, cols, T, q_doc, k_doc, CAUSAL, HAS_DOC)
                p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
                ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
                dq += _dot(ds.to(k.dtype), k, IEEE)
        tl.store(
            DQ + pid_bh.to(tl.int64) * T * D + rows[:, None] * D + offs_d[None, :],
            (dq * sm_scale).to(DQ.dtype.element_ty),
            mask=(rows[:, None] < T) & (offs_d[None, :] < D),
        )


# Block sizes and warps: (BLOCK_M, BLOCK_N, num_warps, num_stages) by pass, GPU generation and head-dim bucket,
# for fp16/bf16. Chosen among candidates that fit shared memory, for no register spills in ptxas -v (one small
# spill left: sm_80 forward at D=128, 8 bytes; dK/dV at D=64 on sm_80 spills ~256 bytes in every candidate
# tried) and tensor-core use (wgmma needs BLOCK_M >= 64 on sm_90). Not yet timed on a GPU.
# Generation 90: Hopper and datacenter Blackwell (227 KB of shared memory per block). Generation 80: Ampere,
# Ada and consumer Blackwell (sm_80/87: 163 KB; sm_86/89/120: 99 KB), whose 16-bit entries all fit 99 KB.
# fp32 (checks, not training) takes one small configuration everywhere: it fits 99 KB (at most 68 KB).
# `python -m kernels.compile_check` prints shared memory, registers and spills for every entry.
CONFIGS = {
    "fwd": {90: {64: (128, 64, 4, 3), 128: (128, 32, 8, 3)}, 80: {64: (128, 64, 8, 3), 128: (128, 32, 8, 3)}},
    "dkdv": {90: {64: (64, 64, 4, 2), 128: (32, 64, 8, 2)}, 80: {64: (32, 64, 4, 2), 128: (64, 64, 8, 2)}},
    "dq": {90: {64: (64, 64, 4, 2), 128: (64, 32, 8, 2)}, 80: {64: (64, 64, 4, 2), 128: (64, 64, 8, 2)}},
}
FP32_CONFIG = (32, 32, 4, 2)
INTERPRET_BLOCK = 64  # the interpreter pays per program and per loop step, not per tile size


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def generation(arch: int) -> int:
    """The table a compute capability uses: 90 for sm_90/sm_100/sm_103, 80 for every other (sm_80 and up)."""
    return 90 if arch in (90, 100, 103) else 80


def config(kind: str, D: int, arch: int | None, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    if arch is None:
        return INTERPRET_BLOCK, INTERPRET_BLOCK, 4, 1
    if dtype == torch.float32:
        return FP32_CONFIG
    return CONFIGS[kind][generation(arch)][64 if block_d(D) <= 64 else 128]


def _arch(x: torch.Tensor) -> int | None:
    if not x.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


def _strides(q, k, v) -> list[int]:
    """Batch, head and time strides of q, k and v (the head dimension is contiguous)."""
    return [s for t in (q, k, v) for s in t.stride()[:3]]


def _doc_arg(doc_ids, q):
    return doc_ids.to(torch.int32).contiguous() if doc_ids is not None else q.new_empty(0, dtype=torch.int32)


def attention_fwd(q, k, v, doc_ids, causal: bool, scale: float):
    """-> (o (B, Hq, T, D), lse (B, Hq, T) fp32 base 2)."""
    B, H, T, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever q's layout
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = config("fwd", D, _arch(q), q.dtype)
    _attn_fwd_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, o, lse, _doc_arg(doc_ids, q), scale * LOG2E,
        *_strides(q, k, v), H, H // k.shape[1], T, D,
        CAUSAL=causal, HAS_DOC=doc_ids is not None, IEEE=q.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(D), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o, lse


def attention_bwd(do, q, k, v, o, lse, doc_ids, causal: bool, scale: float):
    """-> (dq, dk, dv)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)  # the preprocess: rowsum(dO * O), (B, Hq, T)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
    doc, arch, common = (
        _doc_arg(doc_ids, q),
        _arch(q),
        dict(CAUSAL=causal, HAS_DOC=doc_ids is not None, IEEE=q.dtype == torch.float32, BLOCK_D=block_d(D)),
    )
    bm, bn, warps, stages = config("dkdv", D, arch, q.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * Hkv)](
        q, k, v, do, lse, delta, doc, dk, dv, scale * LOG2E, scale,
        *_strides(q, k, v), Hkv, H // Hkv, T, D,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
    )  # fmt: skip
    bm, bn, warps, stages = config("dq", D, arch, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, do, lse, delta, doc, dq, scale * LOG2E, scale,
        *_strides(q, k, v), H, H // Hkv, T, D,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
    )  # fmt: skip
    return dq, dk, dv


@torch.library.custom_op("llm_kernels::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, doc_ids, causal, scale)


@_attention_op.register_fake
def _(q, k, v, doc_ids, causal, scale):
    B, H, T, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("llm_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    doc_ids: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse, doc_ids, causal, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, doc_ids, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, doc_ids, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, doc_ids)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, doc_ids = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, doc_ids, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup)


def supports(q, k, v, doc_ids=None) -> str | None:
    """None when the Triton kernel handles these inputs, else the reason it does not."""
    if triton is None:
        return "triton is not installed"
    if not (q.is_cuda or INTERPRET):
        return "the inputs are not on a CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} are not one of fp16, bf16, fp32 for all three"
    if q.shape[-1] > 128:
        return f"head dim {q.shape[-1]} is above 128"
    if q.is_cuda and _arch(q) < 80:
        return f"compute capability {_arch(q)} is below 8.0"
    return None


def _check(q, k, v, doc_ids):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"attention wants q (B, Hq, T, D) and k, v (B, Hkv, T, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or Hq % k.shape[1]:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not fit q {tuple(q.shape)} (needs Hq % Hkv == 0)")
    if doc_ids is not None and tuple(doc_ids.shape) != (B, T):
        raise ValueError(f"doc_ids must be (B, T) = {(B, T)}, got {tuple(doc_ids.shape)}")


def attention(q, k, v, causal=True, doc_ids=None, softmax_scale=None, impl="auto"):
    _check(q, k, v, doc_ids)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if choose("attention", impl, q, supports(q, k, v, doc_ids)) == "triton":
        contig = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
        o, _ = _attention_op(contig(q), contig(k), contig(v), doc_ids, bool(causal), float(scale))
        return o
    return attention_ref(q, k, v, causal, doc_ids, softmax_scale)
