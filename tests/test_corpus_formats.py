"""Corpora in the formats public datasets ship: Parquet (a `text` column, read a row group at a time) and
zstd-compressed JSONL or text, through the tokenizer trainer and the shard preparation, with one-line errors
for a damaged file or a missing column."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import make_docs

from llm.data.corpus import Corpus, CorpusError, CorpusStats, ReadOptions, plan_segments, read_segment
from llm.data.prepare import PrepareConfig, prepare
from llm.data.shards import open_split, read_manifest
from llm.data.tokenizer import train_tokenizer

DOCS = make_docs(120, seed=3)


def read_all(paths, opts=None, chunk_bytes=1 << 20):
    stats = CorpusStats()
    return list(Corpus([str(p) for p in paths], opts or ReadOptions(), chunk_bytes).documents(stats)), stats


def write_parquet(path, texts, row_group_size=16, column="text", **extra):
    table = pa.table({"id": list(range(len(texts))), column: texts, **extra})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def jsonl(texts) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def test_parquet_rows_are_documents_read_a_few_row_groups_at_a_time(tmp_path):
    texts = [*DOCS[:50], None, "", "   ", *DOCS[50:]]
    f = write_parquet(tmp_path / "c.parquet", texts)
    items = plan_segments([f], chunk_bytes=2000)
    assert len(items) > 3 and all(len(item) == 1 for item in items)  # work items of whole row groups
    segs = [item[0] for item in items]
    assert segs[0].start == 0 and segs[-1].end == pq.ParquetFile(f).metadata.num_row_groups
    assert all(a.end == b.start for a, b in zip(segs[:-1], segs[1:], strict=True))
    stats = CorpusStats()
    assert [d for s in segs for d in read_segment(s, ReadOptions(), stats)] == DOCS  # in order, none twice
    assert stats.files == 1 and stats.documents == 120 and stats.empty_skipped == 3  # null, "", spaces
    docs, _ = read_all([write_parquet(tmp_path / "b.parquet", DOCS[:5], column="content")], ReadOptions("content"))
    assert docs == DOCS[:5]


def test_zstd_jsonl_and_text_read_as_their_uncompressed_forms(tmp_path):
    data = jsonl(DOCS)
    one = zstandard.ZstdCompressor().compress(data)
    frames = b"".join(zstandard.ZstdCompressor().compress(part) for part in (data[:999], data[999:]))
    (tmp_path / "a.jsonl.zst").write_bytes(one)
    (tmp_path / "b.jsonl.zst").write_bytes(frames)  # a line cut across two frames
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(DOCS[0].encode()))
    (tmp_path / "d.jsonl").write_bytes(data)
    for name in ("a.jsonl.zst", "b.jsonl.zst"):
        docs, stats = read_all([tmp_path / name])
        assert docs == DOCS and stats.bytes == len(data), name
    assert read_all([tmp_path / "c.txt.zst"])[0] == [DOCS[0]]
    assert read_all([tmp_path / "d.jsonl"]) == read_all([tmp_path / "a.jsonl.zst"])


def test_damaged_files_and_missing_columns_fail_in_one_line_naming_the_file(tmp_path):
    packed = zstandard.ZstdCompressor().compress(jsonl(DOCS))
    cut = tmp_path / "cut.jsonl.zst"
    for end in (len(packed) // 2, len(packed) - 3):
        cut.write_bytes(packed[:end])
        with pytest.raises(CorpusError, match=f"cannot read {cut}: .*truncated or corrupt"):
            read_all([cut])
    f = write_parquet(tmp_path / "c.parquet", DOCS[:20], column="body", lang=["en"] * 20)
    with pytest.raises(CorpusError, match=rf"{f} has no column 'text' \(columns: id, body, lang\); set --text-field"):
        read_all([f])
    with pytest.raises(CorpusError, match="column 'id' holds int64, not text; set --text-field"):
        read_all([f], ReadOptions("id"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorpusError, match=f"cannot read {broken} as Parquet: .*truncated or corrupt") as e:
        read_all([broken])
    assert "\n" not in str(e.value)


def test_the_tokenizer_and_the_shards_take_parquet_and_zstd(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_parquet(corpus / "a.parquet", DOCS[:60])
    (corpus / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS[60:])))
    tok = train_tokenizer([str(corpus)], tmp_path / "tok", vocab_size=400)
    cfg = PrepareConfig([str(corpus)], str(tmp_path / "tok"), str(tmp_path / "out"), val_fraction=0.1, workers=1)
    prepare(cfg, progress=False, verbose=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["stats"]["documents"] == 120 and manifest["stats"]["files"] == 2
    tokens = np.concatenate([*open_split(tmp_path / "out", "train"), *open_split(tmp_path / "out", "val")])
    assert int((tokens == tok.eos_id).sum()) == 120


def test_corrupt_gzip_zstd_and_parquet_fail_in_one_line_naming_the_file(tmp_path):
    def flipped(data: bytes, at: float) -> bytes:  # 64 bytes inverted, the size kept
        out, m = bytearray(data), int(len(data) * at)
        out[m : m + 64] = bytes(b ^ 0xFF for b in out[m : m + 64])
        return bytes(out)

    packed = {
        "a.jsonl.gz": gzip.compress(jsonl(DOCS)),
        "b.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl(DOCS)),
        # snappy-compressed pages (pyarrow's default): damage inside them is detected; bytes that no read uses
        # (and, without page checksums, plain uncompressed pages) cannot be
        "c.parquet": write_parquet(tmp_path / "c.parquet", DOCS[:50]).read_bytes(),
    }
    for name, data in packed.items():
        for at in (0.3, 0.5):
            path = tmp_path / name
            path.write_bytes(flipped(data, at))
            with pytest.raises(CorpusError, match=rf"cannot read {path}: .*the file is truncated or corrupt") as e:
                read_all([path])
            assert "\n" not in str(e.value)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed["a.jsonl.gz"][: len(packed["a.jsonl.gz"]) // 2])
    with pytest.raises(CorpusError, match=rf"cannot read {cut}: Compressed file ended before the end-of-stream"):
        read_all([cut])
