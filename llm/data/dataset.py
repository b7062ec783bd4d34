"""Packed training windows with document boundaries: deterministic, rank-aware, resumable, mixable.

The stream of a split is its shards concatenated. Window w holds tokens [w*L, w*L + L + 1) for L = seq_len:
its inputs are the first L tokens and its targets the last L, so the windows' inputs tile the stream with
no gap and no overlap and every next-token pair in the stream is trained on exactly once per epoch.

Order: global sample g of a source belongs to epoch g // n (n windows) and takes window perm_epoch(g % n),
where perm_epoch is a keyed pseudo-random bijection of [0, n) (a Feistel network with cycle walking): a
pure function of (seed, epoch, g) that needs no memory and no state. A mixture assigns global samples to
sources in blocks whose per-source counts follow the weights (largest remainder), shuffled within the
block by (seed, block index). A data-parallel job cuts every global batch of G samples into world_size
contiguous parts; the loader's state is the number of global samples consumed, so a job resumed on any
number of ranks continues the same global sequence.

Document ids: position t of a window belongs to document `number of EOS tokens before t`, so attention can
be kept inside documents (the EOS closes its own document).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm.data.shards import ShardError, open_split, read_manifest

_MASK64 = np.uint64((1 << 64) - 1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, epoch, source, ...), each mixed in turn."""
    h = np.array([0x9E3779B97F4A7C15], dtype=np.uint64)
    for p in parts:
        h = _mix64(h ^ np.array([p & ((1 << 64) - 1)], dtype=np.uint64))
    return int(h[0])


class Permutation:
    """A pseudo-random bijection of [0, n) keyed by a 64-bit key, evaluated on arrays in O(1) memory."""

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        self.half = max(1, math.ceil(max(1, (n - 1).bit_length()) / 2))
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(derive_key(key, r)) for r in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        y = self._feistel(np.asarray(idx, dtype=np.uint64))
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():  # cycle walking: the domain is at most 4n, so a few rounds at most
            y[out_of_range] = self._feistel(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


class TokenStream:
    """One split of a prepared dataset: its shards, memory-mapped, read as one flat array."""

    def __init__(self, arrays: list[np.ndarray], name: str = "", content: str = ""):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [a.size for a in arrays]).tolist()
        self.name = name  # for messages
        self.content = content  # identifies the tokens, wherever the files are: a digest of the shards' sha256

    @classmethod
    def open(cls, directory: str | Path, split: str, tokenizer_sha256: str | None = None) -> TokenStream:
        arrays = open_split(directory, split, tokenizer_sha256)
        shards = read_manifest(directory)["splits"][split]["shards"]
        content = hashlib.sha256(" ".join(s["sha256"] for s in shards).encode()).hexdigest()
        return cls(arrays, name=f"{directory}:{split}", content=content)

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, position: int) -> tuple[str, int]:
        """(the shard file, the token's offset in it) of a position of the stream."""
        i = bisect.bisect_right(self.starts, position) - 1
        return str(getattr(self.arrays[i], "filename", f"{self.name} shard {i}")), position - self.starts[i]

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + length) into `out` (which may have a wider dtype)."""
        i = bisect.bisect_right(self.starts, start) - 1
        pos, filled = start - self.starts[i], 0
        while filled < length:
            take = min(length - filled, self.arrays[i].size - pos)
            out[filled : filled + take] = self.arrays[i][pos : pos + take]
            filled += take
            i, pos = i + 1, 0


class EpochOrder:
    """Global sample g -> item perm_epoch(g % n) of epoch g // n (or g % n unshuffled), keyed by (seed, source)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, source_id: int = 0):
        self.n, self.seed, self.shuffle, self.source_id = n, seed, shuffle, source_id
        self._perm: tuple[int, Permutation] | None = None

    def __call__(self, g: np.ndarray) -> np.ndarray:
        epoch, pos = np.divmod(g, self.n)
        if not self.shuffle:
            return pos
        out = np.empty_like(pos)
        for e in np.unique(epoch):
            if self._perm is None or self._perm[0] != e:
                self._perm = (int(e), Permutation(self.n, derive_key(self.seed, self.source_id, int(e))))
            sel = epoch == e
            out[sel] = self._perm[1](pos[sel])
        return out


