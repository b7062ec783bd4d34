"""Raw text corpora: which files an input names, how they split into work items, how documents are read.

An input PATH is a file, a directory (walked recursively, hidden entries skipped), a glob, or the word
`stdlib`: the Python standard library's modules on this machine, the embedded default corpus (its `.py` files
without the test suites, the generated files and the numeric tables: see `stdlib_files`).

Documents:
- `.jsonl` (and `.jsonl.gz`, `.jsonl.zst`): one JSON object per line; the document is its `text` field
  (configurable). Compressed files are streamed line by line.
- `.parquet`: one document per row, the `text` column (configurable), read a row group at a time (bounded
  memory; large files split into work items by row groups). Null or empty values count as empty documents.
- anything else (and its `.gz` / `.zst`): the whole file is one document.
Files are decoded as UTF-8 with replacement (counted); a plain-text file holding NUL bytes is binary and
skipped (counted); a document that is empty or only whitespace is skipped (counted).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

STDLIB = "stdlib"


def cleaning_record(directory: str | Path) -> Path:
    """Where `python -m llm.data.clean` keeps what it did to the corpus it wrote into `directory`: beside it,
    never inside (the directory holds only documents)."""
    directory = Path(directory)
    return directory.parent / f"{directory.name}.clean"


def cleaning_summaries(inputs: list[str]) -> dict[str, dict]:
    """The cleaning summary of every input directory that `python -m llm.data.clean` wrote, by input."""
    found = {}
    for p in inputs:
        summary = cleaning_record(p) / "summary.json"
        if Path(p).is_dir() and summary.is_file():
            found[p] = json.loads(summary.read_text())
    return found


class CorpusError(ValueError):
    """A corpus input that cannot be read; the message names the input and the fix."""


@dataclass
class CorpusStats:
    """Counts of what reading the corpus kept and skipped; reported by the tools and saved in manifests."""

    files: int = 0
    bytes: int = 0
    documents: int = 0
    empty_skipped: int = 0
    binary_skipped: int = 0
    invalid_utf8: int = 0
    bad_lines_skipped: int = 0

    def add(self, other: CorpusStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return (
            f"{self.documents:,} documents from {self.files:,} files ({self.bytes / 1e6:,.1f} MB); skipped: "
            f"{self.empty_skipped:,} empty, {self.binary_skipped:,} binary files, "
            f"{self.bad_lines_skipped:,} bad JSONL lines; {self.invalid_utf8:,} with invalid UTF-8 (replaced)"
        )


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of one file; `end=None` means the whole file (always so for `.gz` and `.zst`). For a
    `.parquet` file, row groups [start, end)."""

    path: str
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    skip_bad_lines: bool = False


STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
GENERATED = re.compile(r"generated|do not edit", re.IGNORECASE)
MAX_DIGIT_SHARE = 0.08


def is_library_code(path: Path) -> bool:
    """Whether a standard-library `.py` file is written code: not generated (a 'generated' or 'do not edit'
    note in its first 5 lines: codec tables, pydoc's topics, sysconfig data) and not a numeric table (over 8%
    digits: html.entities, the code pages). Written modules stay under 5%."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if GENERATED.search("\n".join(text.splitlines()[:5])):
        return False
    return sum(map(text.count, "0123456789")) <= MAX_DIGIT_SHARE * len(text)


def stdlib_files() -> list[Path]:
    """The modules of this interpreter's standard library, sorted: its `.py` files without site-packages, the
    test suites (test/, tests/, idle_test/: mostly data, numbers and expected outputs) and the files that are
    not written code (`is_library_code`). A model trained on the rest writes Python that reads as Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]  # prune: site-packages can be huge
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    files = sorted(f for f in files if is_library_code(f))
    if not files:
        raise CorpusError(f"no .py files under the standard library at {root}; pass a corpus with --input")
    return files


