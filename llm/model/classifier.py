"""A sequence classifier on the pretrained trunk: the GPT's final hidden states, pooled, then a linear head.

Pooling `last` reads the hidden state of the EOS appended to each text (causal attention: it has seen the whole
text, and the padding after it cannot reach it); `mean` averages the hidden states of the text and its EOS.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.model.gpt import GPT


class Classifier(nn.Module):
    def __init__(self, trunk: GPT, n_classes: int, pooling: str = "last"):
        super().__init__()
        self.trunk, self.pooling = trunk, pooling
        self.head = nn.Linear(trunk.cfg.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if not trunk.cfg.tie_embeddings:  # the LM head is not used: no gradient to wait for
            trunk.lm_head.weight.requires_grad_(False)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor | None = None):
        """idx (B, T) right-padded texts each ending in EOS, lengths (B,) -> class logits (B, n_classes), or with
        labels (B,) the mean cross-entropy."""
        h = self.trunk.hidden(idx)
        if self.pooling == "last":
            pooled = h[torch.arange(h.size(0), device=h.device), lengths - 1]
        else:
            mask = (torch.arange(h.size(1), device=h.device)[None, :] < lengths[:, None]).to(h.dtype)
            pooled = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        logits = self.head(pooled)
        return logits if labels is None else F.cross_entropy(logits.float(), labels)

    def flops_per_token(self, seq_len: int) -> int:
        """The trunk's without its LM head (unused); the head runs once per sequence, negligible per token."""
        return self.trunk.flops_per_token(seq_len, head=False)

    def num_params(self) -> int:
        return self.trunk.num_params() + sum(p.numel() for p in self.head.parameters())