class PackedWindows:
    """Windows of seq_len + 1 tokens from one stream, in a per-epoch shuffled (or sequential) order."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int = 0, shuffle: bool = True, source_id: int = 0):
        self.stream, self.seq_len, self.seed, self.shuffle, self.source_id = stream, seq_len, seed, shuffle, source_id
        self.n = (len(stream) - 1) // seq_len
        if self.n < 1:
            raise ShardError(
                f"{stream.name} holds {len(stream):,} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "lower seq_len or prepare more data"
            )
        self._order = EpochOrder(self.n, seed, shuffle, source_id)

    def window_ids(self, g: np.ndarray) -> np.ndarray:
        """The window index taken by each global sample index in `g`."""
        return self._order(g)

    def tokens(self, g: np.ndarray, out: np.ndarray) -> None:
        """Fill out[i] (seq_len + 1 tokens) with the window of global sample g[i]."""
        for row, w in enumerate(self.window_ids(np.asarray(g, dtype=np.int64)).tolist()):
            self.stream.read(w * self.seq_len, self.seq_len + 1, out[row])

    def locate(self, g: int, column: int) -> tuple[str, int]:
        """(shard file, offset) of token `column` of global sample g's window."""
        return self.stream.locate(int(self.window_ids(np.array([g]))[0]) * self.seq_len + column)

    def signature(self) -> dict:
        """What a saved data cursor must match to be resumed: the tokens (by content, not by path), the window
        length and the order's seed."""
        return {"content": self.stream.content, "tokens": len(self.stream), "seq_len": self.seq_len, "seed": self.seed}


