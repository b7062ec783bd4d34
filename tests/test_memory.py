"""The activation memory estimate (llm/model/memory.py) against the peaks measured on CPU by PyTorch's memory
profiler, for both architectures, with and without activation checkpointing."""

import json
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llm.config.schema import ModelConfig
from llm.model.gpt import GPT, mlp_hidden
from llm.model.memory import activation_bytes, state_bytes

T = 4096
ARCHS = {
    "gpt2": dict(n_layer=4, n_head=4, n_embd=64, vocab_size=97, max_seq_len=T, kernels="torch"),
    "llama": dict(
        n_layer=4, n_head=4, n_kv_head=2, n_embd=64, vocab_size=97, max_seq_len=T, kernels="torch", norm="rmsnorm",
        pos="rope", mlp="swiglu", mlp_hidden=192, bias=False, tie_embeddings=False,
    ),
}  # fmt: skip
# measured / estimated, 2026-12-05: 0.87 (GPT-2) to 1.06 (Llama, whose SwiGLU backward holds larger temporaries)
LOW, HIGH = 0.8, 1.15


def measured_activations(model: GPT, out_dir) -> float:
    """The peak of live tensor bytes during one forward and backward, less what was live before it (weights) and
    the weights' gradients (allocated during the backward): the activations and the backward's temporaries."""
    idx = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        model(idx, idx).backward()
    path = os.path.join(out_dir, f"timeline{os.getpid()}.json")
    p.export_memory_timeline(path, device="cpu")
    _, sizes = json.load(open(path))
    live = [sum(s) for s in sizes]
    assert len(live) > 100  # a timeline, not a summary
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(live) - live[0] - grads


def build(arch: str, checkpointing: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**ARCHS[arch]))
    model.activation_checkpointing = checkpointing
    return model.train()


def estimate(arch: str, checkpointing: bool, sequence: int) -> float:
    cfg = ModelConfig(**ARCHS[arch])
    return activation_bytes(cfg, mlp_hidden(cfg), 1, T, sequence, checkpointing, bytes_per_value=4)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["whole", "checkpointing"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_activation_estimate_is_near_the_measured_peak(tmp_path, arch, checkpointing):
    """On one rank: the profiler's memory analysis trips on the sequence-parallel exchange's all-to-all (an internal
    assertion, "duplicate outputs", not always), so the split is measured by the tensors autograd keeps instead
    (tests/test_sequence_parallel.py: 1.06/N per rank), which the estimate divides by N."""
    measured = measured_activations(build(arch, checkpointing), tmp_path)
    ratio = measured / estimate(arch, checkpointing, 1)
    assert LOW <= ratio <= HIGH, ratio


def test_state_bytes_follow_the_zero_stages():
    n = 1_000_000
    assert state_bytes(n, 0, 8) == 16 * n
    assert state_bytes(n, 1, 8) == 4 * n + 12 * n / 8
    assert state_bytes(n, 2, 8) == 2 * n + 14 * n / 8
    assert state_bytes(n, 3, 8) == 16 * n / 8
