"""The Triton kernels, run by the Triton interpreter on CPU (TRITON_INTERPRET=1, set in conftest.py), against
float64 references: outputs and every gradient, on odd shapes, in fp32 and fp16 (and bf16 through the labelled
test-side shim in bf16_shim.py, since the interpreter gets bf16 wrong).

Tolerance: max |kernel - reference| <= TOL[dtype] * max(1, max |reference|), computed from the same
dtype-rounded inputs. For fp16 and bf16, TOL is 4 units of rounding of the dtype (2^-11, 2^-8), the rounding of
P and dS to the input dtype before their matmuls being the dominant error: the worst errors measured over this
file (2026-12-05) are 2.2 units (fp16, dK, peaked scores) and 1.2 units (bf16, output). fp32 has no such
rounding; its errors are those of fp32 sums and exponents, 3.1e-6 at worst (dK, peaked scores; 1.3e-6 with
N(0, 1) inputs), and TOL is 1e-5, about 3x that. A kernel with a wrong mask, scale or formula is off by 1e-1 or
more; one that accumulates an fp32 input in 16 bits, by 1e-3.
"""

import contextlib
import logging
import os

import pytest
import torch
from bf16_shim import bf16_interpreter

from llm.kernels import attention as attention_module
from llm.kernels import dispatch
from llm.kernels.attention import _attention_op, attention, attention_ref
from llm.kernels.norm import _norm_op, layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests (TRITON_INTERPRET=0 runs the GPU tests)"
)
TOL = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def assert_close(actual, expected, dtype, what):
    err = (actual.double() - expected).abs().max().item()
    bound = TOL[dtype] * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({dtype})"


def dtype_context(dtype):
    return bf16_interpreter() if dtype == torch.bfloat16 else contextlib.nullcontext()


def sorted_docs(B, T, n_docs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randint(0, n_docs, (B, T), generator=g), dim=1).values


def compare_attention(q, k, v, do, causal, doc_ids, what=""):
    """The kernel's output and dq, dk, dv against float64 computed from the same (dtype-rounded) inputs."""
    dtype = q.dtype
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    with dtype_context(dtype) if q.device.type == "cpu" else contextlib.nullcontext():
        out = attention(*xs, causal=causal, doc_ids=doc_ids, impl="triton")
        out.backward(do)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*refs, causal=causal, doc_ids=doc_ids)
    ref.backward(do.double())
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype, f"output{what}")
    for name, x, r in zip(("dq", "dk", "dv"), xs, refs, strict=True):
        assert_close(x.grad, r.grad, dtype, f"{name}{what}")


