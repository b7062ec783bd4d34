"""Fine-tuning examples: JSONL files read and checked line by line, tokenized into fixed-size arrays, and served
in resumable, rank-aware batches.

SFT (`{"prompt": ..., "response": ...}` or `{"messages": [{"role": ..., "content": ...}, ...]}`): an example
is its prompt's tokens then its response's tokens and EOS; only the response and EOS are targets. Chat
messages are rendered one per block as "<|role|>\\n" + content + "\\n" (roles system, user, assistant), and
only the assistant contents (with their "\\n") and the final EOS are targets. Examples are packed in file order
into windows of seq_len inputs: each keeps its own document id (attention never crosses examples) and its
positions restart at 0; an example longer than a window is cut to it (counted); padding is its own document
with no targets.

Classify (`{"text": ..., "label": ...}`): the text's tokens then EOS, cut to seq_len (counted), right-padded.
The label set is the sorted set of the training file's labels (numbers sort as numbers).

Order and cursor are the pretraining loader's (llm/data/dataset.py): global sample g of epoch g // n takes row
perm_epoch(g % n), ranks split each global batch, the state is the number of samples consumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llm.data.dataset import EpochOrder
from llm.data.tokenizer import Tokenizer

# A target that contributes no loss (F.cross_entropy's default ignore_index): the data marks prompt and padding
# tokens with it, the model's loss skips it.
IGNORE = -100
ROLES = ("system", "user", "assistant")
# The same rendering as a transformers chat template (exported in tokenizer_config.json; the EOS that ends a
# training conversation is not in it: generation stops at EOS by itself)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class ExampleError(ValueError):
    """A fine-tuning data file that cannot be used; the message names the file, the line and the fix."""


@dataclass
class Stats:
    examples: int = 0
    cut: int = 0  # examples longer than a window, cut to it
    dropped: int = 0  # SFT examples whose prompt fills the window (no target left)
    rows: int = 0
    target_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        extra = f", {self.cut} cut to the window" if self.cut else ""
        extra += f", {self.dropped} dropped (prompt longer than the window)" if self.dropped else ""
        return f"{self.examples} examples -> {self.rows} rows, {self.target_tokens:,} target tokens{extra}"


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; ExampleError at the first line that is not an object."""
    path = Path(path)
    if not path.is_file():
        raise ExampleError(f"{path}: no such file; give a JSONL file of examples")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ExampleError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(obj, dict):
                raise ExampleError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise ExampleError(f"{path}: no examples (the file is empty)")
    return rows


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ExampleError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def sft_tokens(obj: dict, tok: Tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """An example's tokens and, per token, whether it is a target (to be predicted)."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ExampleError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        tokens, targets = [], []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ROLES:
                raise ExampleError(f"{where}: messages[{i}].role is {role!r}, not one of {', '.join(ROLES)}")
            head, body = tok.encode(f"<|{role}|>\n"), tok.encode(_text(m, "content", f"{where}: messages[{i}]") + "\n")
            tokens += head + body
            targets += [False] * len(head) + [role == "assistant"] * len(body)
        if not any(targets):
            raise ExampleError(f"{where}: no assistant message: nothing to learn from this conversation")
        return tokens + [tok.eos_id], targets + [True]
    if "prompt" not in obj or "response" not in obj:
        raise ExampleError(f"{where}: needs 'prompt' and 'response' (or 'messages'); it has {sorted(obj)[:5]}")
    prompt, response = tok.encode(_text(obj, "prompt", where)), tok.encode(_text(obj, "response", where))
    return prompt + response + [tok.eos_id], [False] * len(prompt) + [True] * (len(response) + 1)


def pack_sft(path: str | Path, tok: Tokenizer, seq_len: int) -> tuple[dict[str, np.ndarray], Stats]:
    """Pack the file's examples into windows: idx, targets, doc_ids, positions, each (rows, seq_len)."""
    stats, windows, current = Stats(), [], []
    used = 0
    for n, obj in read_jsonl(path):
        tokens, is_target = sft_tokens(obj, tok, f"{path}:{n}")
        stats.examples += 1
        pairs = zip(tokens[1:], is_target[1:], strict=True)
        inputs, targets = tokens[:-1], [t if keep else IGNORE for t, keep in pairs]
        if len(inputs) > seq_len:
            stats.cut += 1
            inputs, targets = inputs[:seq_len], targets[:seq_len]
        if all(t == IGNORE for t in targets):
            stats.dropped += 1
            continue
        if used + len(inputs) > seq_len:
            windows.append(current)
            current, used = [], 0
        current.append((inputs, targets))
        used += len(inputs)
    if current:
        windows.append(current)
    if not windows:
        raise ExampleError(f"{path}: every example's prompt fills the {seq_len}-token window; raise data.seq_len")
    shape = (len(windows), seq_len)
    arrays = {
        "idx": np.full(shape, tok.pad_id, dtype=np.int64),
        "targets": np.full(shape, IGNORE, dtype=np.int64),
        "doc_ids": np.zeros(shape, dtype=np.int32),
        "positions": np.zeros(shape, dtype=np.int64),
    }
    for row, examples in enumerate(windows):
        at = 0
        for doc, (inputs, targets) in enumerate(examples):
            span = slice(at, at + len(inputs))
            arrays["idx"][row, span], arrays["targets"][row, span] = inputs, targets
            arrays["doc_ids"][row, span], arrays["positions"][row, span] = doc, np.arange(len(inputs))
            at += len(inputs)
        arrays["doc_ids"][row, at:] = len(examples)  # padding: a document of its own
    stats.rows, stats.target_tokens = len(windows), int((arrays["targets"] != IGNORE).sum())
    return arrays, stats


def label_set(path: str | Path) -> list[str]:
    """The sorted labels of a classification file (as strings; numbers sorted as numbers)."""
    labels = set()
    for n, obj in read_jsonl(path):
        if "label" not in obj or isinstance(obj["label"], (dict, list)) or obj["label"] in (None, ""):
            raise ExampleError(f"{path}:{n}: needs a 'label' (a string or a number), got {obj.get('label')!r}")
        labels.add(obj["label"])
    if len(labels) < 2:
        raise ExampleError(f"{path}: a classifier needs at least 2 labels, found {sorted(map(str, labels))}")
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in labels)
    return [str(x) for x in sorted(labels, key=(float if numeric else str))]


