"""Fused kernels (attention, LayerNorm, RMSNorm) with PyTorch reference fallbacks.

This package imports only torch and triton; the library (`llm`) imports it, never the reverse.
"""

from kernels.attention import attention, attention_ref
from kernels.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

__all__ = ["attention", "attention_ref", "layer_norm", "layer_norm_ref", "rms_norm", "rms_norm_ref"]
