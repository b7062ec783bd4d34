"""The SentencePiece tokenizer: training, loading with an integrity check, encode and decode.

A tokenizer directory holds `tokenizer.model` (the SentencePiece model) and `tokenizer.json` (vocab size,
special ids, model type, the model file's sha256, and what it was trained on). Settings that matter:
- byte fallback: a character outside the vocabulary becomes its UTF-8 bytes, so no text is unrepresentable;
- identity normalisation, no dummy prefix, no whitespace collapsing, "\n" a piece of its own: decode(encode(s))
  == s for every string (code keeps its indentation and newlines);
- digits are split one per token.
Training reads the corpus line by line and SentencePiece keeps a uniform sample of `input_sentence_size`
lines (reservoir sampling), so memory is bounded by that sample whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from llm.data.corpus import Corpus, CorpusError, CorpusStats, ReadOptions
from llm.data.files import atomic_write, atomic_write_json, sha256_file

MODEL_FILE = "tokenizer.model"
SIDECAR_FILE = "tokenizer.json"
FORMAT = "llm-tokenizer/1"
SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
MODEL_TYPES = ("bpe", "unigram", "char")
# SentencePiece skips longer training lines; longer lines are cut into pieces of this many characters.
MAX_SENTENCE_CHARS = 4096


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded; the message names the problem and the fix."""