def encode_classify(
    path: str | Path, tok: Tokenizer, seq_len: int, labels: list[str]
) -> tuple[dict[str, np.ndarray], Stats]:
    """idx (rows, seq_len) right-padded texts ending in EOS, lengths (rows,), labels (rows,) as class indices."""
    index, stats = {name: i for i, name in enumerate(labels)}, Stats()
    rows = read_jsonl(path)
    arrays = {
        "idx": np.full((len(rows), seq_len), tok.pad_id, dtype=np.int64),
        "lengths": np.zeros(len(rows), dtype=np.int64),
        "labels": np.zeros(len(rows), dtype=np.int64),
    }
    for i, (n, obj) in enumerate(rows):
        text, label = _text(obj, "text", f"{path}:{n}"), str(obj.get("label"))
        if label not in index:
            raise ExampleError(f"{path}:{n}: label {label!r} is not one of the training labels {labels}")
        ids = tok.encode(text)
        if len(ids) + 1 > seq_len:
            stats.cut += 1
            ids = ids[: seq_len - 1]
        ids.append(tok.eos_id)
        arrays["idx"][i, : len(ids)], arrays["lengths"][i], arrays["labels"][i] = ids, len(ids), index[label]
    stats.examples = stats.rows = len(rows)
    stats.target_tokens = len(rows)
    return arrays, stats


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


class ExampleLoader:
    """This rank's micro-batches (dicts of tensors, the model's keyword arguments) of a stream of global batches
    over fixed rows, shuffled per epoch; resumable by the number of global samples consumed."""

    def __init__(self, arrays, global_batch, micro_batch, rank=0, world_size=1, seed=0, shuffle=True):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        self.global_batch, self.micro_batch, self.rank, self.world_size = global_batch, micro_batch, rank, world_size
        self.grad_accum = global_batch // (micro_batch * world_size)
        self.seed = seed
        self.samples, self.micro = 0, 0
        self.rows = EpochOrder(self.n, seed, shuffle, source_id=7)  # global sample -> row
        self._hash = content_hash(arrays)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        per_rank = self.global_batch // self.world_size
        start = self.samples + self.rank * per_rank + self.micro * self.micro_batch
        rows = self.rows(np.arange(start, start + self.micro_batch, dtype=np.int64))
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro, self.samples = 0, self.samples + self.global_batch
        return {k: torch.from_numpy(np.ascontiguousarray(v[rows])) for k, v in self.arrays.items()}

    def signature(self) -> dict:
        return {"content": self._hash, "rows": self.n, "seed": self.seed}

    def state_dict(self) -> dict:
        if self.micro != 0:
            raise RuntimeError("the data cursor can only be saved between global batches (after an optimizer step)")
        return {"samples": self.samples, "signature": self.signature()}

    def load_state_dict(self, state: dict) -> None:
        if state["signature"] != self.signature():
            raise ExampleError(
                "the saved data cursor belongs to other examples (the training file, data.seq_len or the tokenizer "
                "changed); resume with the same data, or resume=none"
            )
        self.samples, self.micro = int(state["samples"]), 0
