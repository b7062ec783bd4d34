"""AdamW with decay / no-decay parameter groups, a step that can be skipped, and the LR schedules."""

from __future__ import annotations

import math

import torch

from llm.config.schema import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear and embedding weights) decay; biases and norm weights do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next step() does nothing when `skip_next` is set: no parameter update, no moment
    update, no step count. The training loop sets it when any rank saw a non-finite loss; DeepSpeed calls
    this step() under every ZeRO stage, so the skip is exact whatever the engine does around it."""

    skip_next = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_next:
            return None
        self._keep_fused()
        return super().step(closure)

    def _keep_fused(self) -> None:
        """Loading a checkpoint replaces the groups' options with the saved ones (DeepSpeed's universal
        checkpoints too): one saved by an unfused AdamW would turn the fused kernel off, and its step counts
        are not the float32 device tensors the kernel takes. Restore both (a no-op once fused)."""
        if all(group.get("fused") for group in self.param_groups):
            return
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> SkippableAdamW:
    """AdamW with torch's fused kernel: one pass over all parameters on CPU and CUDA (the default on CPU is a
    Python loop over the tensors, 7x slower for the tiny model)."""
    groups = param_groups(model, cfg.weight_decay)
    return SkippableAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to
    min_lr_ratio * lr, or WSD (warmup, stable, linear decay over the last decay_fraction), or constant."""
    lr, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(cfg.decay_fraction * max_steps))
        start = max_steps - decay_steps
        if step < start:
            return lr
        return lr + (floor - lr) * min(1.0, (step - start + 1) / decay_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


def grad_norm_of(model: torch.nn.Module, clip: float = 0.0) -> torch.Tensor:
    """The norm of all gradients, as a tensor on the device; with `clip` > 0 the gradients are also scaled to
    at most that norm (torch's clip_grad_norm_: one fused pass)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params]))
