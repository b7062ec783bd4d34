"""A training step copies from the device to the host once: the step's decision (skip a non-finite step, stop
on a signal, save on time), taken together by all ranks, and asks for no device-wide synchronisation (DeepSpeed's
throughput timer, on by default, would ask for two). Counted by patching every tensor-to-host conversion
in a short CPU run: the count for 8 steps minus that for 4 is 4 times the per-step count (the first and last
steps, logging, evaluation and checkpoints are the same in both). Not counted: PyTorch's optimizers reading
their step counters (`torch/optim/optimizer.py`), tensors that PyTorch keeps on the host by design (unless
capturable or fused), so no device synchronisation."""

import collections
import traceback

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from helpers import make_cfg

from llm.train import train

CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


def count_conversions(monkeypatch, cfg) -> int:
    """(count, where) of the tensor-to-host conversions of a run, and of the device-wide synchronisations asked
    of DeepSpeed's accelerator (on a CPU they do nothing, on a GPU each waits for all queued work)."""
    calls = []

    def synchronize(*args, **kwargs):
        caller = traceback.extract_stack(limit=2)[0]
        calls.append(f"synchronize at {caller.filename}:{caller.lineno}")

    monkeypatch.setattr(get_accelerator(), "synchronize", synchronize)
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if not caller.filename.endswith("torch/optim/optimizer.py"):
                calls.append(f"{_name} at {caller.filename}:{caller.lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train(cfg)
    monkeypatch.undo()
    return len(calls), calls


# DeepSpeed's own: ZeRO-1/2 test the gradient norm for validity on the host (deepspeed/runtime/utils.py
# is_invalid_grad_norm) three times a step; without ZeRO it does not, in fp32 or in bf16 (autocast over fp32
# weights: DeepSpeed's bf16 wrapper there would read every gradient's overflow flag and norm)
DEEPSPEED_PER_STEP = {(0, "fp32"): 0, (2, "fp32"): 3, (0, "bf16"): 0}


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", sorted(DEEPSPEED_PER_STEP))
def test_a_training_step_synchronises_once(monkeypatch, tmp_path, prepared_dir, tokenizer_dir, stage, precision):
    counts = {}
    for steps in (4, 8):
        quiet = {"max_steps": steps, "eval_every": 0, "ckpt_every_steps": 0}
        ds = {"stage": stage, "precision": precision}
        sections = {"train": quiet, "logger": {"log_every": 1000}, "deepspeed": ds}
        counts[steps] = count_conversions(
            monkeypatch, make_cfg(tmp_path, prepared_dir, tokenizer_dir, f"s{steps}", **sections)
        )
    extra = collections.Counter(counts[8][1]) - collections.Counter(counts[4][1])
    ours = {where: n for where, n in extra.items() if "/deepspeed/" not in where}
    theirs = {where: n for where, n in extra.items() if "/deepspeed/" in where}
    ((where, n),) = ours.items()  # one place, once a step: the decision all ranks take together
    assert where.startswith("tolist at") and "llm/parallel/distributed.py" in where and n == 4, extra
    assert sum(theirs.values()) == 4 * DEEPSPEED_PER_STEP[stage, precision], extra
    assert all("deepspeed/runtime/utils.py" in where for where in theirs), extra
