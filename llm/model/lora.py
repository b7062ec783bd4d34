"""Low-rank adapters (LoRA, Hu et al. 2021) on the model's projections, our own small module.

`peft` wraps a module so that its weights move under new names (`base_layer.weight`) and it merges through its
own model classes; our checkpoints, ZeRO partitioning and export speak of our own names. A LoraLinear *is* the
nn.Linear it adapts (same `weight` and `bias`, shared, frozen) plus `lora_a` (rank x in, Kaiming-uniform) and
`lora_b` (out x rank, zeros: training starts from exactly the base model):

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T

`merge` folds the adapters into plain weights (W + alpha/rank B A) for generation and export.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.config.schema import LoraConfig

# our module names for each target; `qkv` is the fused query/key/value projection
MODULES = {"qkv": "attn.qkv", "proj": "attn.proj", "up": "mlp.up", "gate": "mlp.gate", "down": "mlp.down"}


class LoraLinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: the state-dict names stay
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale, self.lora_dropout = alpha / rank, nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scale


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze every parameter of `model` (a GPT) and put adapters on the target projections of every block."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for target in cfg.targets:
            parent_name, name = MODULES[target].split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, LoraLinear(getattr(parent, name), cfg.rank, cfg.alpha, cfg.dropout))
    return model


def merge(weights: dict[str, torch.Tensor], cfg: LoraConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict with adapters -> the plain one: W + (alpha / rank) B A for every adapted projection."""
    out = {k: v for k, v in weights.items() if not k.endswith((".lora_a", ".lora_b"))}
    for key in [k for k in weights if k.endswith(".lora_a")]:
        stem = key[: -len(".lora_a")]
        delta = weights[stem + ".lora_b"].double() @ weights[key].double() * (cfg.alpha / cfg.rank)
        out[stem + ".weight"] = (out[stem + ".weight"].double() + delta).to(out[stem + ".weight"].dtype)
    return out


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
