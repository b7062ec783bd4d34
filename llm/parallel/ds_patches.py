"""Corrections for known DeepSpeed bugs, each applied right after the call that has it, and each a no-op
where DeepSpeed already does the right thing (so a DeepSpeed upgrade that fixes them upstream changes nothing).
"""

from __future__ import annotations

from pathlib import Path

import torch


def repair_zero3_universal_load(engine, universal_dir: Path) -> None:
    """After a ZeRO-3 `load_checkpoint` from a universal checkpoint (DeepSpeed 0.19.8,
    `DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`):

    1. every sub-group's optimizer state holds the *same* `step` tensor; torch AdamW increments it in place,
       so with N sub-groups it advances N times per update and all but the first use a wrong bias correction.
       Each sub-group gets its own copy.
    2. the settings of param group 0 (weight_decay, betas, eps, lr) are copied into every param group, so the
       no-decay group decays. Each group's own settings are restored from the universal checkpoint.

    Weights and both Adam moments load correctly; with both fixes a resume on another number of ranks
    continues bitwise like ZeRO-1/2 do."""
    zero = engine.optimizer
    base = zero.optimizer
    seen: set[int] = set()
    for flat in zero.fp32_partitioned_groups_flat:
        state = base.state.get(flat, {})
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))
    saved = torch.load(Path(universal_dir) / "zero" / "optimizer_state.pt", weights_only=False)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    if len(saved_groups) != len(base.param_groups):
        raise RuntimeError(
            f"{universal_dir} holds {len(saved_groups)} param groups, the optimizer {len(base.param_groups)}"
        )
    for group, saved_group in zip(base.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def exclude_tied_frozen_parameters(engine) -> None:
    """`save_checkpoint(exclude_frozen_parameters=True)` (DeepSpeed 0.19.8, `DeepSpeedEngine.module_state_dict`)
    looks frozen parameters up through `named_parameters()`, which names a tied parameter once: the second name
    of a frozen tied weight (our `lm_head.weight`, the embedding) stays in the checkpoint and a LoRA checkpoint
    carries the whole embedding. Drop every name of a frozen parameter."""
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters=False, **kwargs):
        sd = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            prefix = kwargs.get("prefix", "")
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(prefix + name, None)
        return sd

    engine.module_state_dict = module_state_dict
