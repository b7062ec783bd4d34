"""Memory per rank, estimated: the model states under each ZeRO stage, and the activations a training forward
keeps for its backward, with or without activation checkpointing and sequence parallelism. Used by the docs'
tables (docs/parallel.md); tests/test_memory.py checks the activations against the peaks measured on CPU.

States (mixed precision with Adam, the ZeRO paper's accounting): 2 bytes of 16-bit weights, 2 of gradients and
12 of fp32 master weights and Adam moments per parameter, the partitioned ones divided over the ranks.

Activations: counted per token of this rank's part of the sequence (`micro_batch x seq_len / sequence`), layer by
layer, as what autograd keeps (an upper bound: tensors the implementation happens to share are counted apart).
"""

from __future__ import annotations

from llm.config.schema import ModelConfig


def state_bytes(n_params: int, stage: int, ranks: int) -> float:
    """Bytes per rank of weights, gradients and optimizer state under ZeRO `stage` over `ranks` ranks."""
    weights, grads, optimizer = 2 * n_params, 2 * n_params, 12 * n_params
    if stage >= 1:
        optimizer /= ranks
    if stage >= 2:
        grads /= ranks
    if stage >= 3:
        weights /= ranks
    return weights + grads + optimizer


def _layer_values(cfg: ModelConfig, hidden: int) -> int:
    """Values one block keeps per token: its two norms (input, normalised input and statistics), the attention
    (qkv input, queries, keys and values as many heads as the queries, output, projection input, log-sum-exp)
    and the MLP (input; GELU: pre-activation and activation; SwiGLU: gate, up, gate activation, product)."""
    c, heads = cfg.n_embd, cfg.n_head
    norms = 2 * (2 * c + 2)
    attention = 6 * c + heads
    mlp = c + (2 if cfg.mlp == "gelu" else 4) * hidden
    return norms + attention + mlp


def activation_bytes(
    cfg: ModelConfig,
    hidden: int,
    micro_batch: int,
    seq_len: int,
    sequence: int = 1,
    checkpointing: bool = False,
    bytes_per_value: int = 2,
) -> float:
    """Bytes of activations one rank holds at the peak of a training forward and backward: every block's (or,
    with checkpointing, every block's two inputs and one block's recomputed ones), then the final norm, the
    loss's gradient of the hidden states (the fused head computes it in the forward) and the token ids."""
    tokens = micro_batch * seq_len / sequence
    layer = _layer_values(cfg, hidden) * tokens * bytes_per_value
    blocks = cfg.n_layer * (2 * cfg.n_embd * tokens * bytes_per_value) + layer if checkpointing else cfg.n_layer * layer
    final = (3 * cfg.n_embd + 2) * tokens * bytes_per_value
    ids = 8 * micro_batch * seq_len * 2  # int64 inputs (whole on every rank) and targets
    return blocks + final + ids
