"""The fused LM head + cross-entropy (kernels/cross_entropy.py): the loss and gradients of the plain computation,
without ever holding the (tokens x vocab) logits."""

from dataclasses import replace

import pytest
import torch
from helpers import MatmulDtypes
from torch.utils._python_dispatch import TorchDispatchMode

from llm.config import ModelConfig
from llm.kernels.cross_entropy import chunk_tokens, linear_cross_entropy, linear_cross_entropy_ref
from llm.model import GPT

# (dtype, loss tolerance, gradient tolerance relative to the largest gradient)
# 16-bit: the logits are the same products, so the fp32 loss agrees closely; the gradients are rounded to the
# input's dtype at other points (a chunk's product, the 1/count scaling), a few units of its last place
PRECISIONS = [
    (torch.float64, 1e-12, 1e-12),
    (torch.float32, 1e-6, 2e-6),
    (torch.float16, 1e-6, 2e-3),
    (torch.bfloat16, 1e-6, 1.5e-2),
]


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


def test_no_operation_holds_all_the_logits():
    h, w, targets, vocab = inputs(torch.float32, n=512, width=32, padded=1024, vocab=1000)
    chunk = 16  # as chunk_tokens would choose for a model this size if not for MIN_CHUNK_LOGITS

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    for fn, bound in [(linear_cross_entropy, 1024 * 32 * 2), (linear_cross_entropy_ref, 512 * 1000)]:
        Largest.numel = 0
        with Largest():
            fn(h, w, targets, vocab, **({"chunk": chunk} if fn is linear_cross_entropy else {})).backward()
        # fused: nothing larger than the weight's gradient; plain: the full logits
        assert (Largest.numel <= bound) if fn is linear_cross_entropy else (Largest.numel >= bound), Largest.numel


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
