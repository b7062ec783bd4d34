"""Our checkpoints as a model of EleutherAI's lm-evaluation-harness (the `eval` extra: lm-eval), scored on our
model directly, not through a HuggingFace export:

    lm_eval --model llm-pretrain --model_args checkpoint=runs/demo --tasks NAME --include_path DIR
    python -m llm.evaluate --checkpoint runs/demo --tasks NAME --include-path DIR

Conventions, as in pretraining: a document starts after an EOS (the token the harness puts before an empty
context and before each rolling window), no BOS. Requests are scored in batches, longest first (the harness's
Collator); a request longer than the model's context keeps its last `max_seq_len` + 1 tokens, as the harness's
`hf` model does, and a continuation longer than that is scored on its part inside the window. Generation is
greedy with the KV cache (llm/model/generation.py), cut at the first stop string.

Under torch.distributed (torchrun, or every rank of a training run) the work is dealt to the ranks
round-robin, a batch or a generation at a time, and the results are gathered: every rank returns every
result, bitwise those of one rank (the batches are the same ones). The harness itself sees one rank, so each
rank computes the same metrics. Weights partitioned by ZeRO-3 are gathered by every forward from all ranks:
there every rank runs the same number of forwards (repeating a batch where it has none left), which log-
likelihoods allow and generation, whose length varies, does not (refused).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llm.data.tokenizer import Tokenizer
from llm.model.gpt import GPT

NAME = "llm-pretrain"


def ranks() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def partitioned(model) -> bool:
    """Whether the weights are ZeRO-3 partitions (each forward gathers them from every rank)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@register_model(NAME)
class HarnessModel(TemplateLM):
    """A GPT and its tokenizer, from a checkpoint (`checkpoint=`: a run, a checkpoint directory) or given (a GPT, or
    the DeepSpeed engine of one). With a process group, every rank must call it alike (the work is split over
    them) unless `split=False`."""

    def __init__(
        self,
        checkpoint: str | None = None,
        model: GPT | None = None,
        tokenizer: Tokenizer | None = None,
        batch_size: int | str = 16,
        device: str | None = None,
        max_gen_toks: int = 256,
        split: bool = True,
        **_ignored,
    ):
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # the harness's default device
            print(f"note: {device} is not available here; evaluating on the CPU", file=sys.stderr)
            device = "cpu"
        if model is None:
            from llm.store.weights import load_model

            _, model, tokenizer = load_model(checkpoint, device)
        model.eval()  # (a DeepSpeed engine's eval() returns None)
        self.model, self.tok = model, tokenizer
        self.batch = int(batch_size)
        self._device = torch.device(device)
        self.max_length = model.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        # ours: the harness's own rank / world_size stay 0 / 1; split=False scores everything on this rank
        self.split_rank, self.split_world = ranks() if split else (0, 1)
        self.lockstep = self.split_world > 1 and partitioned(model)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # ---- scoring ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether it is the greedy one) of each request."""

        def longest_first(req):
            tokens = req[1] + req[2]
            return -len(tokens), tuple(tokens)

        collator = Collator(requests, sort_fn=longest_first)
        batches = list(collator.get_batched(n=self.batch))
        scored = self._spread(batches, self._score_batch)
        return collator.get_original([r for batch in scored for r in batch])

    def _spread(self, items: list, work) -> list:
        """[work(item) for item in items], the items dealt to the ranks round-robin, the results gathered."""
        if self.split_world == 1:
            return [work(x) for x in items]
        rank, world = self.split_rank, self.split_world
        mine = range(rank, len(items), world)
        done = {i: work(items[i]) for i in mine}
        if self.lockstep:  # the same number of forwards on every rank: each gathers the weights from all
            for _ in range(math.ceil(len(items) / world) - len(mine)):
                work(items[0])
        gathered = [None] * world
        dist.all_gather_object(gathered, done)
        merged = {i: result for part in gathered for i, result in part.items()}
        return [merged[i] for i in range(len(items))]

    def _score_batch(self, chunk) -> list[tuple[float, bool]]:
        rows, spans, wholes = [], [], []
        for _, context, continuation in chunk:
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append(whole[:-1])
            wholes.append(whole)
            spans.append(min(len(continuation), len(whole) - 1))  # a continuation longer than the window: its end
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)  # right-padded: causal attention never sees the padding
        logits = self.model(ids.to(self.device))  # in fp32 below only where a continuation is scored
        out = []
        for i, (row, n) in enumerate(zip(rows, spans, strict=True)):
            positions = torch.arange(len(row) - n, len(row))
            target = torch.tensor(wholes[i][-n:])
            picked = F.log_softmax(logits[i, positions].float(), dim=-1)
            score = picked.gather(-1, target[:, None].to(picked.device)).sum().item()
            out.append((score, bool((picked.argmax(-1).cpu() == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, in disjoint windows of the model's context, each conditioned
        on the tokens before it up to the context (the harness's rolling scheme)."""
        owners, pairs = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            windows = list(
                get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, context_len=1)
            )
            pairs += [((None, None), *make_disjoint_window(w)) for w in windows]
            owners += [i] * len(windows)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owners, self._loglikelihood_tokens(pairs), strict=True):
            totals[i] += score  # each string's windows in order
        return totals

    # ---- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of each request's stop strings (`until`; EOS always stops).
        Requests with the same stop strings and length go in batches, longest prompt first; a batch ends when
        each of its rows has met a stop string or EOS."""
        if self.lockstep and requests:
            raise RuntimeError(
                "generation tasks need each rank to hold the whole weights (ZeRO stage 0-2); under ZeRO-3 score "
                "them on a checkpoint with python -m llm.evaluate --tasks"
            )
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(s for s in until if s)
            new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            prompt = self.tok_encode(context)[-(self.max_length - new) :] or [self.eot_token_id]
            groups.setdefault((until, new), []).append((i, prompt))
        batches = []
        for (until, new), members in groups.items():
            members.sort(key=lambda m: (-len(m[1]), m[0]))
            batches += [(until, new, members[k : k + self.batch]) for k in range(0, len(members), self.batch)]
        out = [""] * len(requests)
        for done in self._spread(batches, self._generate_batch):
            for i, text in done:
                out[i] = text
        return out

    def _generate_batch(self, batch) -> list[tuple[int, str]]:
        from llm.model.generation import Sampling, generate

        until, new, members = batch
        decode = self.tok_decode

        def met(tokens: list[int]) -> bool:
            text = decode(tokens)
            return any(s in text for s in until)

        prompts = [prompt for _, prompt in members]
        greedy = Sampling(max_new_tokens=new, temperature=0)
        rows = generate(self.model, prompts, greedy, self.eot_token_id, stop=met if until else None)
        texts = []
        for (i, _), tokens in zip(members, rows, strict=True):
            if tokens and tokens[-1] == self.eot_token_id:
                tokens = tokens[:-1]
            text = decode(tokens)
            texts.append((i, text[: min((text.find(s) for s in until if s in text), default=len(text))]))
        return texts
