"""The GPT model: preset sizes, the FLOP count, architecture options, document masking, learning."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from llm.config.schema import LoraConfig, ModelConfig
from llm.model.classifier import Classifier
from llm.model.gpt import GPT, padded_vocab
from llm.model.lora import add_lora

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
SMALL = ModelConfig(vocab_size=101, n_layer=2, n_head=4, n_embd=32, max_seq_len=64)


def preset(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((CONF / f"{name}.yaml").read_text()))


@pytest.mark.parametrize(
    "name, params",
    [
        ("gpt2-124m", 124_439_808),  # GPT-2 small, tied embeddings
        ("gpt2-350m", 354_823_168),
        ("gpt2-774m", 774_030_080),
        ("llama-1b", 1_235_814_400),  # Llama 3.2 1B
        ("llama-7b", 6_738_415_616),  # Llama 2 7B
    ],
)
def test_preset_parameter_counts(name, params):
    with torch.device("meta"):
        model = GPT(preset(name))
    assert model.num_params() == params


def test_vocab_is_padded_and_padding_is_never_predicted():
    cfg = preset("gpt2-124m")
    assert padded_vocab(cfg) == 50304
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.wte.weight.shape == (50304, 768) and model.lm_head.weight is model.wte.weight
    small = GPT(SMALL)
    assert small.wte.weight.shape[0] == 128
    assert small(torch.randint(0, 101, (2, 5))).shape == (2, 5, 101)


def test_flops_per_token_is_the_palm_count():
    with torch.device("meta"):
        model = GPT(preset("gpt2-124m"))
    n = 124_439_808 - 1024 * 768  # matmul parameters: all but the position embeddings (the tied wte is the head)
    assert model.num_matmul_params() == n
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    with torch.device("meta"):
        llama = GPT(preset("llama-7b"))
    n7 = 6_738_415_616 - 32000 * 4096  # untied: the input embedding is a lookup, the head a matmul
    assert llama.flops_per_token(4096) == 6 * n7 + 12 * 32 * 32 * 128 * 4096
    # LoRA: the frozen weights cost their forward and their input's gradient (4 per parameter), the adapters 6;
    # a classifier leaves the LM head out
    attention = 12 * 12 * 12 * 64 * 1024
    with torch.device("meta"):
        lora = add_lora(GPT(preset("gpt2-124m")), LoraConfig(rank=8, alpha=16.0, targets=["qkv", "proj"]))
        classifier = Classifier(GPT(preset("gpt2-124m")), n_classes=5)
    adapters = 12 * 8 * ((768 + 3 * 768) + (768 + 768))
    assert lora.flops_per_token(1024) == 4 * n + 6 * adapters + attention
    assert classifier.flops_per_token(1024) == 6 * (n - 50257 * 768) + attention


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(replace(SMALL, n_embd=256, n_layer=8, vocab_size=1000))
    std = 0.02 / (2 * 8) ** 0.5
    assert abs(model.blocks[0].attn.proj.weight.std().item() - std) < 0.1 * std
    assert abs(model.blocks[0].mlp.down.weight.std().item() - std) < 0.1 * std
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert model.blocks[0].attn.qkv.bias.abs().max() == 0


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False, "n_kv_head": 2, "tie_embeddings": False},
        {"n_kv_head": 1, "pos": "rope"},
        {"dropout": 0.1},
    ],
)
def test_architecture_options_overfit_one_batch(options):
    torch.manual_seed(0)
    model = GPT(replace(SMALL, **options))
    x = torch.randint(0, 101, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert first > 4.0 and model(x[:, :-1], x[:, 1:]).item() < 0.1


def test_document_mask_isolates_documents():
    torch.manual_seed(0)
    model = GPT(replace(SMALL, pos="rope")).eval()
    x = torch.randint(4, 101, (1, 20))
    doc = torch.tensor([[0] * 8 + [1] * 12])
    y = x.clone()
    y[0, :8] = torch.randint(4, 101, (8,))  # change only the first document
    a, b = model(x, doc_ids=doc), model(y, doc_ids=doc)
    assert torch.allclose(a[0, 8:], b[0, 8:], atol=1e-6)  # the second document does not see the first
    assert not torch.allclose(a[0, :8], b[0, :8])
    unmasked = GPT(replace(SMALL, pos="rope", doc_mask=False)).eval()
    unmasked.load_state_dict(model.state_dict())
    assert not torch.allclose(unmasked(x, doc_ids=doc)[0, 8:], unmasked(y, doc_ids=doc)[0, 8:])


def test_rope_and_learned_positions_are_causal():
    for pos in ("learned", "rope"):
        torch.manual_seed(0)
        model = GPT(replace(SMALL, pos=pos)).eval()
        x = torch.randint(0, 101, (1, 16))
        y = x.clone()
        y[0, 10:] = (y[0, 10:] + 1) % 101
        assert torch.allclose(model(x)[0, :10], model(y)[0, :10], atol=1e-6)


def test_generate_extends_the_prompt():
    model = GPT(SMALL).eval()
    g = torch.Generator().manual_seed(0)
    out = model.generate(torch.tensor([[5, 6]]), 10, generator=g)
    assert out.shape == (1, 12) and out[0, :2].tolist() == [5, 6] and int(out.max()) < 101


def test_the_gelu_is_tanh_by_default_and_exact_on_request():
    cfg = ModelConfig(vocab_size=100, n_layer=1, n_head=2, n_embd=16, max_seq_len=8)
    x = torch.randn(3, 16)
    for name, approximate in (("tanh", "tanh"), ("exact", "none")):
        mlp = GPT(replace(cfg, gelu=name)).blocks[0].mlp
        want = mlp.down(torch.nn.functional.gelu(mlp.up(x), approximate=approximate))
        assert torch.equal(mlp(x), want), name
    assert ModelConfig().gelu == "tanh"
