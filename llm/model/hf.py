"""HuggingFace transformers models to and from ours, exactly or not at all.

Two families map one to one (anything else is refused, naming the option):
- GPT-2 (layernorm, learned positions, tanh-GELU MLP, multi-head) <-> `GPT2LMHeadModel`. Its attention and
  MLP matrices are `Conv1D` (stored transposed). A model without biases is exported with zero biases.
- Llama (rmsnorm, RoPE, SwiGLU; grouped-query attention) <-> `LlamaForCausalLM`; our RoPE rotates the two
  halves of each head, as transformers' does, so the projections map without any permutation.
Only the real vocabulary rows are exported (the padding rows are never predicted nor fed). The tokenizer is
our SentencePiece model rebuilt as a `tokenizers` BPE (tokenizer.json, what `AutoTokenizer` loads) with the
same ids on any text; `tokenizer.model` travels beside it so that an export can be imported again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from llm.config.schema import RUNTIME_MODEL_FIELDS, ModelConfig
from llm.data.examples import CHAT_TEMPLATE
from llm.data.tokenizer import Tokenizer
from llm.model.gpt import mlp_hidden, padded_vocab


class ExportError(ValueError):
    """A model or directory that cannot be converted exactly; the message names the option at fault."""


GPT2 = {"norm": "layernorm", "pos": "learned", "mlp": "gelu"}
LLAMA = {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu"}


def family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama', or ExportError naming the options that fit neither."""
    ours = {k: getattr(cfg, k) for k in GPT2}
    for name, wanted in (("gpt2", GPT2), ("llama", LLAMA)):
        if ours == wanted:
            if name == "gpt2" and (cfg.n_kv_head or cfg.n_head) != cfg.n_head:
                raise ExportError(
                    f"model.n_kv_head={cfg.n_kv_head} (grouped-query attention) has no GPT2LMHeadModel equivalent"
                )
            return name
    have = ", ".join(f"model.{k}={v}" for k, v in ours.items())
    raise ExportError(
        f"{have} is neither the GPT-2 family (layernorm, learned, gelu -> GPT2LMHeadModel) nor the Llama family "
        "(rmsnorm, rope, swiglu -> LlamaForCausalLM); only those two can be exported exactly"
    )


