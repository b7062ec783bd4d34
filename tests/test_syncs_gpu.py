"""On a GPU (marker `gpu`), a training step synchronises the device with the host once, counted by CUDA itself:
under `torch.cuda.set_sync_debug_mode("warn")` PyTorch warns at every synchronising operation, from Python or
inside an op (a blocking copy either way, `item()`, a device-wide synchronize), where test_syncs.py sees only the
Python-level conversions. As there, the count for 8 steps minus that for 4 is 4 times the per-step count."""

import collections
import warnings

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("hydra")

from helpers import make_cfg  # noqa: E402

from llm.train import train  # noqa: E402

pytestmark = pytest.mark.gpu


def synchronisations(cfg) -> collections.Counter:
    """Where each synchronisation of a training run happened (file:line of the Python frame that caused it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


def test_a_training_step_synchronises_the_gpu_once(tmp_path, prepared_dir, tokenizer_dir):
    counts = {}
    for steps in (4, 8):
        quiet = {"max_steps": steps, "eval_every": 0, "ckpt_every_steps": 0, "deterministic": False}
        sections = {"train": quiet, "logger": {"log_every": 1000}, "deepspeed": {"stage": 0}}
        counts[steps] = synchronisations(make_cfg(tmp_path, prepared_dir, tokenizer_dir, f"s{steps}", **sections))
    extra = counts[8] - counts[4]
    # one place, once a step: the decision all ranks take together (all_max's copy to the host)
    ((where, n),) = extra.items()
    assert "llm/train.py" in where and n == 4, extra