class Mixture:
    """Several PackedWindows drawn by weight: in every block of `block` global samples, source i gives
    round(weights[i] * block) of them (largest remainder), in an order shuffled by (seed, block index)."""

    def __init__(self, sources: list[PackedWindows], weights: list[float], seed: int = 0, block: int | None = None):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"a mixture needs one weight per source: {len(sources)} sources, {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixture weights must be positive, got {weights}")
        if len({s.seq_len for s in sources}) != 1:
            raise ValueError("all sources of a mixture must use the same seq_len")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.block = block or min(1 << 20, max(1024, math.ceil(100 / min(self.weights))))
        exact = np.array(self.weights) * self.block
        counts = np.floor(exact).astype(np.int64)
        remainder_order = np.argsort(-(exact - counts), kind="stable")
        counts[remainder_order[: self.block - counts.sum()]] += 1
        if (counts == 0).any():
            raise ValueError(f"a mixture weight is too small for a block of {self.block} samples: {weights}")
        self.counts = counts
        self.sources, self.seed, self.seq_len = sources, seed, sources[0].seq_len
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, rank of the position among its source's positions) for block b."""
        if self._cached is None or self._cached[0] != b:
            rng = np.random.default_rng([self.seed, b, 0x6D6978])
            order = rng.permutation(np.repeat(np.arange(len(self.sources)), self.counts))
            rank = np.empty(self.block, dtype=np.int64)
            for i, c in enumerate(self.counts):
                rank[order == i] = np.arange(c)
            self._cached = (b, order, rank)
        return self._cached[1], self._cached[2]

    def source_of(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, that source's own sample index) for each global sample index in `g`."""
        g = np.asarray(g, dtype=np.int64)
        src, idx = np.empty_like(g), np.empty_like(g)
        blocks, pos = np.divmod(g, self.block)
        for b in np.unique(blocks):
            sel = blocks == b
            order, rank = self._block(int(b))
            src[sel] = order[pos[sel]]
            idx[sel] = int(b) * self.counts[src[sel]] + rank[pos[sel]]
        return src, idx

    def tokens(self, g: np.ndarray, out: np.ndarray) -> None:
        src, idx = self.source_of(g)
        for i, source in enumerate(self.sources):
            rows = np.flatnonzero(src == i)
            if rows.size:
                part = np.empty((rows.size, self.seq_len + 1), dtype=out.dtype)
                source.tokens(idx[rows], part)
                out[rows] = part

    def locate(self, g: int, column: int) -> tuple[str, int]:
        src, idx = self.source_of(np.array([g], dtype=np.int64))
        return self.sources[int(src[0])].locate(int(idx[0]), column)

    def signature(self) -> dict:
        return {"sources": [s.signature() for s in self.sources], "weights": self.weights, "seed": self.seed}


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64: input_ids shifted left by one
    doc_ids: torch.Tensor  # (B, T) int32: document index of each position inside its window


def doc_ids_from_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """(B, T) tokens -> (B, T) int32 document ids: the number of EOS tokens strictly before each position."""
    eos = (tokens == eos_id).astype(np.int32)
    return np.cumsum(eos, axis=1, dtype=np.int32) - eos


class BatchLoader:
    """This rank's micro-batches of a stream of global batches, with a resumable global cursor.

    Global batch k holds global samples [k*G, (k+1)*G); rank r takes the contiguous part
    [k*G + r*G/W, k*G + (r+1)*G/W) and serves it as G/(W*micro_batch) micro-batches. With `vocab_size`, every
    micro-batch's largest id is checked against it (a shard changed after it was written would otherwise
    crash the embedding with no word of where)."""

    def __init__(
        self,
        windows: PackedWindows | Mixture,
        global_batch: int,
        micro_batch: int,
        eos_id: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ):
        if global_batch % (micro_batch * world_size):
            raise ValueError(
                f"global batch {global_batch} is not divisible by micro_batch {micro_batch} x world_size "
                f"{world_size}; choose sizes with global_batch = micro_batch x world_size x grad_accum"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.windows, self.global_batch, self.micro_batch = windows, global_batch, micro_batch
        self.eos_id, self.rank, self.world_size, self.vocab_size = eos_id, rank, world_size, vocab_size
        self.grad_accum = global_batch // (micro_batch * world_size)
        self.samples = 0  # global samples consumed before the current global batch
        self.micro = 0  # micro-batches of the current global batch already served
        self._buf = np.empty((micro_batch, windows.seq_len + 1), dtype=np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        per_rank = self.global_batch // self.world_size
        start = self.samples + self.rank * per_rank + self.micro * self.micro_batch
        self.windows.tokens(np.arange(start, start + self.micro_batch), self._buf)
        if self.vocab_size is not None and (top := int(self._buf.max())) >= self.vocab_size:
            row, column = np.unravel_index(int(self._buf.argmax()), self._buf.shape)
            path, offset = self.windows.locate(start + int(row), int(column))
            raise ShardError(
                f"{path}: token {offset:,} is id {top}, outside the tokenizer's {self.vocab_size} ids: the shard was "
                "changed after it was written; find such damage with `python -m llm.data.prepare_data --verify` and "
                "re-prepare the data"
            )
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro, self.samples = 0, self.samples + self.global_batch
        x = self._buf[:, :-1]
        return Batch(
            input_ids=torch.from_numpy(x.copy()),
            targets=torch.from_numpy(self._buf[:, 1:].copy()),
            doc_ids=torch.from_numpy(doc_ids_from_eos(x, self.eos_id)),
        )

    def state_dict(self) -> dict:
        if self.micro != 0:
            raise RuntimeError("the data cursor can only be saved between global batches (after an optimizer step)")
        return {"samples": self.samples, "signature": self.windows.signature()}

    def load_state_dict(self, state: dict) -> None:
        if state["signature"] != self.windows.signature():
            raise ShardError(
                f"the saved data cursor belongs to different data ({state['signature']}), not "
                f"{self.windows.signature()}; resume with the same data, seq_len and seed"
            )
        self.samples, self.micro = int(state["samples"]), 0


def open_windows(
    directories: list[str | Path],
    split: str,
    seq_len: int,
    seed: int = 0,
    weights: list[float] | None = None,
    shuffle: bool = True,
    tokenizer_sha256: str | None = None,
) -> PackedWindows | Mixture:
    """Open one prepared dataset (PackedWindows) or several (a Mixture), checking that all were made
    with the same tokenizer (and with `tokenizer_sha256`, when given)."""
    if not directories:
        raise ValueError("no data directory given")
    shas = {str(d): read_manifest(d)["tokenizer"]["sha256"] for d in directories}
    first_dir, first_sha = next(iter(shas.items()))
    for d, sha in shas.items():
        if sha != first_sha:
            raise ShardError(
                f"mixture sources use different tokenizers: {first_dir} has sha256 {first_sha}, {d} has {sha}; "
                "prepare every source with the same tokenizer"
            )
    sources = [
        PackedWindows(TokenStream.open(d, split, tokenizer_sha256), seq_len, seed, shuffle, source_id=i)
        for i, d in enumerate(directories)
    ]
    if len(sources) == 1 and weights in (None, [1.0], [1]):
        return sources[0]
    return Mixture(sources, weights or [1.0] * len(sources), seed)
