"""Corpus -> token shards: parallel tokenization, exact de-duplication, a deterministic val split, resume.

Pipeline: the corpus is planned into work items (groups of files or line-aligned pieces of a large JSONL
file; `llm.data.corpus`). Worker processes read, decode, hash and tokenize whole items; the main process
takes their results in item order, drops exact duplicates (first occurrence kept, by a 128-bit BLAKE2b
of the text), assigns each document to val when its hash falls below `val_fraction` (so the split does not
depend on order, worker count or reruns), and appends `tokens + [EOS]` to that split's buffer.

Resume: whenever a buffer reaches `shard_tokens` it is written as a shard (atomically), and a checkpoint
records how many work items are done, the shards written so far, the other split's pending tokens and the
hashes seen (an append-only file). A rerun of the same command after an interruption continues from the
last checkpoint; anything written after it is discarded. The manifest is written last and atomically.
The output is a pure function of the inputs and options: the number of workers does not change a byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llm.config.schema import DataConfig
from llm.data.corpus import Corpus, CorpusStats, ReadOptions, Segment, cleaning_summaries, read_segment, segment_size
from llm.data.files import atomic_write, atomic_write_json, sha256_file
from llm.data.shards import (
    DTYPES,
    FORMAT,
    MANIFEST,
    SPLITS,
    ShardError,
    dtype_for_vocab,
    read_manifest,
    write_manifest,
    write_shard,
)
from llm.data.tokenizer import MODEL_FILE, Tokenizer, TokenizerError, train_tokenizer
from llm.data.workers import worker_pool

STATE_FILE = ".prepare_state.json"
SEEN_FILE = ".prepare_seen.bin"
VAL_FILE = "val_documents.bin"  # the val documents' digests (HASH_BYTES each), in corpus order
HASH_BYTES = 16


@dataclass
class PrepareConfig:
    inputs: list[str]
    tokenizer: str
    output: str
    val_fraction: float = 0.005
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_tokens: int = 100_000_000
    dtype: str = "auto"
    text_field: str = "text"
    skip_bad_lines: bool = False
    chunk_bytes: int = 1 << 20

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.shard_tokens < 1:
            raise ValueError(f"--shard-tokens must be positive, got {self.shard_tokens}")


# ---------------------------------------------------------------------------------------------------------
# Worker side: one work item in, (hashes, concatenated tokens with EOS, per-document lengths) out.

_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer.load(tokenizer_dir)


def _encode_item(args: tuple[list[Segment], ReadOptions, str]):
    item, opts, dtype = args
    stats = CorpusStats()
    docs = [doc for seg in item for doc in read_segment(seg, opts, stats)]
    hashes = b"".join(hashlib.blake2b(d.encode("utf-8"), digest_size=HASH_BYTES).digest() for d in docs)
    ids = _worker_tok.encode_batch(docs) if docs else []
    eos = _worker_tok.eos_id
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=DTYPES[dtype])
    pos = 0
    for x in ids:
        flat[pos : pos + len(x)] = x
        flat[pos + len(x)] = eos
        pos += len(x) + 1
    return hashes, flat, lengths, stats


def encode_items(cfg: PrepareConfig, items: list[list[Segment]], opts: ReadOptions, dtype: str):
    """Each work item's (digests, tokens with EOS, document lengths, read counts), in order, on `cfg.workers`
    processes."""
    work = [(item, opts, dtype) for item in items]
    if cfg.workers == 1:
        _init_worker(cfg.tokenizer)
        yield from map(_encode_item, work)
        return
    with worker_pool(cfg.workers, initializer=_init_worker, initargs=(cfg.tokenizer,)) as pool:
        yield from pool.imap(_encode_item, work, chunksize=1)


# ---------------------------------------------------------------------------------------------------------
# Main side.


def _is_val(digest: bytes, val_fraction: float) -> bool:
    return int.from_bytes(digest[:8], "little") < val_fraction * 2.0**64


@dataclass
class _SplitBuffer:
    shards: list[dict] = field(default_factory=list)
    pending: list[np.ndarray] = field(default_factory=list)
    pending_tokens: int = 0

    def append(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += tokens.size

    def take(self, dtype: str) -> np.ndarray:
        out = np.concatenate(self.pending) if self.pending else np.empty(0, DTYPES[dtype])
        self.pending, self.pending_tokens = [], 0
        return out


def plan(cfg: PrepareConfig) -> tuple[Tokenizer, str, ReadOptions, Corpus, dict]:
    """What a preparation of `cfg` works from: the tokenizer, the token dtype, the read options, the corpus
    planned into work items, and the fingerprint that a resumed or repeated preparation must match."""
    cfg.validate()
    tok = Tokenizer.load(cfg.tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size, cfg.dtype)
    opts = ReadOptions(cfg.text_field, cfg.skip_bad_lines)
    corpus = Corpus(cfg.inputs, opts, cfg.chunk_bytes)
    fingerprint = {
        "tokenizer_sha256": tok.sha256,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "dtype": dtype,
        "text_field": cfg.text_field,
        "skip_bad_lines": cfg.skip_bad_lines,
        "chunk_bytes": cfg.chunk_bytes,
        "files": hashlib.sha256(json.dumps(corpus.fingerprint()).encode()).hexdigest(),
        "n_files": len(corpus.files),
    }
    return tok, dtype, opts, corpus, fingerprint


# (the first work item to encode) -> the encoded results of it and of every later item, in order
Encoded = Callable[[int], Iterator[tuple[bytes, np.ndarray, np.ndarray, CorpusStats]]]


def prepare(
    cfg: PrepareConfig,
    progress: bool = True,
    verbose: bool = True,
    command: list[str] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    encoded: Encoded | None = None,
) -> dict:
    """Tokenize `cfg.inputs` into shards under `cfg.output` and return the manifest. `progress` shows a
    progress bar, `verbose` prints what was done. `encoded` gives the work items' results when they were
    computed elsewhere (the Slurm array tasks of llm/data/prepare_cluster.py); by default this machine's
    worker processes compute them.

    `on_checkpoint(items_done)` is called after each checkpoint (tests use it to interrupt a run)."""
    tok, dtype, opts, corpus, fingerprint = plan(cfg)
    out = Path(cfg.output)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("fingerprint") != fingerprint:
            raise ShardError(
                f"{out} already holds a complete dataset made from other inputs or options; "
                "choose a new --output or delete it"
            )
        _log(verbose, f"{out} is already complete ({MANIFEST} present); nothing to do")
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    run = _Preparation(cfg, out, tok, dtype, fingerprint)
    if run.items_done:
        _log(verbose, f"resuming {out}: {run.items_done}/{len(corpus.items)} work items already done")
    todo = corpus.items[run.items_done :]
    total = sum(segment_size(s) for item in todo for s in item)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, file=sys.stderr)
    t0, tokens_total = time.time(), 0
    results = encoded(run.items_done) if encoded else encode_items(cfg, todo, opts, dtype)
    for item, result in zip(todo, results, strict=True):
        run.add(*result)
        tokens_total += result[1].size
        bar.update(sum(segment_size(s) for s in item))
        bar.set_postfix(tokens=f"{tokens_total / 1e6:.1f}M", refresh=False)
        if any(b.pending_tokens >= cfg.shard_tokens for b in run.bufs.values()):
            run.checkpoint(flush_all=False)
            if on_checkpoint is not None:
                on_checkpoint(run.items_done)
    bar.close()
    manifest = run.finish(command)
    _report(manifest, cfg, out, run, time.time() - t0, verbose)
    return manifest


class _Preparation:
    """One preparation's progress: the documents kept so far (their digests, for de-duplication and the val
    split), the split buffers and shards written, the counts; checkpointed to `out` so that an interrupted run
    resumes where its last checkpoint left off, to byte-identical output."""

    def __init__(self, cfg: PrepareConfig, out: Path, tok: Tokenizer, dtype: str, fingerprint: dict):
        self.cfg, self.out, self.tok, self.dtype, self.fingerprint = cfg, out, tok, dtype, fingerprint
        self.bufs = {s: _SplitBuffer() for s in SPLITS}
        self.stats = CorpusStats()
        self.dups = self.unk = self.items_done = 0
        self.seen: set[bytes] = set()
        state = _load_state(out, fingerprint)
        if state is not None:
            self.items_done, self.dups, self.seen = state["items_done"], state["duplicates_dropped"], state["seen"]
            self.unk = state.get("unk_tokens", 0)
            self.stats.add(CorpusStats(**state["stats"]))
            for s in SPLITS:
                self.bufs[s].shards = state["shards"][s]
                pending = out / f".prepare_pending_{s}.bin"
                if state["pending_tokens"][s]:
                    self.bufs[s].append(np.fromfile(pending, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")))
        self.seen_fh = open(out / SEEN_FILE, "ab")  # noqa: SIM115 - appended to at every checkpoint, closed by finish
        self.new_hashes: list[bytes] = []

    def add(self, hashes: bytes, flat: np.ndarray, lengths: np.ndarray, item_stats: CorpusStats) -> None:
        """A work item's documents: each new one to its split (by its digest), each repeat dropped."""
        self.stats.add(item_stats)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for i in range(len(lengths)):
            digest = hashes[i * HASH_BYTES : (i + 1) * HASH_BYTES]
            if digest in self.seen:
                self.dups += 1
                continue
            self.seen.add(digest)
            self.new_hashes.append(digest)
            split = "val" if _is_val(digest, self.cfg.val_fraction) else "train"
            doc = flat[starts[i] : starts[i + 1]]
            self.unk += int(np.count_nonzero(doc == self.tok.unk_id))  # runs of characters a char vocabulary lacks
            self.bufs[split].append(doc)
        self.items_done += 1

    def checkpoint(self, flush_all: bool) -> None:
        """Write every full shard (every pending token with `flush_all`), the new digests and the state."""
        out, bufs = self.out, self.bufs
        for s in SPLITS:
            b = bufs[s]
            if b.pending_tokens and (flush_all or b.pending_tokens >= self.cfg.shard_tokens):
                b.shards.append(write_shard(out, s, len(b.shards), b.take(self.dtype), self.tok.eos_id))
        self.seen_fh.write(b"".join(self.new_hashes))
        self.seen_fh.flush()
        os.fsync(self.seen_fh.fileno())
        self.new_hashes.clear()
        for s in SPLITS:
            if bufs[s].pending:
                merged = bufs[s].take(self.dtype)
                bufs[s].append(merged)
                atomic_write(out / f".prepare_pending_{s}.bin", merged.tobytes())
        atomic_write_json(
            out / STATE_FILE,
            {
                "fingerprint": self.fingerprint,
                "items_done": self.items_done,
                "seen_count": len(self.seen),
                "duplicates_dropped": self.dups,
                "unk_tokens": self.unk,
                "stats": self.stats.as_dict(),
                "shards": {s: bufs[s].shards for s in SPLITS},
                "pending_tokens": {s: bufs[s].pending_tokens for s in SPLITS},
            },
        )

    def finish(self, command: list[str] | None) -> dict:
        """The last shards, the val documents' digests and the manifest; the checkpoint files removed."""
        if not self.seen:
            raise ShardError(f"the corpus has no documents ({self.stats.summary()}); check --input")
        self.checkpoint(flush_all=True)
        self.seen_fh.close()
        out, cfg, bufs, tok = self.out, self.cfg, self.bufs, self.tok
        digests = (out / SEEN_FILE).read_bytes()  # every kept document's, in corpus order
        val = [
            d
            for d in (digests[i : i + HASH_BYTES] for i in range(0, len(digests), HASH_BYTES))
            if _is_val(d, cfg.val_fraction)
        ]
        atomic_write(out / VAL_FILE, b"".join(val))
        total_tokens = sum(e["tokens"] for s in SPLITS for e in bufs[s].shards)
        val_share = sum(e["tokens"] for e in bufs["val"].shards) / max(1, total_tokens)
        manifest = {
            "format": FORMAT,
            "dtype": self.dtype,
            "tokenizer": {
                "sha256": tok.sha256,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "model_type": tok.meta.get("model_type"),
            },
            "splits": {
                s: {
                    "tokens": sum(e["tokens"] for e in bufs[s].shards),
                    "documents": sum(e["documents"] for e in bufs[s].shards),
                    "shards": bufs[s].shards,
                }
                for s in SPLITS
            },
            "stats": {**self.stats.as_dict(), "duplicates_dropped": self.dups, "unk_tokens": self.unk},
            "val_documents": {
                "file": VAL_FILE,
                "count": len(val),
                "digest": f"blake2b, {HASH_BYTES} bytes, of each document's UTF-8 text; val iff its first 8 bytes "
                "(little-endian) < val_fraction * 2^64",
                "token_share": round(val_share, 6),
            },
            "fingerprint": self.fingerprint,
            "cleaning": cleaning_summaries(cfg.inputs),  # what python -m llm.data.clean did to an input, if it wrote it
            "config": {k: v for k, v in asdict(cfg).items() if k != "workers"},
            "command": command or [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_manifest(out, manifest)
        for name in (STATE_FILE, SEEN_FILE, ".prepare_pending_train.bin", ".prepare_pending_val.bin"):
            (out / name).unlink(missing_ok=True)
        return manifest


def _report(manifest: dict, cfg: PrepareConfig, out: Path, run: _Preparation, elapsed: float, verbose: bool) -> None:
    splits = manifest["splits"]
    _log(
        verbose,
        f"wrote {out}: train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens "
        f"({run.dtype}); {run.stats.summary()}; {run.dups:,} duplicates dropped; {run.unk:,} unknown-character "
        f"tokens; {elapsed:.1f}s",
    )
    val_share = manifest["val_documents"]["token_share"]
    if cfg.val_fraction > 0 and splits["val"]["tokens"] == 0:
        _log(verbose, "warning: the val split is empty; raise --val-fraction or add documents")
    elif cfg.val_fraction > 0 and not cfg.val_fraction / 2 <= val_share <= 2 * cfg.val_fraction:
        _log(
            verbose,
            f"warning: val holds {100 * val_share:.1f}% of the tokens, --val-fraction asked "
            f"{100 * cfg.val_fraction:g}%: documents go whole to one split, so a few large ones make the share "
            "coarse; split large files into smaller documents or adjust --val-fraction",
        )


def _load_state(out: Path, fingerprint: dict) -> dict | None:
    """The last checkpoint of an interrupted run, with stray files from after it removed."""
    path = out / STATE_FILE
    if not path.is_file():
        for stray in _our_files(out):
            stray.unlink()
        return None
    state = json.loads(path.read_text())
    if state["fingerprint"] != fingerprint:
        diff = sorted(k for k in fingerprint if fingerprint[k] != state["fingerprint"].get(k))
        raise ShardError(
            f"{out} holds an interrupted preparation with different {', '.join(diff)}; rerun with the same "
            "arguments to resume, or delete the directory to start over"
        )
    keep = {e["file"] for s in SPLITS for e in state["shards"][s]} | {STATE_FILE, SEEN_FILE}
    keep |= {f".prepare_pending_{s}.bin" for s in SPLITS}
    for stray in _our_files(out):
        if stray.name not in keep:
            stray.unlink()
    for s in SPLITS:
        for e in state["shards"][s]:
            if sha256_file(out / e["file"]) != e["sha256"]:
                raise ShardError(f"{out / e['file']} changed since it was written; delete {out} to start over")
    n = state["seen_count"]
    raw = (out / SEEN_FILE).read_bytes()[: n * HASH_BYTES]
    with open(out / SEEN_FILE, "r+b") as fh:
        fh.truncate(n * HASH_BYTES)
    state["seen"] = {raw[i : i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)}
    return state


def _our_files(out: Path) -> list[Path]:
    """Files this module writes into an output directory (other files there are left alone)."""
    pattern = re.compile(r"((train|val)_\d{5}\.bin|val_documents\.bin|\.prepare_\w+\.(bin|json))(\.tmp)?")
    return [p for p in out.iterdir() if pattern.fullmatch(p.name)]


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def check_built_tokenizer(data_cfg) -> None:
    """A tokenizer this function built earlier from `data.corpus` (same inputs) must have been built with the
    options the config asks for now: a run would otherwise quietly train on the old vocabulary."""
    meta = Tokenizer.load(data_cfg.tokenizer).meta
    if meta.get("trained_on", {}).get("inputs") != list(data_cfg.corpus):
        return  # a tokenizer of other inputs: the user's own, taken as it is
    options = meta.get("options", {})
    built = (options.get("requested_vocab_size"), options.get("split_digits", True))  # digits were always split
    wanted = (data_cfg.tokenizer_vocab_size, data_cfg.tokenizer_split_digits)
    if built != wanted:
        describe = lambda v: f"vocab size {v[0]}, split digits {'true' if v[1] else 'false'}"  # noqa: E731
        raise TokenizerError(
            f"{data_cfg.tokenizer} was built from {' '.join(data_cfg.corpus)} with {describe(built)}, the config asks "
            f"for {describe(wanted)}; delete {data_cfg.tokenizer} and {' '.join(data_cfg.paths)} to rebuild them, "
            f"or set data.tokenizer_vocab_size={built[0]} data.tokenizer_split_digits={str(built[1]).lower()}"
        )


def ensure_data(data_cfg, demo: tuple[list[str], str] | None = None, verbose: bool = True) -> None:
    """Build the tokenizer and the shards named by a DataConfig from its `corpus` when they are missing
    (the demo's first run). A complete dataset is left alone. `demo` is (paths, tokenizer) where the default
    corpus may be built: any other missing path with the default corpus is a mistyped or unprepared path, an
    error, not a place to build the demo's data in (a corpus of one's own is built wherever it is asked to)."""
    if not data_cfg.prepare_if_missing:
        return
    if demo is not None and list(data_cfg.corpus) == DataConfig().corpus:
        for path, kind in [(p, "data path") for p in data_cfg.paths] + [(data_cfg.tokenizer, "tokenizer")]:
            exists = (Path(path) / (MODEL_FILE if kind == "tokenizer" else MANIFEST)).is_file()
            if not exists and path not in (*demo[0], demo[1]):
                raise ShardError(
                    f"{kind} {path} does not exist: prepare it (python -m llm.data.train_tokenizer, python -m "
                    "llm.data.prepare_data) or correct the path; only the demo's own "
                    f"{' and '.join((*demo[0], demo[1]))} are built from the default corpus automatically"
                )
    if (Path(data_cfg.tokenizer) / MODEL_FILE).is_file():
        check_built_tokenizer(data_cfg)
    else:
        _log(verbose, f"training a tokenizer on {' '.join(data_cfg.corpus)} -> {data_cfg.tokenizer}")
        train_tokenizer(
            data_cfg.corpus,
            data_cfg.tokenizer,
            vocab_size=data_cfg.tokenizer_vocab_size,
            split_digits=data_cfg.tokenizer_split_digits,
        )
    for path in data_cfg.paths:
        if not (Path(path) / MANIFEST).is_file():
            _log(verbose, f"preparing shards of {' '.join(data_cfg.corpus)} -> {path}")
            cfg = PrepareConfig(list(data_cfg.corpus), data_cfg.tokenizer, path, val_fraction=data_cfg.val_fraction)
            prepare(cfg, progress=verbose, verbose=verbose)
