"""Reading corpora: input resolution, formats, and every kind of bad input."""

import gzip
import json
import sysconfig

import pytest

from llm.data.corpus import (
    Corpus,
    CorpusError,
    CorpusStats,
    ReadOptions,
    Segment,
    plan_segments,
    read_segment,
    resolve_inputs,
    stdlib_files,
)


def read_all(paths, opts=None, chunk_bytes=1 << 20):
    opts = opts or ReadOptions()
    stats = CorpusStats()
    docs = list(Corpus([str(p) for p in paths], opts, chunk_bytes).documents(stats))
    return docs, stats


def test_stdlib_is_the_standard_library_source():
    files = stdlib_files()
    names = {f.name for f in files}
    assert {"os.py", "json", "__init__.py"} & names >= {"os.py", "__init__.py"}
    assert len(files) > 500
    assert not any("site-packages" in f.parts for f in files)
    relative = {f.relative_to(sysconfig.get_paths()["stdlib"]).as_posix() for f in files}
    assert "os.py" in relative and "json/__init__.py" in relative and "encodings/utf_8.py" in relative
    assert not {"html/entities.py", "encodings/cp437.py", "pydoc_data/topics.py"} & relative  # tables, generated
    assert not any({"test", "tests", "idle_test"} & set(f.parts) for f in files)
    assert resolve_inputs(["stdlib"]) == sorted(f.resolve() for f in files)


def test_resolve_directory_glob_and_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / ".hidden").write_text("h")
    assert [f.name for f in resolve_inputs([str(tmp_path)])] == ["a.txt", "b.txt"]
    assert [f.name for f in resolve_inputs([str(tmp_path / "**" / "*.txt")])] == ["a.txt", "b.txt"]
    # the same file named twice is read once
    assert len(resolve_inputs([str(tmp_path / "a.txt"), str(tmp_path)])) == 2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing.txt"), "input path does not exist"),
        (lambda p: str(p / "*.nothing"), "input glob matches nothing"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "input directory is empty"),
    ],
)
def test_bad_paths_fail_with_one_line(tmp_path, make, message):
    with pytest.raises(CorpusError, match=message) as e:
        resolve_inputs([make(tmp_path)])
    assert "\n" not in str(e.value)
    with pytest.raises(CorpusError, match="no input given"):
        resolve_inputs([])


def test_jsonl_gzip_and_text_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "three", "meta": 1}) + "\n")
    with gzip.open(tmp_path / "c.txt.gz", "wt") as fh:
        fh.write("four\nstill four\n")
    (tmp_path / "d.md").write_text("five")
    docs, stats = read_all([tmp_path])
    assert docs == ["one", "two", "three", "four\nstill four\n", "five"]
    assert stats.documents == 5 and stats.files == 4


def test_text_field_is_configurable(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    docs, _ = read_all([tmp_path], ReadOptions(text_field="content"))
    assert docs == ["hello"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "x\xff y"}\n{"text": "fine"}\n')
    docs, stats = read_all([tmp_path])
    assert docs == ["x\ufffd y", "fine", "caf\ufffd ok \ufffd\ufffd end"]
    assert stats.invalid_utf8 == 2


def test_lone_surrogate_in_json_is_replaced_and_counted(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "a\\ud800b"}\n')
    docs, stats = read_all([tmp_path])
    assert docs == ["a?b"] and stats.invalid_utf8 == 1
    docs[0].encode("utf-8")


def test_empty_documents_and_binary_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": "kept"}\n')
    (tmp_path / "bin.dat").write_bytes(b"\x7fELF\x00\x01\x02")
    docs, stats = read_all([tmp_path])
    assert docs == ["kept"]
    assert (stats.empty_skipped, stats.binary_skipped, stats.documents) == (3, 1, 1)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("not json", "is not valid JSON"),
        ('{"body": "x"}', "has no 'text' field"),
        ('{"text": 5}', "has a non-string 'text' field"),
        ("[1, 2]", "has no 'text' field"),
    ],
)
def test_bad_jsonl_line_errors_with_location_or_is_skipped(tmp_path, line, problem):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "good"}\n' + line + "\n" + '{"text": "after"}\n')
    with pytest.raises(CorpusError) as e:
        read_all([f])
    assert f"{f}:2: JSONL line {problem}" in str(e.value) and "--skip-bad-lines" in str(e.value)
    docs, stats = read_all([f], ReadOptions(skip_bad_lines=True))
    assert docs == ["good", "after"] and stats.bad_lines_skipped == 1


def test_truncated_gzip_fails_clearly(tmp_path):
    data = gzip.compress(("hello world " * 1000).encode())
    f = tmp_path / "t.txt.gz"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match="truncated or corrupt"):
        read_all([f])


def test_large_jsonl_is_split_at_line_boundaries(tmp_path):
    f = tmp_path / "big.jsonl"
    texts = [f"document number {i} " + "x" * (i % 37) for i in range(500)]
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    items = plan_segments([f], chunk_bytes=1000)
    assert len(items) > 10
    segs = [s for item in items for s in item]
    assert segs[0].start == 0 and segs[-1].end == f.stat().st_size
    assert all(a.end == b.start for a, b in zip(segs[:-1], segs[1:], strict=True))
    stats = CorpusStats()
    docs = [d for s in segs for d in read_segment(s, ReadOptions(), stats)]
    assert docs == texts


def test_error_line_number_is_absolute_in_a_split_file(tmp_path):
    f = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(300)]
    lines[250] = "{broken"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=f"{f}:251: JSONL line is not valid JSON"):
        read_all([f], chunk_bytes=500)


def test_whole_file_segment_reads_everything(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abc")
    assert list(read_segment(Segment(str(f)), ReadOptions(), CorpusStats())) == ["abc"]
