"""Our checkpoints as a model of EleutherAI's lm-evaluation-harness (the `eval` extra: lm-eval), scored on our
model directly, not through a HuggingFace export:

    lm_eval --model llm-pretrain --model_args checkpoint=runs/demo --tasks NAME --include_path DIR
    python -m llm.evaluate --checkpoint runs/demo --tasks NAME --include-path DIR

Conventions, as in pretraining: a document starts after an EOS (the token the harness puts before an empty
context and before each rolling window), no BOS. Requests are scored in batches, longest first (the harness's
Collator); a request longer than the model's context keeps its last `max_seq_len` + 1 tokens, as the harness's
`hf` model does, and a continuation longer than that is scored on its part inside the window. Generation is
greedy with the KV cache (llm/model/generation.py), cut at the first stop string.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llm.data.tokenizer import Tokenizer
from llm.model.gpt import GPT

NAME = "llm-pretrain"


@register_model(NAME)
class HarnessModel(TemplateLM):
    """A GPT and its tokenizer, from a checkpoint (`checkpoint=`: a run, a checkpoint directory) or given."""

    def __init__(
        self,
        checkpoint: str | None = None,
        model: GPT | None = None,
        tokenizer: Tokenizer | None = None,
        batch_size: int | str = 16,
        device: str | None = None,
        max_gen_toks: int = 256,
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
        self.model, self.tok = model.eval(), tokenizer
        self.batch = int(batch_size)
        self._device = torch.device(device)
        self.max_length = model.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)

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
        results = []
        for chunk in collator.get_batched(n=self.batch):
            results.extend(self._score_batch(chunk))
        return collator.get_original(results)

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
        logprobs = F.log_softmax(self.model(ids.to(self.device)).float(), dim=-1)
        out = []
        for i, (row, n) in enumerate(zip(rows, spans, strict=True)):
            positions = torch.arange(len(row) - n, len(row))
            target = torch.tensor(wholes[i][-n:])
            picked = logprobs[i, positions]
            score = picked.gather(-1, target[:, None].to(picked.device)).sum().item()
            out.append((score, bool((picked.argmax(-1).cpu() == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, in disjoint windows of the model's context, each conditioned
        on the tokens before it up to the context (the harness's rolling scheme)."""
        results = []
        for (string,) in [req.args for req in requests]:
            windows = get_rolling_token_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length, context_len=1
            )
            pairs = [((None, None), *make_disjoint_window(w)) for w in windows]
            results.append(sum(score for score, _ in self._loglikelihood_tokens(pairs)))
        return results

    # ---- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of each request's stop strings (`until`; EOS always stops)."""
        from llm.model.generation import Sampling, generate

        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            prompt = self.tok_encode(context)[-(self.max_length - new) :] or [self.eot_token_id]
            tokens = generate(self.model, [prompt], Sampling(max_new_tokens=new, temperature=0), self.eot_token_id)[0]
            if tokens and tokens[-1] == self.eot_token_id:
                tokens = tokens[:-1]
            text = self.tok_decode(tokens)
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            out.append(text[:cut])
        return out
