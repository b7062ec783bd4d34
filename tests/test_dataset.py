"""Packed windows: coverage, document ids, order, ranks, exact resume on another world size, mixtures."""

import os
import shutil

import numpy as np
import pytest
from conftest import make_docs

from llm.data.dataset import (
    BatchLoader,
    Mixture,
    PackedWindows,
    Permutation,
    TokenStream,
    doc_ids_from_eos,
    open_windows,
)
from llm.data.prepare import PrepareConfig, prepare
from llm.data.shards import ShardError
from llm.data.tokenizer import train_tokenizer

EOS = 3
L = 32


@pytest.fixture(scope="module")
def second_dir(tmp_path_factory, tokenizer_dir):
    src = tmp_path_factory.mktemp("second_src")
    for i, d in enumerate(make_docs(200, seed=7)):
        (src / f"{i}.txt").write_text(d)
    out = tmp_path_factory.mktemp("second") / "data"
    prepare(
        PrepareConfig([str(src)], str(tokenizer_dir), str(out), val_fraction=0.0, workers=1, shard_tokens=5000),
        progress=False,
        verbose=False,
    )
    return out


def stream_of(directory, split="train"):
    s = TokenStream.open(directory, split)
    out = np.empty(len(s), dtype=np.int64)
    s.read(0, len(s), out)
    return s, out


def global_batches(loader, n):
    """n global batches from one loader, each as a (G, L) array of input ids."""
    out = []
    for _ in range(n):
        out.append(np.concatenate([next(loader).input_ids.numpy() for _ in range(loader.grad_accum)]))
    return out


def gather(loaders, n):
    """n global batches assembled from the loaders of every rank (rank order)."""
    per_rank = [global_batches(ld, n) for ld in loaders]
    return [np.concatenate([r[i] for r in per_rank]) for i in range(n)]


def test_stream_reads_across_shard_boundaries(prepared_dir):
    s, flat = stream_of(prepared_dir)
    assert len(s.arrays) > 3
    for start in [0, s.starts[1] - 5, s.starts[2] - 1, len(s) - 40]:
        out = np.empty(40, dtype=np.int64)
        s.read(start, 40, out)
        assert out.tolist() == flat[start : start + 40].tolist()


def test_sequential_windows_tile_the_stream(prepared_dir):
    s, flat = stream_of(prepared_dir)
    w = PackedWindows(s, L, shuffle=False)
    assert w.n == (len(s) - 1) // L
    loader = BatchLoader(w, global_batch=w.n, micro_batch=w.n, eos_id=EOS)
    b = next(loader)
    assert b.input_ids.shape == (w.n, L)
    assert b.input_ids.reshape(-1).tolist() == flat[: w.n * L].tolist()  # no gap, no overlap
    assert b.targets.reshape(-1).tolist() == flat[1 : w.n * L + 1].tolist()  # every next token once


def test_document_ids_follow_eos(prepared_dir):
    w = open_windows([prepared_dir], "train", L, seed=1)
    b = next(BatchLoader(w, 16, 16, EOS))
    x, d = b.input_ids.numpy(), b.doc_ids.numpy()
    assert (x == EOS).any()
    for row in range(16):
        doc = 0
        for t in range(L):
            assert d[row, t] == doc
            doc += int(x[row, t] == EOS)
    assert b.doc_ids.dtype.is_floating_point is False and d.dtype == np.int32
    assert doc_ids_from_eos(np.array([[EOS, 5, EOS, EOS, 7]]), EOS).tolist() == [[0, 1, 1, 2, 3]]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097, 123457])
def test_permutation_is_a_bijection(n):
    p = Permutation(n, key=42)
    out = p(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert (out != np.arange(n)).mean() > 0.9
        assert not np.array_equal(out, Permutation(n, key=43)(np.arange(n)))


def test_each_epoch_visits_every_window_once_in_a_new_order(prepared_dir):
    w = open_windows([prepared_dir], "train", L, seed=3)
    e0 = w.window_ids(np.arange(w.n))
    e1 = w.window_ids(np.arange(w.n, 2 * w.n))
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(w.n))
    assert not np.array_equal(e0, e1)


