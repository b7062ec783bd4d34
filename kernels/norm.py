"""LayerNorm and RMSNorm over the last dimension, with an optional fused residual add.

`layer_norm(x, weight, bias=None, eps=1e-5, residual=None, impl="auto")`
`rms_norm(x, weight, eps=1e-6, residual=None, impl="auto")`
x: (..., N). With `residual` given, the input is `x + residual` and the result is the pair
(normalised output, new residual stream `x + residual`); otherwise just the normalised output.
Statistics are computed in fp32. `*_ref` are the PyTorch references; the fused Triton kernels plug in
behind `impl="triton"`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import choose


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


def supports(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when the Triton kernel handles these inputs, else the reason it does not."""
    return "this build has no Triton norm kernels yet; use impl='torch' or 'auto'"


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None, impl="auto"):
    choose("layer_norm", impl, x, supports(x, weight))
    return layer_norm_ref(x, weight, bias, eps, residual)


def rms_norm(x, weight, eps=1e-6, residual=None, impl="auto"):
    choose("rms_norm", impl, x, supports(x, weight))
    return rms_norm_ref(x, weight, eps, residual)
