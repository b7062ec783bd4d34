"""Fused Triton kernels (attention, LayerNorm, RMSNorm) with PyTorch reference fallbacks.

This package imports only torch and triton; the library (`llm`) imports it, never the reverse.
"""
