"""Shared fixtures: a small corpus, a tokenizer trained on it, and a prepared dataset (built once)."""

import os

# Kernels must be decorated in interpreter mode: set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import random  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from llm.data.prepare import PrepareConfig, prepare  # noqa: E402
from llm.data.tokenizer import train_tokenizer  # noqa: E402

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
EXTRA = ["naïve", "日本語", "émigré", "Ωμέγα", "🎉", "\ttab", "    indent", "x = 42", "def f():"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct multi-line documents of varied length with digits, indentation and non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(1, 12)):
            words = rng.choices(WORDS + EXTRA, k=rng.randint(1, 14))
            lines.append(" ".join(words) + f" {rng.randint(0, 10**6)}")
        docs.append(f"doc {i}\n" + "\n".join(lines))
    return docs


def pytest_collection_modifyitems(config, items):
    # The Slurm tests share one local cluster and mostly wait on it (time limits, requeues): they are all in
    # test_slurm.py, which one worker runs (pytest-xdist --dist loadfile), started first, while the other
    # worker runs the rest.
    slurm = [item for item in items if "slurm" in item.keywords]
    items[:] = slurm + [item for item in items if "slurm" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A directory of 300 plain-text documents, one per file."""
    d = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(make_docs(300)):
        (d / f"doc_{i:04d}.txt").write_text(doc, encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    """A 600-piece BPE tokenizer trained on the stdlib json package and the synthetic corpus."""
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([STDLIB_JSON, str(corpus_dir)], out, vocab_size=600, model_type="bpe")
    return out


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    """The synthetic corpus prepared into several small shards per split."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    cfg = PrepareConfig(
        [str(corpus_dir)],
        str(tokenizer_dir),
        str(out),
        val_fraction=0.1,
        workers=1,
        shard_tokens=3000,
        chunk_bytes=4096,
    )
    prepare(cfg, progress=False, verbose=False)
    return out


@pytest.fixture
def cfg_factory(tmp_path, prepared_dir, tokenizer_dir):
    """make_cfg(...) for this test: cfg_factory(name, section={field: value, ...})."""
    from helpers import make_cfg

    return lambda name="run", **sections: make_cfg(tmp_path, prepared_dir, tokenizer_dir, name, **sections)


# The run most crash and Slurm tests interrupt, and compare with this uninterrupted copy of it, step for step.
REFERENCE = ("deepspeed=zero2", "train.max_steps=10", "train.ckpt_every_steps=2", "train.eval_every=5")


@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory, prepared_dir, tokenizer_dir):
    """(train losses, val losses) by step of the REFERENCE run on 2 ranks under torchrun, uninterrupted."""
    from launch import launch, losses, overrides

    tmp = tmp_path_factory.mktemp("reference")
    launch(overrides(tmp, prepared_dir, tokenizer_dir, "whole", *REFERENCE), nproc=2)
    return losses(tmp, "whole"), losses(tmp, "whole", "val/loss")
