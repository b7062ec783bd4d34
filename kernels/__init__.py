"""Fused kernels (attention, LayerNorm, RMSNorm, the LM head with its cross-entropy) with PyTorch reference
fallbacks.

This package imports only torch and triton; the library (`llm`) imports it, never the reverse.
"""

from kernels.attention import attention, attention_ref
from kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from kernels.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

__all__ = [
    "attention",
    "attention_ref",
    "layer_norm",
    "layer_norm_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "rms_norm",
    "rms_norm_ref",
]
