"""A GPT-style decoder: embeddings -> N x Block(norm, attention, norm, MLP) -> norm -> head.

Options cover GPT-2 (LayerNorm, learned positions, GELU MLP, biases, tied embeddings) and Llama (RMSNorm,
RoPE, SwiGLU, no biases, grouped-query attention). Attention and norms go through `llm.kernels`, which runs
the fused Triton kernels on CUDA and the PyTorch references elsewhere. This file holds only the math.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.config.schema import ModelConfig
from llm.data.examples import IGNORE
from llm.kernels.attention import attention
from llm.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from llm.kernels.norm import layer_norm, rms_norm
from llm.model.sequence import SequenceParallel, group_mean_loss, spread_kv, to_heads, to_sequence


def padded_vocab(cfg: ModelConfig) -> int:
    return math.ceil(cfg.vocab_size / cfg.pad_vocab_to) * cfg.pad_vocab_to


def mlp_hidden(cfg: ModelConfig) -> int:
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    if cfg.mlp == "gelu":
        return 4 * cfg.n_embd
    hidden = int(2 * 4 * cfg.n_embd / 3)  # SwiGLU keeps the parameter count of a 4x GELU MLP (Llama)
    return cfg.mlp_multiple_of * math.ceil(hidden / cfg.mlp_multiple_of)


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps, self.impl = cfg.norm, cfg.norm_eps, cfg.kernels
        self.weight = nn.Parameter(torch.ones(cfg.n_embd))
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd)) if cfg.bias and cfg.norm == "layernorm" else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with `residual` the fused pair (norm(x + residual), x + residual)."""
        if residual is not None and x.dtype != residual.dtype:  # autocast: a bf16 branch joins the fp32 stream
            x = x.to(residual.dtype)
        if self.kind == "rmsnorm":
            return rms_norm(x, self.weight, self.eps, residual=residual, impl=self.impl)
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual, impl=self.impl)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim // 2) for rotary position embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels; x (B, H, T, D), cos/sin (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled at init
        self.dropout = nn.Dropout(cfg.dropout)
        self.impl = cfg.kernels
        self.sp: SequenceParallel | None = None  # set by GPT.sequence_parallel

    def forward(self, x, doc_ids=None, rope=None, cache=None):
        """With `cache` (a layer of llm.model.generation.KVCache) the new keys and values are appended to it and the
        queries attend to everything cached so far, under its mask."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            y = cache.attend(q, k, v)
        elif self.sp is not None:  # T is this rank's part: attend over the whole sequence for this rank's heads
            q, k, v = (
                to_heads(q, self.sp),
                to_heads(spread_kv(k, self.sp), self.sp),
                to_heads(spread_kv(v, self.sp), self.sp),
            )
            y = to_sequence(attention(q, k, v, causal=True, doc_ids=doc_ids, impl=self.impl), self.sp)
        else:
            y = attention(q, k, v, causal=True, doc_ids=doc_ids, impl=self.impl)  # (B, Hq, T, D)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.swiglu = cfg.mlp == "swiglu"
        self.gelu = "tanh" if cfg.gelu == "tanh" else "none"  # F.gelu's name for the exact (erf) form
        self.up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias) if self.swiglu else None
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.down.residual = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x), approximate=self.gelu)
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm block. The residual stream travels beside the branch outputs so that each norm also does the
    preceding residual add in one fused pass: (x, res) -> (mlp output, res + attn output); the caller adds the
    last branch output into the stream at the next norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = Norm(cfg), Attention(cfg), Norm(cfg), MLP(cfg)

    def forward(self, x, residual=None, doc_ids=None, rope=None, cache=None):
        h, residual = (self.norm1(x), x) if residual is None else self.norm1(x, residual)  # res = x + res
        h, residual = self.norm2(self.attn(h, doc_ids, rope, cache), residual)
        return self.mlp(h), residual


def _numel(p: nn.Parameter) -> int:
    """A parameter's full size, also when ZeRO-3 has partitioned it away (leaving an empty tensor)."""
    return getattr(p, "ds_numel", p.numel())


