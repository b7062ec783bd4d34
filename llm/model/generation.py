"""Text generation with a KV cache: batched prompts of different lengths, temperature / top-k / top-p sampling,
stop at EOS, a seed. The command over it: llm/generate.py (`python -m llm.generate`).

Prompts are left-padded to a common length; pad positions are masked out of attention and every prompt's
positions start at 0, so a prompt generates the same tokens alone or in a batch. The prompt goes through the
model once (prefill); each new token then costs one position, attending to the cached keys and values.
`use_cache=False` recomputes the whole sequence for every new token instead (the reference the cache is tested
against, and the baseline of tools/bench_generate.py). Temperature 0 is greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.model.gpt import GPT


class GenerationError(ValueError):
    """Generation settings that cannot work (too long for the context, bad sampling values); one line."""


@dataclass
class Sampling:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_at_eos: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max new tokens: {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise GenerationError(f"temperature: {self.temperature} must be 0 (greedy) or more")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top-k: {self.top_k} must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top-p: {self.top_p} must be in (0, 1]")


class LayerCache:
    """One layer's keys and values, (B, Hkv, capacity, D), filled up to the shared length."""

    def __init__(self, shared: KVCache, shape: tuple[int, ...], dtype, device):
        self.shared = shared
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def attend(self, q, k, v):
        """Append k, v (B, Hkv, T, D) at the current length; attend q (B, Hq, T, D) to all cached keys."""
        start, T = self.shared.length, q.size(2)
        self.k[:, :, start : start + T] = k
        self.v[:, :, start : start + T] = v
        keys, values = self.k[:, :, : start + T], self.v[:, :, : start + T]
        if q.size(1) != keys.size(1):  # grouped-query attention: each K/V head serves Hq / Hkv query heads
            groups = q.size(1) // keys.size(1)
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.shared.mask)


class KVCache:
    """The cache of every layer plus what they share: the filled length, which cached positions are real
    tokens (not left padding), and the attention mask of the positions being added."""

    def __init__(self, model: GPT, batch: int, capacity: int, dtype, device):
        c = model.cfg
        shape = (batch, c.n_kv_head or c.n_head, capacity, c.n_embd // c.n_head)
        self.length, self.capacity = 0, capacity
        self.real = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.mask = None
        self.layers = [LayerCache(self, shape, dtype, device) for _ in range(c.n_layer)]

    def begin(self, real: torch.Tensor) -> None:
        """Before a forward of T new positions, `real` (B, T) marking real tokens: build the mask (B, 1, T,
        length + T): causal, real keys only, and each position sees itself (a pad query must see something)."""
        B, T = real.shape
        end = self.length + T
        self.real[:, self.length : end] = real
        q_pos = torch.arange(self.length, end, device=real.device)[:, None]
        k_pos = torch.arange(end, device=real.device)[None, :]
        allowed = (k_pos <= q_pos) & self.real[:, None, :end]
        self.mask = (allowed | (k_pos == q_pos))[:, None]

    def end(self, T: int) -> None:
        self.length += T


def pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of logits (B, V): greedy at temperature 0, else sampled after top-k and
    top-p filtering."""
    logits = logits.float()
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= s.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, P), real (B, P), positions (B, P)) with each prompt right-aligned and positions from 0."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    real = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        real[i, P - len(p) :] = True
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), real.to(device), positions.to(device)


def _forward(model: GPT, cache: KVCache, ids, real, positions) -> torch.Tensor:
    """Logits of the last position of each row, the new positions appended to the cache."""
    cache.begin(real)
    logits = model(ids, cache=cache, positions=positions)[:, -1]
    cache.end(ids.size(1))
    return logits


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    s: Sampling,
    eos_id: int | None = None,
    use_cache: bool = True,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """The new tokens for each prompt (token ids), up to s.max_new_tokens, ending at EOS (included) when
    s.stop_at_eos, or at the token after which `stop(new tokens)` holds (a stop string appeared: included).
    Generation ends when every row has ended. Deterministic for a given seed."""
    s.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    longest, context = max(len(p) for p in prompts), model.cfg.max_seq_len
    if longest + s.max_new_tokens > context:
        raise GenerationError(
            f"a prompt of {longest} tokens plus {s.max_new_tokens} new tokens exceeds the model's context of "
            f"{context}; shorten the prompt or lower max new tokens to {max(context - longest, 0)}"
        )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator(device=device).manual_seed(s.seed)
    pad = eos_id if eos_id is not None else 0
    ids, real, positions = left_pad(prompts, pad, device)
    B = len(prompts)
    out = torch.empty((B, 0), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ended = [None] * B  # each row's length once it has ended
    can_end = (eos_id is not None and s.stop_at_eos) or stop is not None  # else: every step, no check
    cache = KVCache(model, B, ids.size(1) + s.max_new_tokens, dtype, device) if use_cache else None
    for step in range(s.max_new_tokens):
        if use_cache:
            if step == 0:
                logits = _forward(model, cache, ids, real, positions)
            else:
                nxt_pos = positions[:, -1:] + 1
                positions = torch.cat([positions, nxt_pos], dim=1)
                logits = _forward(model, cache, out[:, -1:], torch.ones_like(nxt_pos, dtype=torch.bool), nxt_pos)
        else:  # recompute everything: a fresh cache over the whole sequence each time
            full_ids = torch.cat([ids, out], dim=1)
            full_real = torch.cat([real, torch.ones_like(out, dtype=torch.bool)], dim=1)
            full_pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, out.size(1) + 1, device=device)], 1)
            fresh = KVCache(model, B, full_ids.size(1), dtype, device)
            logits = _forward(model, fresh, full_ids, full_real, full_pos)
        nxt = pick(logits, s, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if not can_end:
            continue
        now = done.clone()
        if eos_id is not None and s.stop_at_eos:
            now |= nxt == eos_id
        if stop is not None:
            rows = out.tolist()
            now |= torch.tensor([not d and stop(r) for d, r in zip(done.tolist(), rows, strict=True)], device=device)
        for i in torch.nonzero(now & ~done).flatten().tolist():
            ended[i] = step + 1
        done = now
        if bool(done.all()):
            break
    return [row if n is None else row[:n] for row, n in zip(out.tolist(), ended, strict=True)]
