"""On a GPU (marker `gpu`), a training step synchronises the device with the host once, counted by CUDA itself:
under `torch.cuda.set_sync_debug_mode("warn")` PyTorch warns at every blocking copy between host and device
(`item()`, `tolist()`, a tensor made from host values) and stream synchronisation, from Python or inside an op,
where test_syncs.py sees only the Python-level conversions; device-wide synchronisations (`torch.cuda.synchronize`,
DeepSpeed's accelerator) are not reported by it and are counted by patching them. As there, the count for 8 steps
minus that for 4 is 4 times the per-step count. Without ZeRO, in fp32 and in bf16 (autocast over fp32 weights)."""

import collections
import traceback
import warnings

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("hydra")

from deepspeed.accelerator import get_accelerator  # noqa: E402
from helpers import MatmulDtypes, make_cfg  # noqa: E402

from llm.train import train  # noqa: E402

pytestmark = pytest.mark.gpu


def synchronisations(monkeypatch, cfg) -> collections.Counter:
    """Where each synchronisation of a training run happened (file:line of the Python frame that caused it)."""
    device_wide = []

    def counted(original):
        def synchronize(*args, **kwargs):
            device_wide.append("synchronize at {0.filename}:{0.lineno}".format(traceback.extract_stack(limit=2)[0]))
            return original(*args, **kwargs)

        return synchronize

    monkeypatch.setattr(torch.cuda, "synchronize", counted(torch.cuda.synchronize))
    monkeypatch.setattr(get_accelerator(), "synchronize", counted(get_accelerator().synchronize))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            monkeypatch.undo()
    reported = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return collections.Counter(reported + device_wide)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_synchronises_the_gpu_once(monkeypatch, tmp_path, prepared_dir, tokenizer_dir, precision):
    counts = {}
    for steps in (4, 8):
        quiet = {"max_steps": steps, "eval_every": 0, "ckpt_every_steps": 0, "deterministic": False}
        ds = {"stage": 0, "precision": precision}
        sections = {"train": quiet, "logger": {"log_every": 1000}, "deepspeed": ds}
        cfg = make_cfg(tmp_path, prepared_dir, tokenizer_dir, f"s{steps}", **sections)
        counts[steps] = synchronisations(monkeypatch, cfg)
    extra = counts[8] - counts[4]
    # one place, once a step: the decision all ranks take together (all_max's copy to the host, distributed.py)
    ((where, n),) = extra.items()
    assert "llm/parallel/distributed.py" in where and n == 4, extra


def test_bf16_without_zero_runs_every_product_in_bf16_on_the_gpu(tmp_path, prepared_dir, tokenizer_dir):
    # the DeepSpeed engine enters the autocast itself (`torch_autocast` in deepspeed.json): entered around the
    # engine instead, it is switched off there on a GPU (not on a CPU, where test_train checks the same)
    quiet = {"max_steps": 2, "eval_every": 0, "ckpt_every_steps": 0, "deterministic": False}
    sections = {"train": quiet, "deepspeed": {"stage": 0, "precision": "bf16"}}
    with MatmulDtypes() as seen:
        train(make_cfg(tmp_path, prepared_dir, tokenizer_dir, "bf16", **sections))
    assert set(seen.dtypes) == {"torch.bfloat16"}, seen.dtypes
    # the attention is our Triton op, forward and backward, in bf16
    assert {key.split(": ")[1] for key in seen.attention} == {"torch.bfloat16"}, seen.attention
    assert {key.split(": ")[0] for key in seen.attention} == {"attention", "attention_bwd"}, seen.attention
