"""The kernel correctness tests at real sizes on a GPU (marker `gpu`): compiled kernels, bf16 and fp16, against
float64 references computed on the GPU. Run them apart from the interpreted suite, since kernels are compiled
or interpreted for the whole process: `TRITON_INTERPRET=0 pytest -m gpu` (tools/gpu_check.sh does)."""

import os

import pytest
import torch
from test_kernels import TOL, assert_close, compare_attention, sorted_docs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled kernels: TRITON_INTERPRET=0"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "T, D, Hq, Hkv, causal, docs",
    [
        (2048, 128, 16, 4, True, True),
        (4096, 64, 8, 8, True, False),
        (1000, 80, 4, 1, False, True),
        (1, 128, 4, 2, True, False),
    ],
)
def test_attention_on_gpu(dtype, T, D, Hq, Hkv, causal, docs):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, T, D, device="cuda", generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    do = torch.randn(2, Hq, T, D, device="cuda", generator=g).to(dtype)
    compare_attention(q, k, v, do, causal, sorted_docs(2, T).cuda() if docs else None)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_and_unsorted_documents_on_gpu(causal):
    # documents of realistic lengths (log-normal, mean ~250: tiles inside documents run unmasked, boundary tiles
    # masked) in one row, and the same ids shuffled in the other (the fallback that masks every tile)
    T, D = 4096, 128
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(5.0 + torch.randn(200, generator=g)).long().clamp(min=1)
    packed = torch.repeat_interleave(torch.arange(200), lengths)[:T]
    assert len(packed) == T
    doc_ids = torch.stack([packed, packed[torch.randperm(T, generator=g)]]).cuda()
    gc = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(2, h, T, D, device="cuda", generator=gc).bfloat16() for h in (8, 2, 2, 8))
    compare_attention(q, k, v, do, causal, doc_ids, f" (causal={causal})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [4096, 16384])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norms_on_gpu(dtype, N, kind):
    from llm.kernels.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    x, r, dy, dh = (torch.randn(4096, N, device="cuda", generator=g).to(dtype) for _ in range(4))
    w = (1 + 0.1 * torch.randn(N, device="cuda", generator=g)).to(dtype)
    fn, ref_fn = (layer_norm, layer_norm_ref) if kind == "layer" else (rms_norm, rms_norm_ref)
    xs = [t.clone().requires_grad_() for t in (x, w, r)]
    refs = [t.double().requires_grad_() for t in (x, w, r)]
    for f, args, kw in ((fn, xs, {"impl": "triton"}), (ref_fn, refs, {})):
        y, h = f(args[0], args[1], residual=args[2], **kw)
        ((y.double() * dy.double()).sum() + (h.double() * dh.double()).sum()).backward()
        args.append((y, h))
    assert_close(xs[3][0], refs[3][0], dtype, "output")
    for name, a, e in zip(("dx", "dweight", "dresidual"), xs[:3], refs[:3], strict=True):
        assert_close(a.grad, e.grad, dtype, name)
    assert TOL[dtype] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_linear_cross_entropy_on_gpu(dtype):
    # gpt2-124m's head at 8 x 1024 tokens against the plain head and loss in float64
    from llm.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(8192, 768, device="cuda", generator=g).to(dtype)
    w = (0.02 * torch.randn(50304, 768, device="cuda", generator=g)).to(dtype)
    targets = torch.randint(0, 50257, (8192,), device="cuda", generator=g)
    targets[:1000] = -100
    xs, refs = [t.clone().requires_grad_() for t in (h, w)], [t.double().requires_grad_() for t in (h, w)]
    loss = linear_cross_entropy(*xs, targets, 50257)
    ref = linear_cross_entropy_ref(*refs, targets, 50257)
    (loss * 3).backward()
    (ref * 3).backward()
    assert abs(loss.item() - ref.item()) <= 1e-3 * ref.item()
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for x, r in zip(xs, refs, strict=True):
        assert (x.grad.double() - r.grad).abs().max() <= tol * r.grad.abs().max()
    assert xs[1].grad[50257:].abs().max() == 0


def test_kernels_are_bitwise_deterministic_on_gpu():
    # the interpreter runs programs one after another, so its determinism test cannot fail; here thousands of
    # programs run at once: GQA's dK/dV over the query heads of a group, documents, the norms' weight gradient
    # (per-program partial rows, then a sum) and the fused loss must give the same bits every time
    from llm.kernels.attention import attention
    from llm.kernels.cross_entropy import linear_cross_entropy
    from llm.kernels.norm import layer_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(2, h, 2048, 128, device="cuda", generator=g).bfloat16() for h in (16, 4, 4, 16))
    x, r = (torch.randn(8192, 2048, device="cuda", generator=g).bfloat16() for _ in range(2))
    w = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
    hw = (0.02 * torch.randn(50304, 768, device="cuda", generator=g)).bfloat16()
    hh = torch.randn(4096, 768, device="cuda", generator=g).bfloat16()
    targets = torch.randint(0, 50257, (4096,), device="cuda", generator=g)
    docs = sorted_docs(2, 2048).cuda()

    def once() -> list[torch.Tensor]:
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*qkv, doc_ids=docs, impl="triton").backward(do)
        xwr = [t.clone().requires_grad_() for t in (x, w, r)]
        y, h = layer_norm(xwr[0], xwr[1], residual=xwr[2], impl="triton")
        (y.float().sum() + h.float().square().sum()).backward()
        head = [t.clone().requires_grad_() for t in (hh, hw)]
        loss = linear_cross_entropy(*head, targets, 50257)
        loss.backward()
        return [t.grad for t in qkv + xwr + head] + [y, h, loss.detach()]

    first = once()
    for _ in range(4):
        again = once()
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