def test_order_is_a_pure_function_of_seed_and_index(prepared_dir):
    a = global_batches(BatchLoader(open_windows([prepared_dir], "train", L, seed=5), 8, 4, EOS), 6)
    b = global_batches(BatchLoader(open_windows([prepared_dir], "train", L, seed=5), 8, 4, EOS), 6)
    c = global_batches(BatchLoader(open_windows([prepared_dir], "train", L, seed=6), 8, 4, EOS), 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # random access gives the same windows as streaming
    w = open_windows([prepared_dir], "train", L, seed=5)
    out = np.empty((8, L + 1), dtype=np.int64)
    w.tokens(np.arange(40, 48), out)
    assert np.array_equal(out[:, :-1], a[5])


def test_ranks_split_each_global_batch(prepared_dir):
    w = open_windows([prepared_dir], "train", L, seed=0)
    single = global_batches(BatchLoader(w, 12, 3, EOS), 5)
    split = gather([BatchLoader(w, 12, 2, EOS, rank=r, world_size=3) for r in range(3)], 5)
    assert all(np.array_equal(x, y) for x, y in zip(single, split, strict=True))


@pytest.mark.parametrize("world_before, world_after", [(1, 2), (2, 1), (4, 2)])
def test_resume_on_a_different_world_size_continues_the_same_sequence(prepared_dir, world_before, world_after):
    G, N, k, T = 8, 40, 17, 256  # long windows: the run crosses epoch boundaries, before and after resuming
    w = open_windows([prepared_dir], "train", T, seed=11)
    assert N * G > 2 * w.n
    reference = global_batches(BatchLoader(w, G, 2, EOS), N)

    before = [BatchLoader(w, G, 1, EOS, r, world_before) for r in range(world_before)]
    first = gather(before, k)
    states = [ld.state_dict() for ld in before]
    assert all(s == states[0] for s in states) and states[0]["samples"] == k * G

    w2 = open_windows([prepared_dir], "train", T, seed=11)  # as in a fresh process
    after = [BatchLoader(w2, G, 2, EOS, r, world_after) for r in range(world_after)]
    for ld in after:
        ld.load_state_dict(states[0])
    rest = gather(after, N - k)
    assert all(np.array_equal(x, y) for x, y in zip(reference, first + rest, strict=True))


def test_state_is_only_saved_between_global_batches_and_must_match_the_data(prepared_dir):
    w = open_windows([prepared_dir], "train", L, seed=0)
    ld = BatchLoader(w, 8, 4, EOS)
    next(ld)
    with pytest.raises(RuntimeError, match="between global batches"):
        ld.state_dict()
    next(ld)
    state = ld.state_dict()
    other = BatchLoader(open_windows([prepared_dir], "train", L + 1, seed=0), 8, 4, EOS)
    with pytest.raises(ShardError, match="saved data cursor belongs to different data"):
        other.load_state_dict(state)


def test_bad_batch_geometry():
    class W:
        seq_len = 4

    with pytest.raises(ValueError, match="global batch 10 is not divisible by micro_batch 4 x world_size 1"):
        BatchLoader(W(), 10, 4, EOS)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        BatchLoader(W(), 8, 4, EOS, rank=2, world_size=2)


def test_seq_len_longer_than_the_split(prepared_dir):
    with pytest.raises(ShardError, match=r"fewer than seq_len \+ 1 = 1000001; lower seq_len"):
        open_windows([prepared_dir], "val", 1_000_000)


def test_mixture_proportions_match_the_weights(prepared_dir, second_dir):
    m = open_windows([prepared_dir, second_dir], "train", L, seed=2, weights=[0.7, 0.3])
    assert isinstance(m, Mixture) and m.block == 1024
    n = 10 * m.block
    src, idx = m.source_of(np.arange(n))
    assert np.bincount(src).tolist() == [7170, 3070]  # 717 and 307 per block of 1024
    assert abs((src == 0).mean() - 0.7) < 1 / m.block
    for i in range(2):  # each source is read in its own order without skipping or repeating
        assert sorted(idx[src == i].tolist()) == list(range(int((src == i).sum())))
    # within a block the sources are interleaved, not in runs
    assert (np.diff(src[: m.block]) != 0).sum() > 200
    # a mixture sample is exactly that source's sample
    out = np.empty((50, L + 1), dtype=np.int64)
    m.tokens(np.arange(50), out)
    for row in range(50):
        one = np.empty((1, L + 1), dtype=np.int64)
        m.sources[src[row]].tokens(idx[row : row + 1], one)
        assert np.array_equal(out[row], one[0])


def test_mixture_small_weights_get_a_larger_block(prepared_dir, second_dir):
    m = open_windows([prepared_dir, second_dir], "train", L, weights=[999, 1])
    src, _ = m.source_of(np.arange(m.block * 3))
    assert m.block == 100_000 and np.bincount(src).tolist() == [299_700, 300]


def test_mixture_from_different_tokenizers_is_refused(tmp_path, prepared_dir, corpus_dir):
    tok = train_tokenizer([str(corpus_dir)], tmp_path / "tok", vocab_size=420)
    other = tmp_path / "other"
    prepare(
        PrepareConfig([str(corpus_dir)], str(tmp_path / "tok"), str(other), workers=1), progress=False, verbose=False
    )
    with pytest.raises(ShardError, match=f"different tokenizers: .* has sha256 .*, .*other has {tok.sha256}"):
        open_windows([prepared_dir, other], "train", L, weights=[1, 1])


def test_bad_mixture_weights(prepared_dir, second_dir):
    with pytest.raises(ValueError, match="weights must be positive"):
        open_windows([prepared_dir, second_dir], "train", L, weights=[1, 0])
    with pytest.raises(ValueError, match="one weight per source"):
        open_windows([prepared_dir, second_dir], "train", L, weights=[1])


def test_the_data_cursor_follows_the_content_not_the_path(tmp_path, prepared_dir, second_dir):
    ld = BatchLoader(open_windows([prepared_dir], "train", L, seed=0), 8, 4, EOS)
    next(ld), next(ld)
    state = ld.state_dict()
    expected = global_batches(ld, 3)  # what follows in the original place
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(prepared_dir, moved)
    relative = os.path.relpath(moved)  # another spelling of the same place
    for path in (moved, relative):
        resumed = BatchLoader(open_windows([path], "train", L, seed=0), 8, 4, EOS)
        resumed.load_state_dict(state)
        assert resumed.samples == 8
        got = global_batches(resumed, 3)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    other = BatchLoader(open_windows([second_dir], "train", L, seed=0), 8, 4, EOS)
    with pytest.raises(ShardError, match="saved data cursor belongs to different data"):
        other.load_state_dict(state)


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_shard_and_offset(tmp_path, prepared_dir, cfg_factory):
    # bytes changed in place (the size kept): the id there is past the vocabulary; the embedding would fail
    # with an IndexError naming nothing. Every id of every window the run reads is checked (one max a batch)
    from llm.train import train

    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    cfg = cfg_factory("bad-ids", data={"paths": [str(data)]})
    first = open_windows([data], "train", cfg.data.seq_len, seed=cfg.train.seed)  # what the run reads first
    shard, offset = first.locate(0, 5)
    tokens = np.fromfile(shard, dtype="<u2")
    tokens[offset] = 600 + 5  # the tokenizer has 600 ids
    tokens.tofile(shard)
    with pytest.raises(ShardError) as e:
        train(cfg)
    assert str(e.value) == (
        f"{shard}: token {offset:,} is id 605, outside the tokenizer's 600 ids: the shard was changed after it "
        "was written; find such damage with `python -m llm.data.prepare_data --verify` and re-prepare the data"
    )
    assert not (tmp_path / "runs" / "bad-ids" / "checkpoints").exists()  # stopped at the first batch
