"""The fused LM head + cross-entropy (kernels/cross_entropy.py): the loss and gradients of the plain computation,
without ever holding the (tokens x vocab) logits."""

import weakref
from dataclasses import replace

import pytest
import torch
from helpers import MatmulDtypes
from torch.utils._python_dispatch import TorchDispatchMode

from llm.config.schema import ModelConfig
from llm.kernels.cross_entropy import chunk_tokens, linear_cross_entropy, linear_cross_entropy_ref
from llm.model.gpt import GPT

# (dtype, loss tolerance, gradient tolerance relative to the largest gradient)
# 16-bit: the logits are the same products, so the fp32 loss agrees closely; the gradients are rounded to the
# input's dtype at other points (a chunk's product, the 1/count scaling), a few units of its last place
PRECISIONS = [
    (torch.float64, 1e-12, 1e-12),
    (torch.float32, 1e-6, 2e-6),
    (torch.float16, 1e-6, 2e-3),
    (torch.bfloat16, 1e-6, 1.5e-2),
]
# against float64: (loss, gradients relative to the largest) about 2x the worst errors measured 2026-12-05 over
# the chunk sizes below, fused or plain: fp32 4.1e-7 (the loss summed token by token at chunk 1) and 5.8e-7,
# fp16 8.0e-6 and 1.1e-3, bf16 6.6e-5 and 8.5e-3; float64 1.7e-16 and 1.2e-15
TRUTH = {
    torch.float64: (1e-15, 3e-15),
    torch.float32: (1e-6, 1.2e-6),
    torch.float16: (2e-5, 2.2e-3),
    torch.bfloat16: (1.3e-4, 1.7e-2),
}


