"""The shard format: flat little-endian token files plus a manifest that describes and checksums them.

A prepared data directory holds `train_00000.bin ...`, `val_00000.bin ...` and `manifest.json`:
```
{"format": "llm-shards/1", "dtype": "uint16",
 "tokenizer": {"sha256": ..., "vocab_size": ..., "eos_id": ...},
 "splits": {"train": {"tokens": N, "documents": D,
                      "shards": [{"file": "train_00000.bin", "tokens": n, "documents": d,
                                  "dtype": "uint16", "sha256": ...}, ...]},
            "val": {...}},
 "stats": {...}, "fingerprint": {...}, "command": [...], "created": "..."}
```
Every document in a split's stream is followed by EOS; documents may continue across shard boundaries.
The manifest is written last and atomically: a directory without one is not a dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from llm.data.files import atomic_write_json, sha256_file

FORMAT = "llm-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class ShardError(ValueError):
    """A prepared dataset that is missing, incomplete, corrupt or mismatched; the message says the fix."""


def dtype_for_vocab(vocab_size: int, requested: str = "auto") -> str:
    """The token dtype name: uint16 when every id fits, else uint32."""
    if requested == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if requested not in DTYPES:
        raise ShardError(f"unknown token dtype {requested!r}; choose auto, uint16 or uint32")
    if requested == "uint16" and vocab_size > 1 << 16:
        raise ShardError(
            f"a vocabulary of {vocab_size:,} ids does not fit uint16 (at most 65,536); use --dtype uint32 or auto"
        )
    return requested


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def write_shard(directory: Path, split: str, index: int, tokens: np.ndarray, eos_id: int) -> dict:
    """Write one shard atomically (temp file, fsync, rename) and return its manifest entry."""
    name = shard_name(split, index)
    path = directory / name
    tmp = path.with_name(name + ".tmp")
    data = np.ascontiguousarray(tokens).astype(tokens.dtype.newbyteorder("<"), copy=False)
    with open(tmp, "wb") as fh:
        fh.write(data.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {
        "file": name,
        "tokens": int(tokens.size),
        "documents": int(np.count_nonzero(tokens == eos_id)),
        "dtype": tokens.dtype.name,
        "sha256": sha256_file(path),
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write_json(directory / MANIFEST, manifest)


def read_manifest(directory: str | Path) -> dict:
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        if not d.is_dir():
            raise ShardError(f"data directory does not exist: {d}; prepare it with python -m llm.data.prepare_data")
        hint = (
            " (an interrupted preparation: rerun the same python -m llm.data.prepare_data command to resume)"
            if any(d.glob(".prepare_state*"))
            else ""
        )
        raise ShardError(f"{path} is missing{hint}; prepare the data with python -m llm.data.prepare_data")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ShardError(
            f"{path} is not valid JSON ({e}); rerun python -m llm.data.prepare_data into a fresh directory"
        ) from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; re-prepare the data")
    return manifest


def check_tokenizer(manifest: dict, directory: str | Path, tokenizer_sha256: str | None) -> None:
    have = manifest["tokenizer"]["sha256"]
    if tokenizer_sha256 is not None and have != tokenizer_sha256:
        raise ShardError(
            f"{directory} was tokenized with tokenizer sha256 {have}, but the tokenizer in use has sha256 "
            f"{tokenizer_sha256}; use the matching tokenizer or re-prepare the data with this one"
        )


def open_split(directory: str | Path, split: str, tokenizer_sha256: str | None = None) -> list[np.ndarray]:
    """Memory-map every shard of a split after checking the manifest, the tokenizer and each file's size."""
    d = Path(directory)
    manifest = read_manifest(d)
    check_tokenizer(manifest, d, tokenizer_sha256)
    if split not in manifest["splits"]:
        raise ShardError(f"{d} has no {split!r} split; splits: {', '.join(manifest['splits'])}")
    arrays = []
    for entry in manifest["splits"][split]["shards"]:
        path = d / entry["file"]
        dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
        expected = entry["tokens"] * dtype.itemsize
        if not path.is_file():
            raise ShardError(f"shard missing: {path}; re-prepare the data (python -m llm.data.prepare_data)")
        size = path.stat().st_size
        if size != expected:
            raise ShardError(
                f"shard {path} is {size:,} bytes but the manifest says {expected:,}: truncated or replaced; "
                "check it with `python -m llm.data.prepare_data --verify` and re-prepare the data"
            )
        if entry["tokens"]:
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return arrays


def verify(directory: str | Path) -> list[str]:
    """Re-check every shard's size and sha256 against the manifest; return one line per problem."""
    d = Path(directory)
    manifest = read_manifest(d)
    problems = []
    for split, info in manifest["splits"].items():
        for entry in info["shards"]:
            path = d / entry["file"]
            if not path.is_file():
                problems.append(f"{split} shard {entry['file']}: missing")
                continue
            expected = entry["tokens"] * np.dtype(DTYPES[entry["dtype"]]).itemsize
            size = path.stat().st_size
            if size != expected:
                problems.append(f"{split} shard {entry['file']}: {size:,} bytes, expected {expected:,} (truncated)")
                continue
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                problems.append(
                    f"{split} shard {entry['file']}: sha256 {digest} does not match the manifest's {entry['sha256']}"
                )
    return problems