# ---------------------------------------------------------------------------------------------------- weights
def _gpt2_names(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our name, transformers name, transposed) for every GPT-2 tensor."""
    names = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False)]
    ours = {
        "norm1": "ln_1",
        "attn.qkv": "attn.c_attn",
        "attn.proj": "attn.c_proj",
        "norm2": "ln_2",
        "mlp.up": "mlp.c_fc",
        "mlp.down": "mlp.c_proj",
    }
    for i in range(cfg.n_layer):
        for a, b in ours.items():
            conv = not a.startswith("norm")
            names += [(f"blocks.{i}.{a}.weight", f"transformer.h.{i}.{b}.weight", conv)]
            names += [(f"blocks.{i}.{a}.bias", f"transformer.h.{i}.{b}.bias", False)]
    names += [("norm_f.weight", "transformer.ln_f.weight", False), ("norm_f.bias", "transformer.ln_f.bias", False)]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def _llama_names(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    names = [("wte.weight", "model.embed_tokens.weight", False)]
    for i in range(cfg.n_layer):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        names += [(p + "norm1.weight", q + "input_layernorm.weight", False)]
        names += [(p + "norm2.weight", q + "post_attention_layernorm.weight", False)]
        linear = {"attn.proj": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj"}
        linear["mlp.down"] = "mlp.down_proj"
        for a, b in linear.items():
            names += [(f"{p}{a}.{w}", f"{q}{b}.{w}", False) for w in ("weight", "bias")[: 1 + cfg.bias]]
    names.append(("norm_f.weight", "model.norm.weight", False))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight", False))
    return names


def _split_qkv(cfg: ModelConfig) -> list[int]:
    d = cfg.n_embd // cfg.n_head
    kv = cfg.n_kv_head or cfg.n_head
    return [cfg.n_head * d, kv * d, kv * d]


def to_hf_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype=torch.float32) -> dict:
    """Our state dict -> transformers' names and layouts, consuming `weights` as it goes (one tensor at a time
    is ever duplicated). The vocabulary padding rows are dropped."""
    fam = family(cfg)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        t = weights.pop(name, None)
        if t is None:
            if name.endswith(".bias") and fam == "gpt2" and not cfg.bias:  # GPT-2 always has biases: exactly 0
                rows = {"attn.qkv": 3 * cfg.n_embd, "mlp.up": mlp_hidden(cfg)}
                return torch.zeros(next((n for k, n in rows.items() if f".{k}." in name), cfg.n_embd))
            raise ExportError(f"the checkpoint has no tensor {name}; it does not fit model settings it records")
        return t

    if fam == "gpt2":
        for ours, theirs, transposed in _gpt2_names(cfg):
            t = take(ours)
            out[theirs] = (t.t() if transposed else t).to(dtype).contiguous()
    else:
        for ours, theirs, _ in _llama_names(cfg):
            out[theirs] = take(ours).to(dtype).contiguous()
        for i in range(cfg.n_layer):
            q = f"model.layers.{i}.self_attn."
            parts = ["weight", "bias"][: 1 + cfg.bias]
            for part in parts:
                pieces = take(f"blocks.{i}.attn.qkv.{part}").split(_split_qkv(cfg))
                for proj, t in zip(("q_proj", "k_proj", "v_proj"), pieces, strict=True):
                    out[f"{q}{proj}.{part}"] = t.to(dtype).contiguous()
    for name in [k for k in out if k.endswith(("wte.weight", "embed_tokens.weight")) or k == "lm_head.weight"]:
        out[name] = out[name][: cfg.vocab_size].contiguous()
    weights.pop("lm_head.weight", None)  # tied: the same tensor as the embedding
    return out


def from_hf_weights(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names and layouts -> our state dict (vocabulary padded with zero rows)."""
    fam = family(cfg)
    ours: dict[str, torch.Tensor] = {}
    names = _gpt2_names(cfg) if fam == "gpt2" else _llama_names(cfg)

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ExportError(f"the transformers checkpoint has no tensor {name}")
        return tensors.pop(name).float()

    for mine, theirs, transposed in names:
        t = take(theirs)
        ours[mine] = t.t().contiguous() if transposed else t
    if fam == "llama":
        for i in range(cfg.n_layer):
            q = f"model.layers.{i}.self_attn."
            for part in ("weight", "bias")[: 1 + cfg.bias]:
                ours[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(
                    [take(f"{q}{p}.{part}") for p in ("q_proj", "k_proj", "v_proj")]
                )
    rows = padded_vocab(cfg)
    for name in ("wte.weight", "lm_head.weight"):
        if name in ours and ours[name].shape[0] < rows:
            pad = ours[name].new_zeros(rows - ours[name].shape[0], cfg.n_embd)
            ours[name] = torch.cat([ours[name], pad])
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["wte.weight"]
    leftover = [k for k in tensors if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"]
    if leftover:
        raise ExportError(f"the transformers checkpoint has tensors this model has no place for: {leftover[:3]}")
    return ours


# ---------------------------------------------------------------------------------------------------- configs
def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: str) -> dict:
    common = {
        "vocab_size": cfg.vocab_size,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": dtype,
    }
    if family(cfg) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_positions": cfg.max_seq_len,
            "n_inner": mlp_hidden(cfg),
            "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",  # as our MLP computes it
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.n_embd,
        "intermediate_size": mlp_hidden(cfg),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # where transformers 4.x reads it
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": 0.0,
        **common,
    }