def inputs(dtype, n=203, width=48, padded=192, vocab=181, ignored=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, width, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(padded, width, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = -100
    return h, w, targets, vocab


def loss_and_grads(fn, h, w, targets, vocab, **kw):
    h.grad = w.grad = None
    loss = fn(h, w, targets, vocab, **kw)
    (loss * 2.5).backward()  # an incoming gradient other than 1
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", PRECISIONS, ids=str)
@pytest.mark.parametrize("chunk", [1, 37, 64, 4096])
def test_the_fused_loss_and_gradients_are_the_plain_ones(dtype, loss_tol, grad_tol, chunk):
    h, w, targets, vocab = inputs(dtype)
    ref = loss_and_grads(linear_cross_entropy_ref, h, w, targets, vocab)
    fused = loss_and_grads(linear_cross_entropy, h, w, targets, vocab, chunk=chunk)
    assert fused[0].dtype == ref[0].dtype == torch.promote_types(dtype, torch.float32)
    assert abs(fused[0].item() - ref[0].item()) <= loss_tol * abs(ref[0].item())
    for ours, plain in zip(fused[1:], ref[1:], strict=True):
        assert ours.dtype == plain.dtype == dtype
        assert (ours.double() - plain.double()).abs().max() <= grad_tol * plain.double().abs().max()
    assert fused[2][vocab:].abs().max() == 0  # vocabulary padding rows: never predicted, no gradient
    assert ref[0].item() > 1 and ref[1].abs().max() > 0  # not a trivially small case
    # and both against the ground truth: the plain path in float64 on the same (dtype-rounded) inputs
    hd, wd = (t.detach().double().requires_grad_() for t in (h, w))
    truth = loss_and_grads(linear_cross_entropy_ref, hd, wd, targets, vocab)
    for result in (fused, ref):
        assert abs(result[0].item() - truth[0].item()) <= TRUTH[dtype][0] * truth[0].item()
        for ours, exact in zip(result[1:], truth[1:], strict=True):
            assert (ours.double() - exact).abs().max() <= TRUTH[dtype][1] * exact.abs().max()


def test_under_autocast_every_product_runs_in_its_dtype():
    # the model's bf16 without ZeRO: fp32 hidden states and head under torch.autocast; the products written into
    # buffers (out=, in place) are not autocast by torch, so the loss casts its inputs itself
    h, w, targets, vocab = inputs(torch.float32)
    for fn in (linear_cross_entropy_ref, linear_cross_entropy):
        with MatmulDtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
            loss, dh, dw = loss_and_grads(fn, h, w, targets, vocab)
        assert set(seen.dtypes) == {"torch.bfloat16"}, (fn.__name__, seen.dtypes)
        assert loss.dtype == dh.dtype == dw.dtype == torch.float32
        if fn is linear_cross_entropy_ref:
            ref = loss, dh, dw
    assert abs(loss.item() - ref[0].item()) <= 1e-6 * ref[0].item()
    for ours, plain in zip((dh, dw), ref[1:], strict=True):
        assert (ours - plain).abs().max() <= 1.5e-2 * plain.abs().max()


def test_ignored_targets_give_exactly_zero_loss_and_gradient():
    h, w, targets, vocab = inputs(torch.float64, ignored=0.0)
    targets[100:] = -100
    loss, dh, dw = loss_and_grads(linear_cross_entropy, h, w, targets, vocab, chunk=32)
    assert dh[100:].abs().max() == 0  # ignored rows: no gradient at all
    first = loss_and_grads(linear_cross_entropy, h[:100].detach().requires_grad_(), w, targets[:100], vocab)
    assert abs(loss.item() - first[0].item()) < 1e-12 and torch.allclose(dw, first[2], rtol=0, atol=1e-14)
    targets[:] = -100  # nothing to learn: 0, with zero gradients (not NaN)
    loss, dh, dw = loss_and_grads(linear_cross_entropy, h, w, targets, vocab, chunk=32)
    assert loss.item() == 0 and dh.abs().max() == 0 and dw.abs().max() == 0


def test_chunks_hold_as_many_logits_as_h_but_not_fewer_than_the_minimum():
    assert chunk_tokens(16 * 1024, 50304, 768) == 256  # gpt2-124m: 250 x 50304 logits ~ 16k x 768
    assert chunk_tokens(16 * 256, 8192, 128) == 512  # the demo: the minimum, 2^22 / 8192 tokens
    assert chunk_tokens(300, 8192, 128) == 512 and chunk_tokens(1, 50304, 768) == 1  # not past N (rounded up)
    assert chunk_tokens(1 << 20, 1000, 4096) == 4096  # at most 4096 tokens


class Allocations(TorchDispatchMode):
    """The largest tensor any operation inside it creates, and the peak of the bytes held at once by the storages
    those operations created (each counted once, from its creation until it is freed)."""

    def __init__(self):
        super().__init__()
        self.largest = self.live = self.peak = 0
        self.held: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.held.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                storage = t.untyped_storage()
                if id(storage) not in self.held:
                    self.held.add(id(storage))
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def test_no_operation_holds_all_the_logits_and_the_peak_stays_far_below_them():
    h, w, targets, vocab = inputs(torch.float32, n=512, width=32, padded=1024, vocab=1000)
    chunk = 16  # as chunk_tokens would choose for a model this size if not for MIN_CHUNK_LOGITS
    logits_bytes, grads_bytes, chunk_bytes = 512 * 1000 * 4, (w.numel() + h.numel()) * 4, chunk * 1024 * 4
    with Allocations() as fused:
        linear_cross_entropy(h, w, targets, vocab, chunk=chunk).backward()
    with Allocations() as plain:
        linear_cross_entropy_ref(h, w, targets, vocab).backward()
    # fused: nothing larger than the weight's gradient; at most the two gradients twice over (accumulated, then
    # scaled by the incoming gradient) and a few chunks of logits at once (measured 2026-12-05: 594 kB of the
    # 655 kB bound, 0.29 of the logits' 2 MB); plain: the full logits, several times over (6.3 MB)
    assert fused.largest == w.numel()
    assert fused.peak <= 2 * grads_bytes + 4 * chunk_bytes < logits_bytes / 3, (fused.peak, logits_bytes)
    assert plain.largest >= 512 * 1000 and plain.peak >= 2 * logits_bytes, plain.peak


@pytest.mark.parametrize("tied", [True, False])
def test_the_model_gives_the_same_loss_and_gradients_fused_or_not(tied):
    cfg = ModelConfig(vocab_size=181, n_layer=2, n_head=4, n_embd=32, max_seq_len=64, tie_embeddings=tied)
    torch.manual_seed(0)
    fused = GPT(cfg).double()
    plain = GPT(replace(cfg, fused_loss=False)).double()
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 181, (3, 40))
    targets = torch.randint(0, 181, (3, 40))
    targets[0, :10] = -100
    results = []
    for model in (fused, plain):
        loss = model(idx, targets)
        loss.backward()
        results.append((loss.item(), {k: p.grad for k, p in model.named_parameters()}))
    assert abs(results[0][0] - results[1][0]) < 1e-12
    for k, g in results[1][1].items():
        assert torch.allclose(results[0][1][k], g, rtol=0, atol=1e-12), k
    assert torch.equal(fused(idx), plain(idx)) and fused(idx).shape == (3, 40, 181)  # logits: the same path


def test_bad_shapes_are_refused_in_one_line():
    h, w, targets, vocab = inputs(torch.float32)
    with pytest.raises(ValueError, match=r"expected h \(N, C\), weight \(V, C\), targets \(N,\)"):
        linear_cross_entropy(h[None], w, targets, vocab)
    with pytest.raises(ValueError, match="vocab_size 500 must be in 1..192"):
        linear_cross_entropy(h, w, targets, 500)
