"""Liger-Kernel's norms and fused linear cross-entropy as benchmark baselines, called the way ours are.

Liger-Kernel (`pip install liger-kernel`; pure Python, its kernels need a CUDA GPU) is optional: where it is not
importable the benchmarks leave its rows out and say why (`missing`). What each wrapper runs:
- layer_norm(x, w, bias, residual): Liger's LayerNorm, which has no fused residual, on x + residual computed by
  PyTorch (what a Liger user writes), returning (y, x + residual) as ours does; without a bias, zeros (its
  kernel reads one).
- rms_norm(x, w, residual): Liger's RMSNorm, or with a residual its fused add + RMSNorm, returning (y, h).
- linear_cross_entropy(h, weight, targets, vocab_size, ignore_index): Liger's fused linear cross-entropy over
  the real vocabulary (the padding rows of the head sliced off: ours never predicts them either).
"""

from __future__ import annotations

import importlib
import importlib.metadata


def _functional():
    return importlib.import_module("liger_kernel.transformers.functional")


def missing() -> str | None:
    """None when Liger-Kernel's baselines can run here, else why not."""
    import torch

    try:
        _functional()
    except ImportError as e:
        return f"liger-kernel is not importable ({e}); pip install liger-kernel"
    if not torch.cuda.is_available():
        return "liger-kernel's kernels need a CUDA GPU"
    return None


def version() -> str | None:
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
    h = x if residual is None else x + residual
    b = bias if bias is not None else weight.new_zeros(weight.shape)
    y = _functional().liger_layer_norm(h, weight, b, eps)
    return y if residual is None else (y, h)


def rms_norm(x, weight, eps=1e-6, residual=None):
    if residual is None:
        return _functional().liger_rms_norm(x, weight, eps)
    y, h = _functional().liger_fused_add_rms_norm(x, residual, weight, eps)
    return y, h


def linear_cross_entropy(h, weight, targets, vocab_size=None, ignore_index=-100):
    w = weight if vocab_size is None else weight[:vocab_size]
    return _functional().liger_fused_linear_cross_entropy(h, w, targets, ignore_index=ignore_index)
