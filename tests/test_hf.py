"""Export to and import from HuggingFace transformers (llm/model/hf.py, llm/export.py): transformers' own classes load
the exported directory and give our logits; its tokenizer gives our ids; import gives back the same model."""

import json
import subprocess
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import HF_LOGITS_ATOL
from launch import ROOT, environment

from llm.config.schema import ModelConfig
from llm.data.examples import sft_tokens
from llm.data.tokenizer import Tokenizer, train_tokenizer
from llm.model.gpt import GPT
from llm.model.hf import ExportError, family, model_config_of, write_hf
from llm.store.weights import load_model
from llm.train import train

transformers = pytest.importorskip("transformers")

GPT2_TIED = ModelConfig(vocab_size=600, n_layer=2, n_head=4, n_embd=32, max_seq_len=64)  # padded to 640 rows
GPT2_NO_BIAS = replace(GPT2_TIED, bias=False, tie_embeddings=False, mlp_hidden=48)
LLAMA_GQA = replace(GPT2_TIED, norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False)
LLAMA_BIAS_TIED = replace(LLAMA_GQA, bias=True, tie_embeddings=True, rope_theta=500.0, norm_eps=1e-6)
GPT2_EXACT_GELU = replace(GPT2_TIED, gelu="exact")
MODELS = {
    "gpt2": GPT2_TIED,
    "gpt2-nobias-untied": GPT2_NO_BIAS,
    "gpt2-exact-gelu": GPT2_EXACT_GELU,
    "llama-gqa": LLAMA_GQA,
    "llama-bias": LLAMA_BIAS_TIED,
}
# code, whitespace runs, tabs, CRLF, digits, non-ASCII (accents, CJK, Greek, emoji: byte fallback), and the
# special tokens' spellings, which are plain text to both tokenizers
SAMPLE = (
    "def parse(s: str) -> int:\n\t\treturn  int(s)   +  1234567890  # naïve 日本語 émigré Ωμέγα 🎉\r\n"
    "        if x:\n\n\n    pass\n  <s> </s> <unk> <pad> ＡＢＣ \u00a0 end  "
)


def random_model(cfg: ModelConfig) -> GPT:
    """Every parameter random (biases and norm weights too), so that a misplaced tensor cannot go unseen."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def export(model: GPT, tok: Tokenizer, out: Path) -> None:
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    write_hf(model.cfg, weights, tok, out)


@pytest.mark.parametrize("name", MODELS)
def test_transformers_gives_our_logits_and_import_gives_back_our_model(name, tokenizer_dir, tmp_path):
    cfg, tok = MODELS[name], Tokenizer.load(tokenizer_dir)
    model = random_model(cfg)
    export(model, tok, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = "GPT2LMHeadModel" if family(cfg) == "gpt2" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected and hf.config.vocab_size == 600
    ids = torch.randint(0, 600, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        assert ours.shape == theirs.shape == (3, 64, 600)
        assert (ours - theirs).abs().max().item() <= HF_LOGITS_ATOL
        assert ours.abs().max() > 1  # not a trivially small output
        _, back, tok2 = load_model(f"hf:{tmp_path}")
        assert back.cfg == cfg and tok2.sha256 == tok.sha256
        assert torch.equal(back(ids), ours)  # the round trip is exact


def test_the_exported_tokenizer_gives_our_ids_on_code_whitespace_digits_and_non_ascii(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    export(random_model(GPT2_TIED), tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [SAMPLE, " leading space", "", "\n", *(p.read_text() for p in sorted((stdlib / "json").glob("*.py")))]
    texts += [(stdlib / "textwrap.py").read_text(), (stdlib / "difflib.py").read_text()[:20000]]
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text[:80]
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    # the chat template renders a conversation as fine-tuning does: the same ids, without the final EOS
    messages = [
        {"role": "system", "content": "Answer in Python."},
        {"role": "user", "content": "Reverse  a list\n\tplease <s>"},
        {"role": "assistant", "content": "xs[::-1]"},
    ]
    ids, _ = sft_tokens({"messages": messages}, tok, "chat")
    assert hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False) == ids[:-1]
    prompt = hf_tok.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt == ids[: len(prompt)] and tok.decode(prompt).endswith("<s>\n<|assistant|>\n")


def test_what_cannot_be_represented_exactly_is_refused_naming_the_option(tokenizer_dir, corpus_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    for cfg, message in [
        (replace(GPT2_TIED, pos="rope"), "model.pos=rope"),
        (replace(LLAMA_GQA, mlp="gelu"), "model.mlp=gelu"),
        (replace(GPT2_TIED, n_kv_head=2), "model.n_kv_head=2"),
    ]:
        with pytest.raises(ExportError, match=message):
            family(cfg)
    hf = json.loads(json.dumps({"model_type": "gpt2", "vocab_size": 10, "activation_function": "relu"}))
    with pytest.raises(ExportError, match="activation_function='relu'"):
        model_config_of(hf)
    with pytest.raises(ExportError, match="rope_type='linear'"):
        model_config_of(
            {
                "model_type": "llama",
                "vocab_size": 10,
                "hidden_size": 8,
                "num_attention_heads": 2,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
            }
        )
    with pytest.raises(ExportError, match="model_type='bert'"):
        model_config_of({"model_type": "bert"})
    unigram = train_tokenizer([str(corpus_dir)], tmp_path / "uni", vocab_size=320, model_type="unigram")
    with pytest.raises(ExportError, match="only BPE tokenizers"):
        write_hf(GPT2_TIED, random_model(GPT2_TIED).state_dict(), unigram, tmp_path / "out")
    export(random_model(GPT2_TIED), tok, tmp_path / "ok")
    (tmp_path / "ok" / "tokenizer.model").unlink()
    with pytest.raises(ExportError, match="no tokenizer.model"):
        load_model(f"hf:{tmp_path / 'ok'}")


def test_the_command_line_exports_a_run_and_refuses_bad_input_in_one_line(cfg_factory, tmp_path):
    out = train(cfg_factory("exp", train={"max_steps": 2, "ckpt_every_steps": 2, "eval_every": 0}))
    cmd = [sys.executable, "-m", "llm.export", "--checkpoint", out["run_dir"], "--output", str(tmp_path / "hf")]
    run = lambda c: subprocess.run(c, capture_output=True, text=True, cwd=ROOT, env=environment(), timeout=300)
    r = run(cmd)
    assert r.returncode == 0 and r.stdout.startswith(f"wrote {tmp_path / 'hf'}: GPT2LMHeadModel"), r.stderr[-2000:]
    _, model, tok = load_model(out["run_dir"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode(SAMPLE)[:64]])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= HF_LOGITS_ATOL
    r = run(cmd)  # the output is not empty now
    assert r.returncode == 2 and "is not an empty directory" in r.stderr and r.stderr.count("\n") == 1
