"""The LM head and the cross-entropy loss fused: the mean loss over targets without ever holding the
(tokens x vocab) logits, in fp32 or otherwise.

`linear_cross_entropy(h, weight, targets, vocab_size=None, ignore_index=-100, chunk=None)`
h (N, C) hidden states, weight (V_pad, C) the head (rows past `vocab_size`, vocabulary padding, are never
predicted and get a zero gradient), targets (N,) -> the mean of -log softmax(h W^T)[target] over the targets
that are not `ignore_index` (0 when there are none), as `F.cross_entropy(..., ignore_index=...)` with the
logits upcast to fp32 (float64 inputs stay float64).

The tokens go through in chunks (as Liger-Kernel's fused linear cross-entropy does): each chunk's logits are
computed in the input's dtype as the plain head would, upcast to fp32, and turned at once into the loss and
the gradient of the logits, softmax - one_hot(target), scaled by 1/count; that gradient gives the chunk's
dh = g W (written into a (N, C) buffer) and adds g^T h to an fp32 dW. Nothing of the chunk survives it, so
the memory beyond the model's own tensors is one chunk of logits and dh, dW; the chunk is sized so that its
logits hold about as many values as h, but at least MIN_CHUNK_LOGITS (small models then run a few large
products rather than many thin ones), a power of two of at most 4096 tokens. The backward only scales the
gradients computed in the forward by the incoming gradient (deterministic; no host synchronisation), so a
graph through it can be backpropagated once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear_cross_entropy_ref(h, weight, targets, vocab_size=None, ignore_index=-100):
    """The plain computation: all the logits, upcast to fp32, then the mean cross-entropy."""
    logits = F.linear(h, weight[: vocab_size or weight.shape[0]]).to(_acc(h))
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss / (targets != ignore_index).sum().clamp(min=1)


def _acc(h: torch.Tensor) -> torch.dtype:
    """The loss's precision: fp32, or the input's if wider (float64 in exactness tests)."""
    return torch.promote_types(h.dtype, torch.float32)


MIN_CHUNK_LOGITS = 1 << 22  # 16 MB of fp32 logits: below it, per-chunk overhead outweighs the memory saved


def chunk_tokens(n_tokens: int, vocab: int, width: int) -> int:
    """Tokens per chunk: logits of about max(N x C, MIN_CHUNK_LOGITS) values, a power of two in [1, 4096]."""
    per = math.ceil(max(n_tokens * width, MIN_CHUNK_LOGITS) / vocab)
    per = min(per, n_tokens, 4096)
    return 1 << (max(1, per) - 1).bit_length()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, ignore_index, chunk):
        n, width = h.shape
        w = weight[:vocab_size].to(h.dtype)  # under autocast h comes in its dtype: the weight cast once, not per chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep = targets != ignore_index
        acc = _acc(h)
        inv_count = 1.0 / keep.sum().clamp(min=1).to(acc)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        loss = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            hc, kc = h[start:end], keep[start:end]
            tc = targets[start:end].masked_fill(~kc, 0)
            logits = F.linear(hc, w).to(acc)  # the head's product in the input's dtype, as the plain path
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, tc[:, None]).squeeze(1)
            loss += ((lse - picked) * kc).sum()
            if not (need_h or need_w):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            g.scatter_add_(1, tc[:, None], -torch.ones_like(lse)[:, None])
            g = g.mul_((kc.to(acc) * inv_count)[:, None]).to(h.dtype)
            if need_h:
                torch.mm(g, w, out=grad_h[start:end])
            if need_w:  # fp32 sum of the chunks' products (each in the input's dtype, as the plain matmul)
                if hc.dtype == acc:
                    grad_w[:vocab_size].addmm_(g.t(), hc)
                else:
                    grad_w[:vocab_size].add_(torch.mm(g.t(), hc))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss * inv_count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(h, weight, targets, vocab_size=None, ignore_index=-100, chunk=None):
    """See the module docstring. h (N, C), weight (V_pad, C), targets (N,) -> the mean loss (fp32 scalar)."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: expected h (N, C), weight (V, C), targets (N,), got {tuple(h.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    vocab = vocab_size or weight.shape[0]
    if not 0 < vocab <= weight.shape[0]:
        raise ValueError(f"linear_cross_entropy: vocab_size {vocab} must be in 1..{weight.shape[0]}")
    chunk = chunk or chunk_tokens(h.shape[0], vocab, h.shape[1])
    if torch.is_autocast_enabled(h.device.type):  # every product in the autocast dtype, as the plain head's
        h = h.to(torch.get_autocast_dtype(h.device.type))  # (out= and in-place matmuls are not autocast)
    return _LinearCrossEntropy.apply(h, weight, targets, vocab, ignore_index, chunk)
