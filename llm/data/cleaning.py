"""The pipeline steps of `python -m llm.data.clean` that datatrove does not have: our corpus reader as a datatrove
reader, a fast word splitter for MinHash, the code profile's filters, and a reader of exactly one task's file.
Imports datatrove (the `data` extra): only llm/data/clean.py imports this module, once it has checked the extra
is installed."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.word_tokenizers import WordTokenizer

from llm.data.corpus import Corpus, CorpusStats, ReadOptions, read_segment
from llm.data.files import atomic_write, atomic_write_json

WORK_ITEM_BYTES = 1 << 16  # the corpus's work items, dealt round-robin to the tasks


class CorpusReader(PipelineStep):
    """Every format our corpus reader takes (text files, JSONL, Parquet, .gz, .zst; `stdlib`), as datatrove
    documents: task `rank` reads work items rank, rank + tasks, ... of the corpus's plan (whole files or
    pieces of large ones: the same plan `prepare` uses). Each task writes what it read and skipped to
    `stats_dir/<rank>.json` (CorpusStats), so the run's accounting starts from the documents read, and the
    documents' lengths in characters to `stats_dir/<rank>.lengths` (int64) for the report."""

    name = "llm corpus"
    type = "📖 - READER"

    def __init__(self, inputs: list[str], opts: ReadOptions, stats_dir: str):
        super().__init__()
        self.inputs, self.opts, self.stats_dir = list(inputs), opts, stats_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        corpus, stats, lengths = Corpus(self.inputs, self.opts, WORK_ITEM_BYTES), CorpusStats(), []
        for item in corpus.items[rank::world_size]:
            for seg in item:
                for n, text in enumerate(read_segment(seg, self.opts, stats)):
                    self.stat_update("documents")
                    lengths.append(len(text))
                    yield Document(text=text, id=f"{seg.path}:{seg.start}:{n}", metadata={"source": seg.path})
        folder = Path(self.stats_dir)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{rank:05d}.lengths", np.asarray(lengths, dtype=np.int64).tobytes())  # for the report
        atomic_write_json(folder / f"{rank:05d}.json", stats.as_dict())


class TaskFileReader(PipelineStep):
    """The documents of `folder/<rank>.jsonl.zst` (what task `rank` of the filter stage wrote), in order; none
    when that task kept nothing. MinHash's filter stage must see each task's documents exactly as its
    signature stage saw them: datatrove's own reader hands out whichever files exist, so a task that wrote
    no file would shift every later task onto another's documents."""

    name = "llm task file"
    type = "📖 - READER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.folder) / f"{rank:05d}.jsonl.zst"
        if not path.is_file():
            return
        for row in read_jsonl_zst(path):
            self.stat_update("documents")
            yield Document(text=row["text"], id=row["id"], metadata=row.get("metadata") or {})


def read_jsonl_zst(path: Path):
    """The rows of a .jsonl.zst file, streamed."""
    import io

    import zstandard

    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as fh:
        for line in io.TextIOWrapper(fh, encoding="utf-8"):
            yield json.loads(line)


WORD = re.compile(r"\w+", re.UNICODE)


class RegexWords(WordTokenizer):
    """Words as runs of letters, digits and underscores: what MinHash shingles are built from. spaCy's
    English splitter (datatrove's default) was 3.8x slower on code and needs a model package."""

    def __init__(self):
        super().__init__("regex")

    def word_tokenize(self, text: str) -> list[str]:
        return WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in re.split(r"(?<=[.!?])\s+|\n{2,}", text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in WORD.finditer(text)]


@dataclass(frozen=True)
class CodeRules:
    """The code profile's thresholds; defaults are those The Stack / StarCoder's data used."""

    max_line_length: int = 1000  # a longer line: minified or generated, or data
    max_mean_line_length: float = 100.0
    min_alphanumeric: float = 0.25  # share of letters and digits among all characters
    max_digit_share: float = 0.5  # share of digits among letters and digits: a table of numbers posing as code
    header_lines: int = 5  # where auto-generated markers are looked for


GENERATED = re.compile(r"auto-?generated|do not edit|generated by", re.IGNORECASE)


class CodeFilter(BaseFilter):
    """Drops what is not hand-written source code, with the reason: long_line, long_mean_line, low_alphanumeric,
    auto_generated, numeric_data (each counted as dropped_<reason> in the run's statistics)."""

    name = "llm code filter"

    def __init__(self, rules: CodeRules = CodeRules(), exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.rules = rules

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text, r = doc.text, self.rules
        lines = text.splitlines() or [""]
        if max(len(line) for line in lines) > r.max_line_length:
            return False, "long_line"
        if len(text) / len(lines) > r.max_mean_line_length:
            return False, "long_mean_line"
        alnum = sum(c.isalnum() for c in text)
        if alnum < r.min_alphanumeric * len(text):
            return False, "low_alphanumeric"
        if GENERATED.search("\n".join(lines[: r.header_lines])):
            return False, "auto_generated"
        if sum(c.isdigit() for c in text) > r.max_digit_share * alnum:
            return False, "numeric_data"
        return True
