"""Causal attention with grouped-query heads and document masking: FlashAttention-2 in Triton.

`attention(q, k, v, causal=True, doc_ids=None, softmax_scale=None, impl="auto")`
q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq % Hkv == 0; doc_ids: (B, T) integer document index of each
position (a token attends only to tokens with the same id); returns (B, Hq, T, D).

Forward (FlashAttention-2, Dao 2023): one program per (query block, batch x head), the longest causal rows
first, streams key/value tiles, keeping a running max m and sum l of the base-2 exponentials (the scale is
folded into log2(e), and applied to each row's max and in the exponent, exp2(s * scale - m): one FMA per score,
not a multiply and a subtract; so the scale must be positive), and stores the output and the log-sum-exp (base
2) per row. Backward recomputes the
probabilities from the LSE: a preprocess kernel delta = rowsum(dO * O); then one program per key block of each
K/V head computes dK, dV, summing over the query heads that share it (grouped-query attention without atomics,
so gradients are deterministic), with keys as the rows of every product (S^T = K Q^T: on Hopper all of them
are wgmma, and P, dS need no transpose); then one program per query block computes dQ:
    P = exp2(S * scale * log2(e) - LSE),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),
    dK = scale * dS^T Q,  dQ = scale * dS K.
Every loop visits only the tiles a block can see, in three ranges [a, u0) masked, [u0, u1) unmasked, [u1, e)
masked, with its loads outside any branch (so the compiler pipelines them): causally, the unmasked tiles are
those off the diagonal. With document ids the ranges come from `tile_ranges`: packed documents are contiguous,
so a query block sees keys from its first query's document start to its last query, and only the tiles at
document boundaries are masked. Ids that decrease along a row (unsorted or repeated documents) are still
exact, through a fallback that masks every tile up to the causal bound. Accumulation is fp32; fp32 inputs use
full-precision (not tf32) dots. Offsets within a (T, D) matrix are int32, so T * D < 2**31 (a view whose rows
are further apart is copied into (B, H, T, D) order first); batch and head offsets are int64.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .dispatch import FP_FUSION, choose

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference still works
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
FP32_TINY, FP32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38  # the smallest normal and the largest fp32


def attention_mask(doc_ids: torch.Tensor | None, T: int, causal: bool, device) -> torch.Tensor | None:
    """(B, 1, T, T) boolean mask (True = may attend), or None when plain causal/full attention suffices."""
    if doc_ids is None:
        return None
    same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, T, T)
    if causal:
        same_doc = same_doc & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return same_doc


class _PerIds:
    """What is derived from a document-id tensor (the dense mask, int32 ids, tile ranges), kept while that same
    tensor comes back unchanged: every layer of a step attends with the step's ids, so each is computed once
    per step rather than once per layer and kernel. Holds the last two tensors (the ids and their int32 form;
    held, so their ids cannot be reused); an in-place change (the tensor's version) starts afresh. Not used
    while compiling, in inference mode, or for inference tensors (which have no version; what inference mode
    derives could not be saved for a backward). A write that bypasses the version (through `.data` or a numpy
    view) is not seen: the ids a step passes are never changed that way."""

    KEEP = 2

    def __init__(self):
        self.entries: list[tuple[torch.Tensor, int, dict]] = []  # (ids, version, derived), newest first

    def get(self, ids: torch.Tensor, key: tuple, make):
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or ids.is_inference():
            return make()
        entry = next((e for e in self.entries if e[0] is ids and e[1] == ids._version), None)
        if entry is None:
            entry = (ids, ids._version, {})
        self.entries = [entry] + [e for e in self.entries if e is not entry][: self.KEEP - 1]
        derived = entry[2]
        if key not in derived:
            derived[key] = make()
        return derived[key]


_per_ids = _PerIds()


def attention_ref(q, k, v, causal=True, doc_ids=None, softmax_scale=None):
    """The reference: scaled dot-product attention, GQA by repeating K/V heads, masks as documented."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    mask = (
        None
        if doc_ids is None
        else _per_ids.get(doc_ids, ("mask", causal), lambda: attention_mask(doc_ids, T, causal, q.device))
    )
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def tile_ranges(doc_ids: torch.Tensor, causal: bool, outer: int, inner: int, keys_outer: bool) -> torch.Tensor:
    """(B, cdiv(T, outer), 4) int32 [a, u0, u1, e]: the inner positions each outer block visits with documents.

    Outer blocks are query blocks (forward, dQ; inner positions are keys) or key blocks (dK/dV, keys_outer;
    inner positions are queries). The block visits [a, e) in tiles of `inner` from a (a multiple of inner):
    every visible (query, key) pair of the block lies there. Inside [u0, u1) (multiples of inner) every pair of
    the block is visible, so those tiles run without a mask; [a, u0) and [u1, e) are masked, as is every tile of
    a block that crosses T (its positions past T are no pairs at all).
    Packed documents are contiguous, so each position's document is a range [start, end) and so is a block's
    visible span. That holds when the ids never decrease along a row (as packing produces them); a row whose
    ids do (unsorted or repeated documents) falls back to visiting every tile up to the causal bound, masked.
    Computed on the device without a host synchronisation."""
    B, T = doc_ids.shape
    d = doc_ids
    dev = d.device
    pos = torch.arange(T, device=dev, dtype=torch.int64)
    change = d[:, 1:] != d[:, :-1]
    edge = torch.ones(B, 1, dtype=torch.bool, device=dev)
    start = torch.where(torch.cat([edge, change], 1), pos, 0).cummax(1).values  # (B, T) first of the document
    end = torch.where(torch.cat([change, edge], 1), pos + 1, T).flip(1).cummin(1).values.flip(1)  # one past last
    ok = (d[:, 1:] >= d[:, :-1]).all(1, keepdim=True)  # (B, 1) the ranges are exact
    b0 = torch.arange(0, T, outer, device=dev)
    b1 = (b0 + outer).clamp(max=T)
    first, last = start[:, b0], start[:, b1 - 1]
    if keys_outer:  # queries that see keys [b0, b1): from the first key's document start (or b0, causal) on
        lo = torch.where(ok, b0.expand(B, -1) if causal else first, b0 if causal else 0)
        hi = torch.where(ok, end[:, b1 - 1], T)
        safe_lo = torch.maximum(last, b1 - 1) if causal else last  # the query sees the whole key block
        safe_hi = end[:, b0]
    else:  # keys that queries [b0, b1) see: from the first query's document start to the last query (causal)
        lo = torch.where(ok, first, 0)
        hi = b1.expand(B, -1) if causal else torch.where(ok, end[:, b1 - 1], T)
        safe_lo = last
        safe_hi = (b0 + 1).expand(B, -1) if causal else end[:, b0]
    safe_lo = torch.where(ok & (b1 - b0 == outer), safe_lo, T)  # fallback, or the last block: all masked
    a = lo // inner * inner
    u0 = torch.minimum(torch.maximum((safe_lo + inner - 1) // inner * inner, a), hi)
    u1 = torch.maximum(torch.minimum(safe_hi.clamp(max=T) // inner * inner, hi), u0)
    return torch.stack([a, u0, u1, hi], dim=-1).to(torch.int32).contiguous()


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
    def _load_cols(ptr, rows, stride_t, T, offs_d, D):
        """The same tile transposed, (BLOCK_D, len(rows)), read as such (no transpose in registers)."""
        mask = (rows[None, :] < T) & (offs_d[:, None] < D)
        return tl.load(ptr + rows[None, :] * stride_t + offs_d[:, None], mask=mask, other=0.0)

    @triton.jit
    def _doc(DOC, idx, T, HAS_DOC: tl.constexpr):
        if HAS_DOC:
            return tl.load(DOC + idx, mask=idx < T, other=-1)
        return idx

    @triton.jit
    def _visible(r, c, T, r_doc, c_doc, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
        """Query r may attend to key c (arguments broadcast against each other)."""
        ok = (r < T) & (c < T)
        if CAUSAL:
            ok = ok & (r >= c)
        if HAS_DOC:
            ok = ok & (r_doc == c_doc)
        return ok

    @triton.jit
    def _load_range(RANGES, b, pid, n_blocks):
        """Block pid's [a, u0, u1, e) from the (B, n_blocks, 4) table tile_ranges wrote."""
        base = RANGES + (b * n_blocks + pid) * 4
        return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)

    @triton.jit
    def _key_range(RANGES, b, pid_m, n_blocks, T, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_M, BLOCK_N):
        """[a, u0, u1, e) of the keys query block pid_m visits (see tile_ranges): masked, unmasked, masked."""
        if HAS_DOC:
            return _load_range(RANGES, b, pid_m, n_blocks)
        full = (pid_m + 1) * BLOCK_M <= T  # a block that crosses T masks every tile
        if CAUSAL:  # keys below the block's first row are seen by all its rows; the diagonal tiles are masked
            return (
                0,
                0,
                tl.where(full, (pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N, 0),
                tl.minimum((pid_m + 1) * BLOCK_M, T),
            )
        return 0, 0, tl.where(full, T // BLOCK_N * BLOCK_N, 0), T

    @triton.jit
    def _query_range(RANGES, b, pid_n, n_blocks, T, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_M, BLOCK_N):
        """[a, u0, u1, e) of the queries key block pid_n meets, as _key_range."""
        if HAS_DOC:
            return _load_range(RANGES, b, pid_n, n_blocks)
        full = (pid_n + 1) * BLOCK_N <= T  # a block that crosses T masks every tile
        if CAUSAL:  # earlier queries cannot see these keys; from the block's last key on, queries see them all
            last = (pid_n + 1) * BLOCK_N - 1
            u0 = tl.where(full, tl.minimum((last + BLOCK_M - 1) // BLOCK_M * BLOCK_M, T), T)
            return pid_n * BLOCK_N // BLOCK_M * BLOCK_M, u0, tl.maximum(T // BLOCK_M * BLOCK_M, u0), T
        return 0, tl.where(full, 0, T), tl.where(full, T // BLOCK_M * BLOCK_M, T), T

    @triton.jit
    def _fwd_tiles(
        acc, l_i, m_i, q, rows, q_doc, Kb, Vb, DOCb, lo, hi, qk_scale, stride_kt, stride_vt, T, offs_d, D,
        MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Online softmax over the key tiles [lo, hi): loads unconditional, the mask only where MASK."""
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = _load_rows(Kb, cols, stride_kt, T, offs_d, D)
            v = _load_rows(Vb, cols, stride_vt, T, offs_d, D)
            s = _dot(q, tl.trans(k), IEEE)  # unscaled: the scale is applied in the max and the exponent's FMA
            if MASK:
                k_doc = _doc(DOCb, cols, T, HAS_DOC)
                ok = _visible(rows[:, None], cols[None, :], T, q_doc[:, None], k_doc[None, :], CAUSAL, HAS_DOC)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # max(s) * scale = max(s * scale): scale > 0
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing to attend to yet
            p = tl.exp2(s * qk_scale - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q,  # (B, Hq, T, D)
        K,  # (B, Hkv, T, D)
        V,  # (B, Hkv, T, D)
        O,  # (B, Hq, T, D) contiguous  # noqa: E741
        LSE,  # (B, Hq, T) fp32, base-2 log-sum-exp of the scaled scores
        DOC,  # (B, T) int32 document ids (HAS_DOC)
        RANGES,  # (B, cdiv(T, BLOCK_M), 4) int32 key ranges of the query blocks (HAS_DOC; tile_ranges)
        qk_scale,  # softmax scale * log2(e)
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        H, GROUP, T, D,
        CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        n_blocks = tl.num_programs(0)
        pid_m, pid_bh = n_blocks - 1 - tl.program_id(0), tl.program_id(1)  # causal: the longest rows first
        b, h = pid_bh // H, pid_bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        Kb = _head(K, b, h // GROUP, stride_kb, stride_kh)
        Vb = _head(V, b, h // GROUP, stride_vb, stride_vh)
        DOCb = DOC + b.to(tl.int64) * T
        q = _load_rows(_head(Q, b, h, stride_qb, stride_qh), rows, stride_qt, T, offs_d, D)
        q_doc = _doc(DOCb, rows, T, HAS_DOC)
        a, u0, u1, e = _key_range(RANGES, b, pid_m, n_blocks, T, CAUSAL, HAS_DOC, BLOCK_M, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        args = (q, rows, q_doc, Kb, Vb, DOCb)
        tail = (qk_scale, stride_kt, stride_vt, T, offs_d, D)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, *args, a, u0, *tail, True, CAUSAL, HAS_DOC, IEEE, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, *args, u0, u1, *tail, False, CAUSAL, HAS_DOC, IEEE, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, *args, u1, e, *tail, True, CAUSAL, HAS_DOC, IEEE, BLOCK_N)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(
            O + pid_bh.to(tl.int64) * T * D + rows[:, None] * D + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=(rows[:, None] < T) & (offs_d[None, :] < D),
        )
        tl.store(LSE + pid_bh.to(tl.int64) * T + rows, m_i + tl.log2(l_safe), mask=rows < T)

    @triton.jit
    def _attn_bwd_delta_kernel(
        O, DO,  # (B, Hq, T, D) contiguous  # noqa: E741
        DELTA,  # (B, Hq, T) fp32: rowsum(dO * O), written
        T, D,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        at = pid_bh.to(tl.int64) * T * D
        o = _load_rows(O + at, rows, D, T, offs_d, D).to(tl.float32)
        do = _load_rows(DO + at, rows, D, T, offs_d, D).to(tl.float32)
        tl.store(DELTA + pid_bh.to(tl.int64) * T + rows, tl.sum(o * do, axis=1), mask=rows < T)

    @triton.jit
    def _dkdv_tiles(
        dk, dv, k, v, cols, k_doc, Qh, DOh, LSEh, DELTAh, DOCb, lo, hi, qk_scale, stride_qt, T, offs_d, D,
        MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """dK, dV of one key block over the query tiles [lo, hi), computed transposed (keys as the rows of
        every product: M = BLOCK_N, so Hopper runs them all on wgmma, and P, dS need no transpose)."""
        for start in range(lo, hi, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q_t = _load_cols(Qh, rows, stride_qt, T, offs_d, D)  # (BLOCK_D, BLOCK_M)
            do = _load_rows(DOh, rows, D, T, offs_d, D)  # (BLOCK_M, BLOCK_D)
            lse = tl.load(LSEh + rows, mask=rows < T, other=0.0)
            delta = tl.load(DELTAh + rows, mask=rows < T, other=0.0)
            p_t = tl.exp2(_dot(k, q_t, IEEE) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
            if MASK:
                q_doc = _doc(DOCb, rows, T, HAS_DOC)
                ok = _visible(rows[None, :], cols[:, None], T, q_doc[None, :], k_doc[:, None], CAUSAL, HAS_DOC)
                p_t = tl.where(ok, p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, IEEE)
            dp_t = _dot(v, tl.trans(do), IEEE)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), IEEE)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V,  # (B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D)
        DO,  # (B, Hq, T, D) contiguous: gradient of the output
        LSE, DELTA,  # (B, Hq, T) fp32
        DOC,  # (B, T) int32 (HAS_DOC)
        RANGES,  # (B, cdiv(T, BLOCK_N), 4) int32 query ranges of the key blocks (HAS_DOC; tile_ranges)
        DK, DV,  # (B, Hkv, T, D) contiguous
        qk_scale, sm_scale,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        HKV, GROUP, T, D,
        CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        n_blocks = tl.num_programs(0)
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)  # causal: the first key blocks meet the most queries
        b, hk = pid_bh // HKV, pid_bh % HKV
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        DOCb = DOC + b.to(tl.int64) * T
        k = _load_rows(_head(K, b, hk, stride_kb, stride_kh), cols, stride_kt, T, offs_d, D)
        v = _load_rows(_head(V, b, hk, stride_vb, stride_vh), cols, stride_vt, T, offs_d, D)
        k_doc = _doc(DOCb, cols, T, HAS_DOC)
        a, u0, u1, e = _query_range(RANGES, b, pid_n, n_blocks, T, CAUSAL, HAS_DOC, BLOCK_M, BLOCK_N)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for g in range(GROUP):  # every query head sharing this K/V head: summed here, no atomics
            h = hk * GROUP + g
            stats = (b * HKV * GROUP + h).to(tl.int64) * T  # row offset of (b, h) in LSE, DELTA; times D in DO
            args = (k, v, cols, k_doc, _head(Q, b, h, stride_qb, stride_qh), DO + stats * D, LSE + stats)
            args += (DELTA + stats, DOCb)
            tail = (qk_scale, stride_qt, T, offs_d, D)
            dk, dv = _dkdv_tiles(dk, dv, *args, a, u0, *tail, True, CAUSAL, HAS_DOC, IEEE, BLOCK_M)
            dk, dv = _dkdv_tiles(dk, dv, *args, u0, u1, *tail, False, CAUSAL, HAS_DOC, IEEE, BLOCK_M)
            dk, dv = _dkdv_tiles(dk, dv, *args, u1, e, *tail, True, CAUSAL, HAS_DOC, IEEE, BLOCK_M)
        out_mask = (cols[:, None] < T) & (offs_d[None, :] < D)
        out = pid_bh.to(tl.int64) * T * D + cols[:, None] * D + offs_d[None, :]
        tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _dq_tiles(
        dq, q, do, lse, delta, rows, q_doc, Kb, Vb, DOCb, lo, hi, qk_scale, stride_kt, stride_vt, T, offs_d, D,
        MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = _load_rows(Kb, cols, stride_kt, T, offs_d, D)
            v = _load_rows(Vb, cols, stride_vt, T, offs_d, D)
            p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
            if MASK:
                k_doc = _doc(DOCb, cols, T, HAS_DOC)
                ok = _visible(rows[:, None], cols[None, :], T, q_doc[:, None], k_doc[None, :], CAUSAL, HAS_DOC)
                p = tl.where(ok, p, 0.0)
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO,  # as in the dK/dV kernel
        LSE, DELTA,  # (B, Hq, T) fp32
        DOC,  # (B, T) int32 (HAS_DOC)
        RANGES,  # (B, cdiv(T, BLOCK_M), 4) int32 key ranges of the query blocks (HAS_DOC; tile_ranges)
        DQ,  # (B, Hq, T, D) contiguous
        qk_scale, sm_scale,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        H, GROUP, T, D,
        CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        n_blocks = tl.num_programs(0)
        pid_m, pid_bh = n_blocks - 1 - tl.program_id(0), tl.program_id(1)  # causal: the longest rows first
        b, h = pid_bh // H, pid_bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        Kb = _head(K, b, h // GROUP, stride_kb, stride_kh)
        Vb = _head(V, b, h // GROUP, stride_vb, stride_vh)
        DOCb = DOC + b.to(tl.int64) * T
        q = _load_rows(_head(Q, b, h, stride_qb, stride_qh), rows, stride_qt, T, offs_d, D)
        do = _load_rows(DO + pid_bh.to(tl.int64) * T * D, rows, D, T, offs_d, D)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        q_doc = _doc(DOCb, rows, T, HAS_DOC)
        a, u0, u1, e = _key_range(RANGES, b, pid_m, n_blocks, T, CAUSAL, HAS_DOC, BLOCK_M, BLOCK_N)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        args = (q, do, lse, delta, rows, q_doc, Kb, Vb, DOCb)
        tail = (qk_scale, stride_kt, stride_vt, T, offs_d, D)
        dq = _dq_tiles(dq, *args, a, u0, *tail, True, CAUSAL, HAS_DOC, IEEE, BLOCK_N)
        dq = _dq_tiles(dq, *args, u0, u1, *tail, False, CAUSAL, HAS_DOC, IEEE, BLOCK_N)
        dq = _dq_tiles(dq, *args, u1, e, *tail, True, CAUSAL, HAS_DOC, IEEE, BLOCK_N)
        tl.store(
            DQ + pid_bh.to(tl.int64) * T * D + rows[:, None] * D + offs_d[None, :],
            (dq * sm_scale).to(DQ.dtype.element_ty),
            mask=(rows[:, None] < T) & (offs_d[None, :] < D),
        )


# Block sizes and warps: (BLOCK_M, BLOCK_N, num_warps, num_stages) by pass, GPU generation and head-dim bucket,
# for fp16/bf16; BLOCK_M counts queries and BLOCK_N keys in every pass. Chosen among candidates that fit shared
# memory, for no register spills in ptxas -v and for tensor cores: on sm_90 every product on wgmma (its M, the
# rows of the left operand, at least 64: queries in the forward and dQ, keys in dK/dV, which computes K Q^T),
# BLOCK_N >= 64 at D=128. Not yet timed on a GPU.
# Generation 90: Hopper and datacenter Blackwell (227 KB of shared memory per block). Generation 80: Ampere,
# Ada and consumer Blackwell (sm_80/87: 163 KB; sm_86/89/120: 99 KB), whose 16-bit entries all fit 99 KB.
# fp32 (checks, not training) takes one small configuration everywhere: it fits 99 KB (at most 70 KB) and is
# the accepted register spill at D=128 (every configuration tried spills).
# `python tools/compile_check.py` prints shared memory, registers, spills and instruction counts for every
# entry, and fails on a spill, a 16-bit product off wgmma on sm_90 or a main loop without asynchronous copies.
CONFIGS = {
    "fwd": {90: {64: (128, 64, 4, 3), 128: (128, 64, 8, 3)}, 80: {64: (128, 64, 8, 3), 128: (128, 32, 8, 3)}},
    "dkdv": {90: {64: (32, 128, 8, 2), 128: (32, 128, 8, 2)}, 80: {64: (32, 64, 8, 2), 128: (32, 64, 8, 2)}},
    "dq": {90: {64: (64, 64, 4, 2), 128: (64, 64, 8, 2)}, 80: {64: (64, 64, 4, 2), 128: (64, 64, 8, 2)}},
}
# (kind, generation, bucket, causal, documents) -> entry, for a variant whose own best was more than 5% faster
# than its pass's entry when tuned (`python tools/tune_attention.py` on a GPU prints both); none tuned yet
VARIANTS: dict[tuple[str, int, int, bool, bool], tuple[int, int, int, int]] = {}
FP32_CONFIG = (32, 32, 4, 2)
INTERPRET_BLOCK = 64  # the interpreter pays per program and per loop step, not per tile size


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def generation(arch: int) -> int:
    """The table a compute capability uses: 90 for sm_90/sm_100/sm_103, 80 for every other (sm_80 and up)."""
    return 90 if arch in (90, 100, 103) else 80


def config(
    kind: str, D: int, arch: int | None, dtype: torch.dtype = torch.bfloat16, causal: bool = True, docs: bool = False
) -> tuple[int, int, int, int]:
    """The entry a launch takes: the variant's own (VARIANTS) if it has one, else the pass's (CONFIGS)."""
    if arch is None:
        return INTERPRET_BLOCK, INTERPRET_BLOCK, 4, 1
    if dtype == torch.float32:
        return FP32_CONFIG
    gen, bucket = generation(arch), 64 if block_d(D) <= 64 else 128
    return VARIANTS.get((kind, gen, bucket, causal, docs)) or CONFIGS[kind][gen][bucket]


def _arch(x: torch.Tensor) -> int | None:
    if not x.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


def _strides(q, k, v) -> list[int]:
    """Batch, head and time strides of q, k and v (the head dimension is contiguous)."""
    return [s for t in (q, k, v) for s in t.stride()[:3]]


def _doc_arg(doc_ids, q):
    return doc_ids.contiguous() if doc_ids is not None else q.new_empty(0, dtype=torch.int32)


def _int32_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Document ids as int32 with the same equalities in each row. int32 and narrower pass as they are (what the
    data pipeline yields); wider ids become their rank among the row's distinct values, in the same order
    (exact whatever the values, without a host synchronisation), so that none collide when narrowed."""
    if doc_ids.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        return doc_ids.to(torch.int32)
    values, order = doc_ids.sort(dim=1, stable=True)
    ranks = torch.cat([values.new_zeros(values.shape[0], 1), (values[:, 1:] != values[:, :-1]).long()], 1).cumsum(1)
    return torch.empty_like(ranks).scatter_(1, order, ranks).to(torch.int32)


def _ranges(doc_ids, causal: bool, outer: int, inner: int, keys_outer: bool, q):
    if doc_ids is None:
        return q.new_empty(0, dtype=torch.int32)
    key = ("ranges", causal, outer, inner, keys_outer)
    return _per_ids.get(doc_ids, key, lambda: tile_ranges(doc_ids, causal, outer, inner, keys_outer))


def attention_fwd(q, k, v, doc_ids, causal: bool, scale: float):
    """-> (o (B, Hq, T, D), lse (B, Hq, T) fp32 base 2)."""
    B, H, T, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever q's layout
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = config("fwd", D, _arch(q), q.dtype, causal, doc_ids is not None)
    _attn_fwd_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, o, lse, _doc_arg(doc_ids, q), _ranges(doc_ids, causal, bm, bn, False, q), scale * LOG2E,
        *_strides(q, k, v), H, H // k.shape[1], T, D,
        CAUSAL=causal, HAS_DOC=doc_ids is not None, IEEE=q.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(D), num_warps=warps, num_stages=stages, **FP_FUSION,
    )  # fmt: skip
    return o, lse


def attention_bwd(do, q, k, v, o, lse, doc_ids, causal: bool, scale: float):
    """-> (dq, dk, dv)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    do = do.contiguous()
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # the preprocess: rowsum(dO * O)
    rows = INTERPRET_BLOCK if _arch(q) is None else 128
    _attn_bwd_delta_kernel[(triton.cdiv(T, rows), B * H)](
        o, do, delta, T, D, BLOCK_M=rows, BLOCK_D=block_d(D), **FP_FUSION
    )
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
    doc, arch, common = (
        _doc_arg(doc_ids, q),
        _arch(q),
        dict(CAUSAL=causal, HAS_DOC=doc_ids is not None, IEEE=q.dtype == torch.float32, BLOCK_D=block_d(D)),
    )
    bm, bn, warps, stages = config("dkdv", D, arch, q.dtype, causal, doc_ids is not None)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * Hkv)](
        q, k, v, do, lse, delta, doc, _ranges(doc_ids, causal, bn, bm, True, q), dk, dv, scale * LOG2E, scale,
        *_strides(q, k, v), Hkv, H // Hkv, T, D,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common, **FP_FUSION,
    )  # fmt: skip
    bm, bn, warps, stages = config("dq", D, arch, q.dtype, causal, doc_ids is not None)
    _attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, do, lse, delta, doc, _ranges(doc_ids, causal, bm, bn, False, q), dq, scale * LOG2E, scale,
        *_strides(q, k, v), H, H // Hkv, T, D,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common, **FP_FUSION,
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
    T, D = q.shape[2], q.shape[3]
    if T * D >= 2**31:
        return f"T x D = {T} x {D} is beyond the kernels' int32 row offsets (T * D must stay below 2**31)"
    return None


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """t as the kernels read it: the head dimension contiguous and every row offset (time x stride) within
    int32; a (B, H, T, D) view of wider rows, e.g. of a (B, T, H * D) activation at T * H * D >= 2**31, is
    copied into (B, H, T, D) order (row stride D) rather than read through offsets that would wrap around."""
    if t.stride(-1) == 1 and (t.shape[2] - 1) * t.stride(2) + t.shape[3] < 2**31:
        return t
    return t.contiguous()


def _check(q, k, v, doc_ids, softmax_scale):
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
    # the kernels take a row's max before scaling it, by scale * log2(e) in fp32: positive, and a normal fp32
    if softmax_scale is not None and not FP32_TINY < softmax_scale * LOG2E < FP32_MAX:
        raise ValueError(f"softmax_scale must be positive and within fp32 range, got {softmax_scale}")


def attention(q, k, v, causal=True, doc_ids=None, softmax_scale=None, impl="auto"):
    _check(q, k, v, doc_ids, softmax_scale)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if choose("attention", impl, q, supports(q, k, v, doc_ids)) == "triton":
        doc_ids = None if doc_ids is None else _per_ids.get(doc_ids, ("int32",), lambda: _int32_ids(doc_ids))
        q, k, v = (_kernel_layout(t) for t in (q, k, v))
        o, _ = _attention_op(q, k, v, doc_ids, bool(causal), float(scale))
        return o
    return attention_ref(q, k, v, causal, doc_ids, softmax_scale)