@dataclass
class Tokenizer:
    """A loaded SentencePiece model with its sidecar metadata."""

    directory: Path
    sp: spm.SentencePieceProcessor
    meta: dict

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        d = Path(directory)
        model, sidecar = d / MODEL_FILE, d / SIDECAR_FILE
        if model.is_file() and (d / "tokenizer_config.json").is_file():  # a transformers export (llm/model/hf.py)
            return cls.from_model_file(model)
        for f in (model, sidecar):
            if not f.is_file():
                raise TokenizerError(f"tokenizer file missing: {f}; train one with python -m llm.data.train_tokenizer")
        try:
            meta = json.loads(sidecar.read_text())
        except ValueError as e:
            raise TokenizerError(
                f"{sidecar} is not valid JSON ({e}); retrain with python -m llm.data.train_tokenizer"
            ) from None
        digest = sha256_file(model)
        if meta.get("sha256") != digest:
            raise TokenizerError(
                f"{model} has sha256 {digest} but {sidecar} records {meta.get('sha256')}: the two files are "
                "from different trainings; retrain with python -m llm.data.train_tokenizer"
            )
        sp = spm.SentencePieceProcessor(model_file=str(model))
        return cls(d, sp, meta)

    @classmethod
    def from_model_file(cls, model: str | Path) -> Tokenizer:
        """A bare SentencePiece model file (e.g. beside a transformers export), without our sidecar."""
        model = Path(model)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        meta = {"format": FORMAT, "model_file": model.name, "sha256": sha256_file(model), "vocab_size": sp.vocab_size()}
        return cls(model.parent, sp, meta)

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts; parallelism is the caller's (one thread by default, so that worker
        processes do not oversubscribe the cores)."""
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _sentences(docs: Iterator[str]) -> Iterator[str]:
    """Training sentences: the non-empty lines of each document (whitespace-only ones too: a line holding only a
    form feed or indentation is text a tokenizer must know), long lines cut into pieces."""
    for doc in docs:
        for line in doc.split("\n"):
            if not line:
                continue
            for i in range(0, len(line), MAX_SENTENCE_CHARS):
                yield line[i : i + MAX_SENTENCE_CHARS]


def train_tokenizer(
    inputs: list[str],
    output: str | Path,
    vocab_size: int | None = None,
    model_type: str = "bpe",
    text_field: str = "text",
    skip_bad_lines: bool = False,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    seed: int = 0,
    num_threads: int | None = None,
    byte_fallback: bool | None = None,
    split_digits: bool = True,
) -> Tokenizer:
    """Train a SentencePiece model on `inputs` and write it (with its sidecar) to `output`.

    bpe / unigram: `vocab_size` pieces (default 8192). char: every character of the sampled lines that
    `character_coverage` keeps, plus the special ids; `vocab_size` is then only a check (an error if the
    alphabet needs more). Byte fallback (unknown characters become their UTF-8 bytes, so no text is
    unrepresentable) is on, except for char at coverage 1.0 (or `byte_fallback=False`): a true character
    vocabulary, where a character outside the training text maps to `unk` (counted by the shard preparation).
    `split_digits` makes every digit its own piece (as Llama's tokenizer does: numbers stay comparable digit by
    digit); off, numbers merge like any text (a small model then rarely gets stuck continuing a number)."""
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    char = model_type == "char"
    if byte_fallback is None:
        byte_fallback = not (char and character_coverage >= 1.0)
    size = 8192 if vocab_size is None else vocab_size  # char: only a check, after training
    _check_vocab_size(size, char, byte_fallback)
    stats = CorpusStats()
    counted = _count(_sentences(Corpus(inputs, ReadOptions(text_field, skip_bad_lines)).documents(stats)))
    spm.set_random_generator_seed(seed)
    options = {
        "vocab_size": 1 << 16 if char else size,  # char: the alphabet decides (hard_vocab_limit off)
        "hard_vocab_limit": not char,
        "model_type": model_type,
        "byte_fallback": byte_fallback,
        "split_digits": split_digits,
        "input_sentence_size": input_sentence_size,
        "character_coverage": character_coverage,
        "num_threads": num_threads or os.cpu_count() or 1,
    }
    model_bytes = _train_sentencepiece(counted, stats, options)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    if char and vocab_size is not None and sp.vocab_size() > vocab_size:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is below this corpus's character vocabulary ({sp.vocab_size()} ids with the "
            "special ones): a char tokenizer keeps every character; leave --vocab-size out or raise it"
        )
    record = {
        "requested_vocab_size": vocab_size,
        "input_sentence_size": input_sentence_size,
        "character_coverage": character_coverage,
        "seed": seed,
        "text_field": text_field,
        "split_digits": split_digits,
    }
    trained_on = {"inputs": list(inputs), "sentences": counted.n, **stats.as_dict()}
    return _save(Path(output), model_bytes, model_type, byte_fallback, record, trained_on)


def _save(out: Path, model_bytes: bytes, model_type: str, byte_fallback: bool, options: dict, trained_on: dict):
    """Write the model and its sidecar (what it is, how it was trained, its sha256); load them back."""
    meta = {
        "format": FORMAT,
        "model_file": MODEL_FILE,
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "vocab_size": spm.SentencePieceProcessor(model_proto=model_bytes).vocab_size(),
        "model_type": model_type,
        **SPECIAL_IDS,
        "byte_fallback": byte_fallback,
        "options": options,
        "trained_on": trained_on,
        "sentencepiece_version": spm.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MODEL_FILE, model_bytes)
    atomic_write_json(out / SIDECAR_FILE, meta)
    return Tokenizer.load(out)


def _check_vocab_size(vocab_size: int, char: bool, byte_fallback: bool) -> None:
    min_vocab = 256 + len(SPECIAL_IDS) + 1 if byte_fallback else len(SPECIAL_IDS) + 2  # bytes, specials, "\n"
    if not char and vocab_size <= min_vocab:
        what = "byte fallback alone needs" if byte_fallback else "the special ids and a character need"
        raise TokenizerError(f"vocab size {vocab_size} is too small: {what} more than {min_vocab}")


def _train_sentencepiece(sentences: _count, stats: CorpusStats, options: dict) -> bytes:
    """The serialized model SentencePiece trains on `sentences` with our fixed settings and `options`; its
    failures (and the corpus's, which its callback would lose) as one-line errors."""
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=writer,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            shuffle_input_sentence=True,
            max_sentence_length=4 * MAX_SENTENCE_CHARS,  # bytes; a UTF-8 character takes at most 4
            minloglevel=2,
            **options,
            **SPECIAL_IDS,
        )
    except RuntimeError as e:
        if sentences.error is not None:
            raise sentences.error from None
        if stats.documents == 0:
            raise TokenizerError(f"the corpus has no documents ({stats.summary()}); check --input") from None
        msg = str(e).split("] ")[-1].strip()
        raise TokenizerError(f"SentencePiece training failed: {msg}") from None
    if sentences.error is not None:
        raise sentences.error
    if stats.documents == 0:
        raise TokenizerError(f"the corpus has no documents ({stats.summary()}); check --input")
    return writer.getvalue()


class _count:
    """An iterator wrapper that counts what passes through and keeps a CorpusError for the caller
    (an exception raised inside SentencePiece's callback would lose its message)."""

    def __init__(self, it: Iterator[str]):
        self.it, self.n, self.error = it, 0, None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            item = next(self.it)
        except CorpusError as e:
            self.error = e
            raise StopIteration from None
        self.n += 1
        return item