def model_config_of(hf: dict) -> ModelConfig:
    """Our ModelConfig for a transformers config.json, or ExportError naming what we cannot represent."""
    kind = hf.get("model_type")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ExportError(f"config.json: {what} has no exact equivalent in our model")

    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        need(act in ("gelu_new", "gelu_pytorch_tanh", "gelu"), f"activation_function={act!r}")
        need(not hf.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx=true")
        need(hf.get("scale_attn_weights", True), "scale_attn_weights=false")
        n_embd = hf.get("n_embd", 768)
        return ModelConfig(
            name="hf-gpt2",
            vocab_size=hf["vocab_size"],
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            max_seq_len=hf.get("n_positions", 1024),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp_hidden=hf.get("n_inner") or 4 * n_embd,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            gelu="exact" if act == "gelu" else "tanh",
            **GPT2,
        )
    if kind == "llama":
        rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
        need(rope.get("rope_type", "default") == "default", f"rope_parameters.rope_type={rope.get('rope_type')!r}")
        need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}")
        attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        need(attn_bias == mlp_bias, f"attention_bias={attn_bias} with mlp_bias={mlp_bias}")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        need(hf.get("head_dim") in (None, hidden // heads), f"head_dim={hf.get('head_dim')}")
        return ModelConfig(
            name="hf-llama",
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=heads,
            n_kv_head=hf.get("num_key_value_heads") or heads,
            n_embd=hidden,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            mlp_hidden=hf["intermediate_size"],
            tie_embeddings=hf.get("tie_word_embeddings", False),
            bias=attn_bias,
            **LLAMA,
        )
    raise ExportError(f"config.json: model_type={kind!r}; only gpt2 and llama models can be imported")


# -------------------------------------------------------------------------------------------------- tokenizer
def hf_tokenizer(tok: Tokenizer):
    """Our SentencePiece BPE as a `tokenizers.Tokenizer` giving the same ids: spaces become "▁" (no other
    normalisation, no dummy prefix), BPE merges ranked by SentencePiece's piece scores with byte fallback, and
    "\\n" (a user-defined symbol) split off before the merges, as SentencePiece does."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    proto = pb.ModelProto()
    proto.ParseFromString((tok.directory / "tokenizer.model").read_bytes())
    kind = pb.ModelProto.SentencePiece
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise ExportError(
            f"the tokenizer is a SentencePiece {tok.meta.get('model_type', 'non-BPE')} model; only BPE tokenizers "
            "are exported (retrain the tokenizer with --model-type bpe)"
        )
    norm = proto.normalizer_spec
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or norm.name not in ("identity", ""):
        raise ExportError("the tokenizer normalises its input (dummy prefix, whitespace or NFKC rules); not exported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece for p in proto.pieces if p.type == kind.NORMAL}
    merges = []
    for piece in sorted(normal, key=lambda s: -proto.pieces[vocab[s]].score):
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Replace(" ", "▁")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [p.piece for p in proto.pieces if p.type in (kind.CONTROL, kind.UNKNOWN)]
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    user = [p.piece for p in proto.pieces if p.type == kind.USER_DEFINED]
    hf.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])
    return hf


def tokenizer_config(tok: Tokenizer, max_len: int) -> dict:
    piece = tok.sp.id_to_piece
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tok.bos_id),
        "eos_token": piece(tok.eos_id),
        "unk_token": piece(tok.sp.unk_id()),
        "pad_token": piece(tok.pad_id),
        "model_max_length": max_len,
        "split_special_tokens": True,  # "<s>" in text is text, as it is to SentencePiece
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,  # fine-tuning's "<|role|>\\n" rendering (llm/data/examples.py)
    }


# ------------------------------------------------------------------------------------------------ directories
def write_hf(cfg: ModelConfig, weights: dict, tok: Tokenizer, output: Path, dtype: str = "float32") -> dict:
    """Write a transformers model directory; `weights` (ours) is consumed. Returns what was written."""
    from safetensors.torch import save_file

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size is {cfg.vocab_size}")
    config = hf_config(cfg, tok, dtype)
    tensors = to_hf_weights(cfg, weights, torch_dtype)
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    (output / "model.safetensors").chmod(0o644)
    n_params = sum(t.numel() for t in tensors.values())
    del tensors
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (output / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}, indent=2)
    )
    hf_tokenizer(tok).save(str(output / "tokenizer.json"))
    (output / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, cfg.max_seq_len), indent=2) + "\n")
    (output / "tokenizer.model").write_bytes((tok.directory / "tokenizer.model").read_bytes())
    (output / "llm_model.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return {"architecture": config["architectures"][0], "parameters": n_params, "dtype": dtype}


def read_hf(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """(our model settings, our state dict, our tokenizer) from a transformers directory with safetensors weights
    and a SentencePiece tokenizer.model."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise ExportError(f"{d} has no config.json: name a transformers model directory")
    cfg = model_config_of(json.loads((d / "config.json").read_text()))
    keep = {}
    if (d / "llm_model.json").is_file():  # our own export: keep the settings transformers has no field for
        saved = json.loads((d / "llm_model.json").read_text())
        keep = {k: saved[k] for k in ("name", "pad_vocab_to", "doc_mask", *RUNTIME_MODEL_FIELDS) if k in saved}
        keep["bias"] = saved["bias"]
        if mlp_hidden(ModelConfig(**saved)) == cfg.mlp_hidden:  # the size as the run wrote it (e.g. null)
            keep |= {k: saved[k] for k in ("mlp_hidden", "mlp_multiple_of")}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in keep.items() if k != "bias"})
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{d} has no *.safetensors weights (PyTorch .bin files are not read: convert them first)")
    if not (d / "tokenizer.model").is_file():
        raise ExportError(
            f"{d} has no tokenizer.model: only models with a SentencePiece tokenizer can be imported "
            "(a byte-level BPE such as GPT-2's has no SentencePiece equivalent)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    weights = from_hf_weights(cfg, tensors)
    biases = [k for k in weights if k.endswith(".bias")]
    if family(cfg) == "gpt2" and keep.get("bias") is False and not any(weights[k].any() for k in biases):
        cfg = dataclasses.replace(cfg, bias=False)  # our bias-free GPT-2, exported with zero biases
        for k in biases:
            del weights[k]
    return cfg, weights, Tokenizer.from_model_file(d / "tokenizer.model")