def check_attention(B, Hq, Hkv, T, D, causal, docs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    compare_attention(q, k, v, do, causal, sorted_docs(B, T, seed=seed) if docs else None)


# Odd shapes: every T in (1, 17, 100, 257) with every D in (32, 64, 80, 128), cycling through head grouping
# (Hq/Hkv = 1, 2, 4). Causal or not, document masks or not, and fp32 or fp16 vary independently: each is a
# different parity of T's and D's indices, so all 8 of their combinations occur, and every T and every D meets
# both values of each.
GROUPS = [(2, 2), (4, 2), (4, 1)]
CASES = [
    (
        T,
        D,
        GROUPS[(4 * t + d) % 3],
        (t ^ d) & 1 == 0,
        ((t >> 1) ^ d) & 1 == 1,
        (torch.float32, torch.float16)[(t ^ (t >> 1) ^ d) & 1],
    )
    for t, T in enumerate((1, 17, 100, 257))
    for d, D in enumerate((32, 64, 80, 128))
]


@pytest.mark.parametrize("T, D, heads, causal, docs, dtype", CASES)
def test_attention_matches_float64(T, D, heads, causal, docs, dtype):
    check_attention(2 if T < 200 else 1, heads[0], heads[1], T, D, causal, docs, dtype)


@pytest.mark.parametrize("T, D, causal, docs", [(100, 64, True, True), (257, 80, False, False), (17, 128, True, False)])
def test_attention_bf16_through_the_shim(T, D, causal, docs):
    check_attention(1, 4, 2, T, D, causal, docs, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal, docs", [(True, True), (False, False), (True, False)])
def test_attention_with_peaked_scores_matches_float64(dtype, causal, docs):
    # scores with a standard deviation of 12 (queries scaled up): each row's softmax is dominated by a few keys
    # and its running maximum jumps from tile to tile, where a missing or wrong rescaling of the partial sums
    # (the online softmax) shows; N(0, 1) inputs give flat rows that hide it
    g = torch.Generator().manual_seed(3)
    T, D = 200, 64
    q = (12 * torch.randn(1, 4, T, D, generator=g)).to(dtype)
    k, v = (torch.randn(1, 2, T, D, generator=g).to(dtype) for _ in range(2))
    do = torch.randn(1, 4, T, D, generator=g).to(dtype)
    compare_attention(q, k, v, do, causal, sorted_docs(1, T, seed=3) if docs else None)


@pytest.mark.parametrize("D", [16, 96])
def test_attention_other_head_dims(D):
    check_attention(1, 2, 1, 65, D, True, True, torch.float32)


def test_interpreter_still_mishandles_bf16():
    """When this fails, upstream Triton fixed bf16 in the interpreter: delete tests/bf16_shim.py and its uses."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 32, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, impl="triton")
    assert (out.double() - attention_ref(q.double(), k.double(), v.double())).abs().max() > 0.1


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the poisoned document itself
def test_fully_masked_tiles_are_skipped():
    # documents aligned to the interpreter's 64-wide tiles: a tile of another document is never loaded, so
    # poisoning its keys and values with NaN must not reach any other document's output or gradients
    T, D = 256, 32
    doc_ids = torch.tensor([[0] * 64 + [1] * 64 + [2] * 128])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, D, generator=g) for _ in range(3))
    k[:, :, :64], v[:, :, :64] = float("nan"), float("nan")
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    for causal in (True, False):
        out = attention(*xs, causal=causal, doc_ids=doc_ids, impl="triton")
        out[:, :, 64:].sum().backward()
        assert torch.isfinite(out[:, :, 64:]).all() and torch.isfinite(xs[0].grad[:, :, 64:]).all()
        clean = [t[:, :, 64:].double() for t in (q, k, v)]
        assert_close(
            out[:, :, 64:], attention_ref(*clean, causal=causal, doc_ids=doc_ids[:, 64:]), torch.float32, "output"
        )
        for x in xs:
            x.grad = None


# The GPU tables' block sizes (kernels/attention.py CONFIGS), run by the interpreter: patching the architecture
# the launch sees makes it take that table's BLOCK_M/BLOCK_N (warps and stages mean nothing here). fp16 takes
# the 16-bit tables, fp32 its own small configuration; None is the interpreter's own 64 x 64.
TABLES = [(None, torch.float32), (80, torch.float16), (90, torch.float16), (90, torch.float32)]
HUGE = {torch.float16: 3e4, torch.float32: 1e6}


def poisoned(x: torch.Tensor, where: torch.Tensor, value: float) -> torch.Tensor:
    """x (B, H, T, D) with the time steps in `where` (T,) set to a huge value: any leak dwarfs the tolerance."""
    x = x.clone()
    x[:, :, where] = value
    return x


@pytest.mark.parametrize("arch, dtype", TABLES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # poisoned scores, masked after
def test_the_gpu_block_sizes_match_float64_and_nothing_leaks(monkeypatch, arch, dtype, D):
    monkeypatch.setattr(attention_module, "_arch", lambda x: arch)
    T, g = 200, torch.Generator().manual_seed(arch or 0)  # 200: several tiles of every size, a ragged last one
    q, k, v, do = (torch.randn(1, h, T, D, generator=g).to(dtype) for h in (2, 1, 1, 2))  # 2 query heads per key
    # causal: rows before m must not see keys at or after m (m inside a tile, not on its edge); the poison is
    # a huge V behind keys of 0, whose score 0 is near every row's others (a leaked key weighs about 1 / m in
    # every row; a large constant key would weigh nothing in the rows whose query sums below zero, a third)
    m = 77
    after = torch.arange(T) >= m
    xs = [q.clone(), poisoned(k, after, 0.0), poisoned(v, after, HUGE[dtype])]
    xs = [x.requires_grad_() for x in xs]
    out = attention(*xs, causal=True, impl="triton")
    (out[:, :, :m].float() * do[:, :, :m].float()).sum().backward()
    clean = [t[:, :, :m].double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*clean, causal=True)
    ref.backward(do[:, :, :m].double())
    assert_close(out[:, :, :m], ref, dtype, "causal output")
    assert_close(xs[0].grad[:, :, :m], clean[0].grad, dtype, "causal dq")
    for x, c, name in ((xs[1], clean[1], "dk"), (xs[2], clean[2], "dv")):
        assert_close(x.grad[:, :, :m], c.grad, dtype, f"causal {name}")
        assert x.grad[:, :, m:].abs().max() == 0, f"causal {name}: gradient reached keys after the diagonal"
    # documents, causal or not: a document's rows see only its keys; the documents around it are poisoned
    docs = torch.tensor([0] * 50 + [1] * 97 + [2] * (T - 147))
    inside = docs == 1
    for causal in (True, False):
        xs = [q.clone(), poisoned(k, ~inside, 0.0), poisoned(v, ~inside, HUGE[dtype])]
        xs = [x.requires_grad_() for x in xs]
        out = attention(*xs, causal=causal, doc_ids=docs[None], impl="triton")
        (out[:, :, inside].float() * do[:, :, inside].float()).sum().backward()
        clean = [t[:, :, inside].double().requires_grad_() for t in (q, k, v)]
        ref = attention_ref(*clean, causal=causal)
        ref.backward(do[:, :, inside].double())
        assert_close(out[:, :, inside], ref, dtype, f"document output (causal={causal})")
        for x, c, name in zip(xs, clean, ("dq", "dk", "dv"), strict=True):
            assert_close(x.grad[:, :, inside], c.grad, dtype, f"document {name} (causal={causal})")
            assert x.grad[:, :, ~inside].abs().max() == 0, f"{name}: gradient crossed a document boundary"


@pytest.mark.parametrize("arch, dtype", TABLES[:3], ids=str)
def test_unsorted_and_repeated_document_ids_match_the_reference(monkeypatch, arch, dtype):
    # a document id that comes back after another (0 ... 1 ... 0) is one document: its tokens see each other
    monkeypatch.setattr(attention_module, "_arch", lambda x: arch)
    T, g = 230, torch.Generator().manual_seed(1)
    doc_ids = torch.tensor([[0] * 40 + [1] * 70 + [0] * 30 + [2] * 60 + [1] * 30, [0] * T])
    doc_ids[1] = torch.randint(0, 3, (T,), generator=g)  # interleaved at random
    q, k, v, do = (torch.randn(2, 2, T, 64, generator=g).to(dtype) for _ in range(4))
    for causal in (True, False):
        compare_attention(q, k, v, do, causal, doc_ids, f" (causal={causal})")


@pytest.mark.parametrize("blocks", [(64, 32), (32, 64), (128, 64)], ids=str)
def test_unequal_block_sizes_split_the_loops_right_on_every_row(monkeypatch, blocks):
    # BLOCK_M != BLOCK_N, T a multiple of neither: the causal and full loops' unmasked/masked split, every row's
    # output and every gradient; with packed documents too (their ranges come from tile_ranges)
    monkeypatch.setattr(attention_module, "config", lambda *a, **k: (*blocks, 4, 1))
    g = torch.Generator().manual_seed(sum(blocks))
    q, k, v, do = (torch.randn(1, h, 231, 32, generator=g) for h in (2, 1, 1, 2))
    for causal, docs in ((True, None), (False, None), (False, sorted_docs(1, 231, n_docs=4))):
        compare_attention(q, k, v, do, causal, docs, f" (blocks={blocks}, causal={causal}, docs={docs is not None})")


def test_document_ids_beyond_int32_do_not_collide():
    # ids equal modulo 2^32 are different documents: narrowed naively they would share attention
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 150, 32, generator=g) for _ in range(4))
    ids = torch.tensor([[0] * 70 + [2**32] * 50 + [-(2**40)] * 30])  # int64; the last run's id is the smallest
    compare_attention(q, k, v, do, True, ids)
    compare_attention(q, k, v, do, False, ids)


def test_attention_gradients_are_deterministic():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 100, 64, generator=g) for h in (4, 1, 1))
    grads = []
    for _ in range(2):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*xs, doc_ids=sorted_docs(1, 100), impl="triton").sum().backward()
        grads.append([x.grad for x in xs])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


NORM_SHAPES = [(1, 1023), (3, 7, 256), (2, 4097), (2, 16384)]


NORM_CASES = [
    (shape, kind, residual, dtype)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for shape in (NORM_SHAPES if dtype != torch.bfloat16 else [(2, 4097)])  # bf16 (the shim) on one shape
    for kind in ("layer", "rms")
    for residual in (False, True)
]


@pytest.mark.parametrize("shape, kind, residual, dtype", NORM_CASES)
def test_norms_match_float64(shape, kind, residual, dtype):
    g = torch.Generator().manual_seed(1)
    N = shape[-1]
    x, r, dy, dh = (torch.randn(*shape, generator=g).to(dtype) for _ in range(4))
    w, b = (1 + 0.1 * torch.randn(N, generator=g)).to(dtype), (0.1 * torch.randn(N, generator=g)).to(dtype)
    fn, ref_fn = (layer_norm, layer_norm_ref) if kind == "layer" else (rms_norm, rms_norm_ref)
    extra = (b,) if kind == "layer" else ()

    def run(f, tensors, **kw):
        out = f(tensors[0], tensors[1], *tensors[2 : 2 + len(extra)], residual=tensors[-1] if residual else None, **kw)
        y, h = out if residual else (out, None)
        loss = (y.double() * dy.double()).sum() + ((h.double() * dh.double()).sum() if residual else 0)
        loss.backward()
        return y, h

    inputs = [x, w, *extra, r]
    xs = [t.clone().requires_grad_() for t in inputs]
    refs = [t.double().requires_grad_() for t in inputs]
    with dtype_context(dtype):
        y, h = run(fn, xs, impl="triton")
    y_ref, h_ref = run(ref_fn, refs)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, "output")
    if residual:
        assert_close(h, h_ref, dtype, "residual out")
    for name, a, e in zip(("dx", "dweight", "dbias", "dresidual"), xs, refs, strict=False):
        if a.grad is not None and (name != "dresidual" or residual):
            assert_close(a.grad, e.grad, dtype, name)


def test_custom_ops_pass_opcheck():
    q, k, v = (torch.randn(1, h, 33, 32) for h in (2, 1, 1))
    torch.library.opcheck(
        _attention_op, (q, k, v, sorted_docs(1, 33), True, 0.17), test_utils=("test_schema", "test_faketensor")
    )
    torch.library.opcheck(
        _norm_op,
        (torch.randn(5, 40), torch.randn(40), torch.randn(40), torch.randn(5, 40), 1e-5, False),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_kernels_compile_with_torch_compile():
    def block(x, w, q, k, v):
        y, h = layer_norm(x, w, residual=x, impl="triton")
        return y.sum() + h.sum() + attention(q, k, v, impl="triton").sum()

    args = (torch.randn(4, 32), torch.randn(32), *(torch.randn(1, 2, 16, 16) for _ in range(3)))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(*args), block(*args), atol=1e-5)


def test_dispatch_is_explicit_and_logged(caplog):
    q = torch.randn(1, 2, 8, 256)
    with pytest.raises(ValueError, match="attention: impl='triton' cannot run: head dim 256 is above 128"):
        attention(q, q, q, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of auto, triton, torch"):
        attention(q, q, q, impl="cuda")
    with caplog.at_level(logging.INFO, logger="llm.kernels"):
        dispatch._logged.clear()
        x = torch.randn(4, 8)
        for _ in range(3):
            layer_norm(x, torch.ones(8))  # CPU tensors: "auto" takes the reference
    assert [r.getMessage() for r in caplog.records] == ["layer_norm: using the torch implementation (impl=auto)"]
    with pytest.raises(ValueError, match="weight shape"):
        layer_norm(x, torch.ones(7), impl="triton")


def test_model_gives_the_same_loss_and_gradients_with_either_implementation():
    from dataclasses import replace

    from llm.config.schema import ModelConfig
    from llm.model.gpt import GPT

    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64, pos="rope")
    results = []
    for kernels_impl in ("torch", "triton"):
        for norm in ("layernorm", "rmsnorm"):
            torch.manual_seed(0)
            model = GPT(replace(cfg, kernels=kernels_impl, norm=norm))
            x = torch.randint(4, 97, (2, 41))
            docs = sorted_docs(2, 40)
            loss = model(x[:, :-1], x[:, 1:], doc_ids=docs)
            loss.backward()
            results.append((norm, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    for (norm, loss_ref, grads_ref), (_, loss, grads) in zip(results[:2], results[2:], strict=True):
        assert abs(loss.item() - loss_ref.item()) < 1e-5, norm
        for name, g in grads.items():
            assert (g - grads_ref[name]).abs().max() <= 1e-5 * max(1.0, grads_ref[name].abs().max().item()), name


def test_attention_accepts_strided_inputs():
    # (B, T, H, D) memory viewed as (B, H, T, D), as the model passes them, with k and v in different layouts
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 50, 4, 32, generator=g).transpose(1, 2)
    k = torch.randn(2, 50, 2, 32, generator=g).transpose(1, 2).contiguous()
    v = torch.randn(2, 2, 64, 32, generator=g)[:, :, 7:57]
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*xs, doc_ids=sorted_docs(2, 50), impl="triton")
    do = torch.randn(out.shape, generator=g).transpose(2, 3).contiguous().transpose(2, 3)  # strided dO too
    out.backward(do)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*refs, doc_ids=sorted_docs(2, 50))
    ref.backward(do.double())
    assert_close(out, ref, torch.float32, "output")
    for name, x, r in zip(("dq", "dk", "dv"), xs, refs, strict=True):
        assert_close(x.grad, r.grad, torch.float32, name)


def test_rows_whose_offsets_pass_int32_are_read_right():
    # A (B, H, T, D) view whose time stride is 2**30 elements: row 2 starts at 2**31, past int32. The storage
    # is 4 GB of address space, of which the test touches a few pages; the kernel gets a (B, H, T, D) copy.
    base = torch.empty(2 * 2**30 + 64, dtype=torch.float16)
    g = torch.Generator().manual_seed(5)
    views = [base.as_strided((1, 1, 3, 16), (0, 0, 2**30, 1), offset) for offset in (0, 16, 32)]
    for x in views:
        x.copy_(torch.randn(1, 1, 3, 16, generator=g))
    q, k, v = (x.requires_grad_() for x in views)
    do = torch.randn(1, 1, 3, 16, generator=g).half()
    out = attention(q, k, v, impl="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    refs = [x.detach().double().requires_grad_() for x in views]
    ref = attention_ref(*refs)
    ref_grads = torch.autograd.grad(ref, refs, do.double())
    assert_close(out, ref, torch.float16, "output")
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, torch.float16, name)


def test_sequences_beyond_the_int32_offsets_are_refused():
    q = torch.empty(1, 1, 2**25, 64, device="meta")
    with pytest.raises(ValueError, match=r"T x D = 33554432 x 64 is beyond the kernels' int32 row offsets"):
        attention(q, q, q, impl="triton")


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
@pytest.mark.parametrize("scale", [-0.25, 0.0, 1e-46, float("inf"), float("nan")])
def test_a_scale_that_is_not_a_positive_fp32_is_refused(impl, scale):
    # the kernels scale a row's max by scale * log2(e) in fp32: 1e-46 would round to 0 and turn masked scores
    # into -inf * 0 = NaN
    q = torch.randn(1, 2, 40, 16)
    with pytest.raises(ValueError, match=f"softmax_scale must be positive and within fp32 range, got {scale}"):
        attention(q, q, q, softmax_scale=scale, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_what_the_document_ids_give_is_computed_once_per_step(monkeypatch, impl):
    # a 3-layer model's forward and backward with the step's document ids: the dense mask (reference) once, the
    # int32 ids once and the tile ranges once per distinct tiling (here 64 x 64 blocks: queries outer for the
    # forward and dQ, keys outer for dK/dV), not once per layer and kernel; the same
    # tensor changed in place, or a new one, is derived afresh (and the loss follows it)
    from dataclasses import replace

    from llm.config.schema import ModelConfig
    from llm.model.gpt import GPT

    attn = attention_module
    calls = {"mask": 0, "ranges": 0, "int32": 0}
    for name, key in (("attention_mask", "mask"), ("tile_ranges", "ranges"), ("_int32_ids", "int32")):
        original = getattr(attn, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(attn, name, counted)
    cfg = ModelConfig(vocab_size=97, n_layer=3, n_head=2, n_embd=32, max_seq_len=64, kernels=impl)
    torch.manual_seed(0)
    model = GPT(replace(cfg))
    x = torch.randint(4, 97, (2, 41))
    docs = sorted_docs(2, 40).to(torch.int64)

    def step():
        loss = model(x[:, :-1], x[:, 1:], doc_ids=docs)
        loss.backward()
        return loss.item()

    first = step()
    expected = {"mask": 1, "ranges": 0, "int32": 0} if impl == "torch" else {"mask": 0, "ranges": 2, "int32": 1}
    assert calls == expected
    assert step() == first and calls == expected  # the same ids again: nothing derived anew
    docs[:, 20:] += 5  # in place: a document boundary moves
    changed = step()
    assert calls == {k: 2 * v for k, v in expected.items()} and changed != first
    docs = sorted_docs(2, 40, seed=1).to(torch.int64)
    step()
    assert calls == {k: 3 * v for k, v in expected.items()}
