"""Helpers shared by the training tests: a small, fast, deterministic config over the fixture dataset, the
per-step records of a run's metrics.jsonl, a way to damage a file without changing its size, small
fine-tuning files, and a record of the dtypes the matrix products run in."""

import collections
import contextlib
import json
import random
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm.config.schema import Config
from llm.training.metrics import read_history

# transformers against our model on the same weights, fp32: measured at most 1.3e-6 on logits of magnitude ~2.5
# (2026-12-05, tests/test_hf.py's five models); an exported rms_norm_eps of 0 instead of 1e-6 moves them 2e-4
HF_LOGITS_ATOL = 1e-5


def make_cfg(tmp_path: Path, prepared_dir: Path, tokenizer_dir: Path, name: str = "run", **sections) -> Config:
    """A small, fast, deterministic run over the fixture dataset; `sections` override fields per section."""
    cfg = Config(name=name, runs_dir=str(tmp_path / "runs"))
    cfg.model = replace(cfg.model, n_layer=2, n_head=4, n_embd=32, max_seq_len=64)
    cfg.data = replace(
        cfg.data, paths=[str(prepared_dir)], tokenizer=str(tokenizer_dir), seq_len=32, prepare_if_missing=False
    )
    cfg.optim = replace(cfg.optim, lr=3e-3, warmup_steps=2)
    cfg.train = replace(
        cfg.train,
        micro_batch=4,
        global_batch=8,
        max_steps=8,
        eval_every=4,
        eval_batches=2,
        ckpt_every_steps=4,
        sample_tokens=0,
        deterministic=True,
    )
    cfg.logger = replace(cfg.logger, wandb=False, log_every=1)
    # under ZeRO-3 every weight partitioned, however small (DeepSpeed keeps those under 1e5 elements whole: all of
    # a test model's would be)
    cfg.deepspeed = replace(cfg.deepspeed, param_persistence_threshold=0)
    for section, values in sections.items():
        setattr(cfg, section, replace(getattr(cfg, section), **values))
    return cfg


def records(run_dir, key="train/loss") -> dict[int, float]:
    """{step: value} of one metric in a run's history; a history without it fails the test (a comparison of two
    empty results would pass whatever the runs did)."""
    path = Path(run_dir) / "metrics.jsonl"
    found = {r["step"]: r[key] for r in read_history(path) if key in r}
    assert found, f"{path} holds no {key!r} record: nothing to compare"
    return found


def flip_bytes(path: Path, n: int = 4096) -> None:
    """Damage a file without changing its size: invert n bytes in its middle."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 - n // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _i in range(n):
        words = rng.choices(WORDS, k=rng.randint(1, 4))
        rows.append({"prompt": f"reverse: {' '.join(words)}\n", "response": " ".join(reversed(words))})
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "alpha?"},
                {"role": "assistant", "content": "beta"},
            ]
        }
    )
    return rows


def classify_rows(n, seed=0):
    rng = random.Random(seed)
    kinds = {"greek": WORDS, "digits": [str(d) for d in range(10)], "json": ["{", "}", '"key":', "[1, 2]", "null"]}
    return [
        {"text": " ".join(rng.choices(kinds[k], k=rng.randint(2, 6))), "label": k}
        for k in rng.choices(sorted(kinds), k=n)
    ]


@contextlib.contextmanager
def one_thread():
    """Run in-process training with one intra-op thread, as the launched ranks (OMP_NUM_THREADS=1) do: a
    matmul split over threads may round differently, and the comparisons with launched runs are bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class MatmulDtypes(TorchDispatchMode):
    """Inside it, `dtypes` counts the input dtypes of every matrix product that runs (mm, addmm, bmm, baddbmm,
    whatever called it: autocast's casts happen before, so a product autocast missed shows as float32), and
    `attention` those of every attention: torch's scaled-dot-product ops (each backend, forward and backward)
    and our Triton ops (llm_kernels::attention, ::attention_bwd)."""

    PRODUCTS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.dtypes = collections.Counter()
        self.attention = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            operands = args[-2:]  # (bias, a, b) or (a, b): the two multiplied
            self.dtypes.update(str(t.dtype) for t in operands if isinstance(t, torch.Tensor))
        elif "scaled_dot_product" in name or func.namespace == "llm_kernels":
            operands = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 4]
            self.attention.update(f"{name}: {t.dtype}" for t in operands)
        return func(*args, **(kwargs or {}))