def _walk(directory: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def resolve_inputs(paths: list[str]) -> list[Path]:
    """Expand every input to a sorted, de-duplicated list of files. Raises CorpusError on a bad input."""
    if not paths:
        raise CorpusError("no input given; pass --input PATH (a file, a directory, a glob, or 'stdlib')")
    files: list[Path] = []
    for p in paths:
        if p == STDLIB:
            files.extend(stdlib_files())
        elif glob.has_magic(p):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise CorpusError(f"input glob matches nothing: {p!r}; check the pattern")
            for m in matches:
                files.extend(_walk(Path(m)) if os.path.isdir(m) else [Path(m)])
        elif os.path.isdir(p):
            found = _walk(Path(p))
            if not found:
                raise CorpusError(f"input directory is empty: {p}; point --input at the corpus files")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(Path(p))
        else:
            raise CorpusError(f"input path does not exist: {p}; check the path (or use 'stdlib')")
    return sorted({f.resolve() for f in files})


def is_jsonl(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst"))


def is_gzip(path: str | Path) -> bool:
    return str(path).lower().endswith(".gz")


def is_zstd(path: str | Path) -> bool:
    return str(path).lower().endswith(".zst")


def is_parquet(path: str | Path) -> bool:
    return str(path).lower().endswith(".parquet")


def is_compressed(path: str | Path) -> bool:
    return is_gzip(path) or is_zstd(path)


def _optional(module: str, suffix: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        package = {"pyarrow.parquet": "pyarrow"}.get(module, module)
        raise CorpusError(f"reading {suffix} files needs {package}: pip install {package}") from None


def _parquet_file(path: str | Path):
    pq = _optional("pyarrow.parquet", ".parquet")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise CorpusError(f"cannot read {path} as Parquet: {e}; the file is truncated or corrupt, replace it") from None


def _parquet_groups(path: Path, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Row-group ranges of about chunk_bytes (uncompressed) each."""
    meta = _parquet_file(path).metadata
    start, size = 0, 0
    for i in range(meta.num_row_groups):
        size += meta.row_group(i).total_byte_size
        if size >= chunk_bytes:
            yield start, i + 1
            start, size = i + 1, 0
    if start < meta.num_row_groups or meta.num_row_groups == 0:
        yield start, meta.num_row_groups


def plan_segments(files: list[Path], chunk_bytes: int = 1 << 20) -> list[list[Segment]]:
    """Group files into work items of about `chunk_bytes`; large uncompressed JSONL files are split at
    line boundaries. The plan is a pure function of the files' contents and sizes."""
    items: list[list[Segment]] = []
    current: list[Segment] = []
    current_bytes = 0

    def flush():
        nonlocal current, current_bytes
        if current:
            items.append(current)
        current, current_bytes = [], 0

    for f in files:
        size = f.stat().st_size
        if is_parquet(f):
            flush()
            items.extend([Segment(str(f), a, b)] for a, b in _parquet_groups(f, chunk_bytes))
            continue
        if is_jsonl(f) and not is_compressed(f) and size > chunk_bytes:
            flush()
            for start, end in _line_ranges(f, size, chunk_bytes):
                items.append([Segment(str(f), start, end)])
            continue
        current.append(Segment(str(f)))
        current_bytes += size
        if current_bytes >= chunk_bytes:
            flush()
    flush()
    return items


def _line_ranges(path: Path, size: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    with open(path, "rb") as fh:
        start = 0
        while start < size:
            fh.seek(min(start + chunk_bytes, size))
            fh.readline()  # advance to the end of the line the target offset falls in
            end = min(fh.tell(), size)
            yield start, end
            start = end


def segment_size(seg: Segment) -> int:
    if is_parquet(seg.path):
        meta = _parquet_file(seg.path).metadata
        return sum(meta.row_group(i).total_byte_size for i in range(seg.start, seg.end))
    if seg.end is None:
        return os.path.getsize(seg.path)
    return seg.end - seg.start


def _unreadable(seg: Segment, e: Exception) -> CorpusError:
    return CorpusError(f"cannot read {seg.path}: {e}; the file is truncated or corrupt, replace or remove it")


def _zstd_chunks(path: str, size: int = 1 << 20) -> Iterator[bytes]:
    """The decompressed content of a `.zst` file, frame after frame; an error if the last frame is cut short
    (a stream reader would end quietly at the truncation)."""
    zstandard = _optional("zstandard", ".zst")
    with open(path, "rb") as fh:
        dobj, pending = zstandard.ZstdDecompressor().decompressobj(), b""
        while chunk := pending or fh.read(size):
            pending = b""
            yield dobj.decompress(chunk)
            if dobj.eof:  # a frame ended: the rest starts the next one
                pending, dobj = dobj.unused_data, zstandard.ZstdDecompressor().decompressobj()
                if not pending and not (pending := fh.read(size)):
                    return
        if not dobj.eof:
            raise EOFError("the zstd stream ends inside a frame")


def _chunks(path: str) -> Iterator[bytes]:
    """The decompressed content of a `.gz` or `.zst` file, in pieces."""
    if is_zstd(path):
        yield from _zstd_chunks(path)
        return
    with gzip.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            yield chunk


def _read_bytes(seg: Segment) -> bytes:
    try:
        if is_compressed(seg.path):
            return b"".join(_chunks(seg.path))
        with open(seg.path, "rb") as fh:
            fh.seek(seg.start)
            return fh.read() if seg.end is None else fh.read(seg.end - seg.start)
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001 - EOFError, OSError, zlib.error, zstandard.ZstdError
        raise _unreadable(seg, e) from None


def _lines(seg: Segment) -> Iterator[bytes]:
    """The lines of a JSONL segment; compressed files streamed, never whole in memory."""
    if not is_compressed(seg.path):
        yield from io.BytesIO(_read_bytes(seg))
        return
    try:
        rest = b""
        for chunk in _chunks(seg.path):
            *lines, rest = (rest + chunk).split(b"\n")
            yield from (line + b"\n" for line in lines)
        if rest:
            yield rest
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001 - as _read_bytes
        raise _unreadable(seg, e) from None


def jsonl_rows(path: str | Path) -> Iterator[dict]:
    """The objects of a JSONL file (plain, .gz or .zst), streamed the way the corpus reads them (a compressed
    file cut short is a CorpusError naming it)."""
    for line in _lines(Segment(str(path))):
        if line.strip():
            yield json.loads(line)


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _line_number(seg: Segment, offset_in_segment: int) -> int:
    if is_compressed(seg.path):
        return -1
    with open(seg.path, "rb") as fh:
        return fh.read(seg.start + offset_in_segment).count(b"\n") + 1


def read_segment(seg: Segment, opts: ReadOptions, stats: CorpusStats) -> Iterator[str]:
    """Yield the non-empty documents of one segment, updating `stats`."""
    if seg.start == 0:
        stats.files += 1
    if is_parquet(seg.path):
        yield from _read_parquet(seg, opts, stats)
        return
    if not is_jsonl(seg.path):
        raw = _read_bytes(seg)
        stats.bytes += len(raw)
        if b"\x00" in raw:
            stats.binary_skipped += 1
            return
        yield from _keep(_decode(raw, stats), stats)
        return
    offset = 0
    for line in _lines(seg):
        stats.bytes += len(line)
        line = line.rstrip(b"\n")
        line_start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        problem = None
        try:
            obj = json.loads(_decode(line, stats))
        except ValueError:
            problem = "is not valid JSON"
        else:
            if not isinstance(obj, dict) or opts.text_field not in obj:
                problem = f"has no {opts.text_field!r} field"
            elif not isinstance(obj[opts.text_field], str):
                problem = f"has a non-string {opts.text_field!r} field"
        if problem is not None:
            if opts.skip_bad_lines:
                stats.bad_lines_skipped += 1
                continue
            where = _line_number(seg, line_start)
            loc = f"{seg.path}:{where}" if where > 0 else f"{seg.path} (byte {line_start} uncompressed)"
            raise CorpusError(
                f"{loc}: JSONL line {problem}; fix it, set --text-field, or pass --skip-bad-lines to skip such lines"
            )
        text = obj[opts.text_field]
        if not _is_encodable(text):
            stats.invalid_utf8 += 1
            text = text.encode("utf-8", errors="replace").decode("utf-8")
        yield from _keep(text, stats)


def _read_parquet(seg: Segment, opts: ReadOptions, stats: CorpusStats) -> Iterator[str]:
    """The text column of row groups [seg.start, seg.end), one batch of rows in memory at a time."""
    pf = _parquet_file(seg.path)
    names = pf.schema_arrow.names
    if opts.text_field not in names:
        raise CorpusError(
            f"{seg.path} has no column {opts.text_field!r} (columns: {', '.join(names)}); set --text-field"
        )
    kind = pf.schema_arrow.field(opts.text_field).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise CorpusError(f"{seg.path}: column {opts.text_field!r} holds {kind}, not text; set --text-field")
    try:
        batches = pf.iter_batches(batch_size=1024, row_groups=range(seg.start, seg.end), columns=[opts.text_field])
        for batch in batches:
            for text in batch.column(0).to_pylist():
                text = text or ""
                stats.bytes += len(text)
                yield from _keep(text, stats)
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged file
        raise _unreadable(seg, e) from None


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes
        return False
    return True


def _keep(text: str, stats: CorpusStats) -> Iterator[str]:
    if text.strip():
        stats.documents += 1
        yield text
    else:
        stats.empty_skipped += 1


@dataclass
class Corpus:
    """A resolved list of input files, planned into work items, and readable document by document."""

    inputs: list[str]
    opts: ReadOptions = field(default_factory=ReadOptions)
    chunk_bytes: int = 1 << 20

    def __post_init__(self):
        self.files = resolve_inputs(self.inputs)
        self.items = plan_segments(self.files, self.chunk_bytes)

    def documents(self, stats: CorpusStats) -> Iterator[str]:
        for item in self.items:
            for seg in item:
                yield from read_segment(seg, self.opts, stats)

    def fingerprint(self) -> list[list]:
        """(path, size, mtime) of every file: what a resumed preparation must find unchanged."""
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]