class Head(nn.Linear):
    """The LM head (an nn.Linear, so that names, initialisation and ZeRO-3's gathering stay those of one): the
    logits over the real vocabulary (padding rows are never predicted), or given targets the mean
    cross-entropy over those that are not IGNORE, fused with the matmul (`fused`: no (tokens x vocab) logits)
    or from the full logits in fp32."""

    def __init__(self, n_embd: int, padded: int, vocab_size: int, fused: bool):
        super().__init__(n_embd, padded, bias=False)
        self.vocab_size, self.fused = vocab_size, fused
        self.sp: SequenceParallel | None = None  # set by GPT.sequence_parallel

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(h, self.weight)[..., : self.vocab_size]
        loss = linear_cross_entropy if self.fused else linear_cross_entropy_ref
        targets = targets.reshape(-1)
        mean = loss(h.reshape(-1, h.size(-1)), self.weight, targets, self.vocab_size, IGNORE)
        return mean if self.sp is None else group_mean_loss(mean, (targets != IGNORE).sum(), self.sp)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset; take it from the tokenizer before building the model")
        self.cfg = cfg
        self.vocab = padded_vocab(cfg)
        self.wte = nn.Embedding(self.vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = Norm(cfg)
        self.lm_head = Head(cfg.n_embd, self.vocab, cfg.vocab_size, cfg.fused_loss)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.sp: SequenceParallel | None = None
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        """GPT-2 initialisation: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 n_layer)."""
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, doc_ids=None, cache=None, positions=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size); with targets (B, T), the mean cross-entropy over the
        targets that are not IGNORE (fine-tuning's prompt and padding tokens: exactly zero loss and gradient).
        Generation passes a KV cache (llm/model/generation.py); packed fine-tuning examples and generation pass each
        token's position (B, T). Under sequence parallelism every rank of the group passes the whole sequences
        and computes its part of them (the loss is the group's; logits only for its part)."""
        if self.sp is not None and targets is not None:
            targets = self.sp.part(targets)
        return self.lm_head(self.hidden(idx, doc_ids, cache, positions), targets)

    def sequence_parallel(self, sp: SequenceParallel | None) -> None:
        """Split every sequence over the ranks of `sp`'s group from now on (None: each rank whole sequences)."""
        self.sp = sp
        for module in (*(b.attn for b in self.blocks), self.lm_head):
            module.sp = sp

    @contextlib.contextmanager
    def whole_sequences(self):
        """Each rank computes whole sequences inside (generation, downstream tasks); sequence parallelism, if on,
        is restored after."""
        sp = self.sp
        self.sequence_parallel(None)
        try:
            yield self
        finally:
            self.sequence_parallel(sp)

    def hidden(self, idx, doc_ids=None, cache=None, positions=None):
        """The final normed hidden states (B, T, n_embd): what the head (or a classifier) reads."""
        sp = self.sp if cache is None else None
        if sp is not None:  # this rank's part of the sequence; the document ids stay whole (for attention)
            full = idx.size(1)
            idx = sp.part(idx)
            positions = sp.positions(full, idx.device) if positions is None else sp.part(positions)
        B, T = idx.shape
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device) if positions is None else positions)
        x = self.drop(x)
        rope = None
        if self.cfg.pos == "rope":
            tables = (self.rope_cos, self.rope_sin)
            if positions is None:
                rope = tuple(t[:T] for t in tables)
            else:  # (T,) positions: one table for the batch; (B, T): one per sequence
                rope = tuple(t[positions] if positions.dim() == 1 else t[positions].unsqueeze(1) for t in tables)
        doc_ids = doc_ids if self.cfg.doc_mask else None
        residual = None
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training:
                x, residual = torch.utils.checkpoint.checkpoint(block, x, residual, doc_ids, rope, use_reentrant=False)
            else:
                x, residual = block(x, residual, doc_ids, rope, None if cache is None else cache.layers[i])
        return self.norm_f(x) if residual is None else self.norm_f(x, residual)[0]

    def num_params(self) -> int:
        """Parameters as the model defines them: shared (tied) tensors once, vocabulary padding rows excluded."""
        total = sum(_numel(p) for p in self.parameters())
        pad_rows = (self.vocab - self.cfg.vocab_size) * self.cfg.n_embd
        return total - pad_rows * (1 if self.cfg.tie_embeddings else 2)

    def num_matmul_params(self, head: bool = True, frozen: bool = False) -> int:
        """Parameters that do matrix work per token: everything but the embedding lookups (position embeddings,
        and the token embedding unless it is tied to the head, whose matmul it then performs), vocabulary padding
        rows excluded. `head=False` leaves out the LM head (a classifier does not use it); `frozen=True` counts
        only parameters without gradients (LoRA's base weights)."""
        skip = {id(self.wpe.weight)} if self.wpe is not None else set()
        if not self.cfg.tie_embeddings:
            skip.add(id(self.wte.weight))
        if not head:
            skip.add(id(self.lm_head.weight))
        unique = {id(p): p for p in self.parameters() if id(p) not in skip and not (frozen and p.requires_grad)}
        n = sum(_numel(p) for p in unique.values())
        if id(self.lm_head.weight) in unique:
            n -= (self.vocab - self.cfg.vocab_size) * self.cfg.n_embd
        return n

    def flops_per_token(self, seq_len: int, head: bool = True) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H Dh T. A frozen weight
        still costs its forward and the gradient of its input (4 per parameter) but no gradient of its own."""
        c = self.cfg
        matmul = 6 * self.num_matmul_params(head) - 2 * self.num_matmul_params(head, frozen=True)
        return matmul + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * seq_len

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int | None = 50,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of idx (B, T); the context is cropped to max_seq_len. One process: without
        sequence parallelism (restored after)."""
        with self.whole_sequences():
            return self._generate(idx, max_new_tokens, temperature, top_k, generator)

    def _generate(self, idx, max_new_tokens, temperature, top_k, generator) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.max_seq_len :])[:, -1, :] / max(temperature, 1e-5)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits.float(), dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
