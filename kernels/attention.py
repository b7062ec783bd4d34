"""Causal attention with grouped-query heads and document masking.

`attention(q, k, v, causal=True, doc_ids=None, softmax_scale=None, impl="auto")`
q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq % Hkv == 0; doc_ids: (B, T) integer document index of each
position (a token attends only inside its document); returns (B, Hq, T, D).

`attention_ref` is the PyTorch reference (torch SDPA with an explicit mask when documents are given); the
fused Triton kernel (FlashAttention-2) plugs in behind `impl="triton"`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import choose


def attention_mask(doc_ids: torch.Tensor | None, T: int, causal: bool, device) -> torch.Tensor | None:
    """(B, 1, T, T) boolean mask (True = may attend), or None when plain causal/full attention suffices."""
    if doc_ids is None:
        return None
    same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, T, T)
    if causal:
        same_doc = same_doc & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return same_doc


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
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


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None) -> str | None:
    """None when the Triton kernel handles these inputs, else the reason it does not."""
    return "this build has no Triton attention kernel yet; use impl='torch' or 'auto'"


def _check(q, k, v, doc_ids):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"attention wants q (B, Hq, T, D) and k, v (B, Hkv, T, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or Hq % k.shape[1]:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not fit q {tuple(q.shape)} (needs Hq % Hkv == 0)")
    if doc_ids is not None and tuple(doc_ids.shape) != (B, T):
        raise ValueError(f"doc_ids must be (B, T) = {(B, T)}, got {tuple(doc_ids.shape)}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    _check(q, k, v, doc_ids)
    choose("attention", impl, q, supports(q, k, v, doc_ids))
    return attention_ref(q, k, v, causal, doc_ids, softmax_scale)
