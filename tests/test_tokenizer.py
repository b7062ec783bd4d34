"""The SentencePiece tokenizer: round trips, special ids, the sidecar, integrity and bad input."""

import json

import pytest
from conftest import STDLIB_JSON

from llm.data.corpus import CorpusError
from llm.data.files import sha256_file
from llm.data.tokenizer import SPECIAL_IDS, Tokenizer, TokenizerError, train_tokenizer

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "\tmixed\t tabs  and   spaces \n\n\n",
    "naïve café, 日本語のテキスト, Ωμέγα, emoji 🎉🚀, math ∑∫√",
    "digits 1234567890 and 3.14159",
    "",
    " leading space and trailing space ",
    "\u200bzero width\u00a0nbsp",
    "never seen: ᚠᛇᚻ ꦲꦏ 𓀀",
]


def test_round_trip_is_exact(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert [tok.decode(x) for x in tok.encode_batch(SAMPLES)] == SAMPLES


def test_invalid_bytes_round_trip_through_replacement(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    raw = b"ok \xff\xfe bad \xc3 tail"
    text = raw.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(text)) == text


def test_unknown_characters_use_byte_fallback_not_unk(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    ids = tok.encode("𓀀")
    assert tok.sp.unk_id() not in ids
    assert [tok.sp.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x93>", "<0x80>", "<0x80>"]


def test_digits_are_split_and_newline_is_a_piece(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("x 2024\n")]
    assert "2" in pieces and "0" in pieces and not any(len(p) > 1 and p.isdigit() for p in pieces)
    assert "\n" in pieces


def test_numbers_merge_when_digits_are_not_split(tmp_path):
    # the corpus repeats a few numbers: with split_digits off they become pieces of their own (the demo's
    # tokenizer); the option is recorded in the sidecar and the text still round-trips
    (tmp_path / "c.txt").write_text("".join(f"x = {n} + {n}\n" for n in (2024, 1000, 65535) for _ in range(200)))
    merged = train_tokenizer([str(tmp_path / "c.txt")], tmp_path / "t", vocab_size=280, split_digits=False)
    pieces = [merged.sp.id_to_piece(i) for i in merged.encode("x = 2024\n")]
    assert any(len(p) > 1 and p.isdigit() for p in pieces), pieces
    assert merged.meta["options"]["split_digits"] is False and merged.decode(merged.encode("y = 65535")) == "y = 65535"


def test_special_ids_and_sidecar(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    assert (tok.pad_id, tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    meta = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert meta["sha256"] == sha256_file(tokenizer_dir / "tokenizer.model") == tok.sha256
    assert meta["vocab_size"] == tok.vocab_size == 600
    assert meta["model_type"] == "bpe" and meta["byte_fallback"] is True
    assert {k: meta[k] for k in SPECIAL_IDS} == SPECIAL_IDS
    assert meta["trained_on"]["documents"] > 300 and meta["trained_on"]["sentences"] > 1000
    # EOS never comes out of ordinary text, even text that spells a control piece
    assert tok.eos_id not in tok.encode("</s> <s> <pad> <unk>")


@pytest.mark.parametrize("model_type", ["unigram", "char"])
def test_other_model_types_round_trip(tmp_path, corpus_dir, model_type):
    tok = train_tokenizer([str(corpus_dir), STDLIB_JSON], tmp_path, vocab_size=400, model_type=model_type)
    assert tok.meta["model_type"] == model_type
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_training_is_deterministic(tmp_path, corpus_dir):
    a = train_tokenizer([str(corpus_dir)], tmp_path / "a", vocab_size=420)
    b = train_tokenizer([str(corpus_dir)], tmp_path / "b", vocab_size=420)
    assert a.sha256 == b.sha256


def test_sentence_sample_bounds_training_input(tmp_path):
    tok = train_tokenizer([STDLIB_JSON], tmp_path, vocab_size=400, input_sentence_size=500)
    assert tok.meta["trained_on"]["sentences"] > 500  # it read everything, SentencePiece sampled 500


def test_mismatched_model_and_sidecar_is_an_error(tmp_path, corpus_dir):
    a = train_tokenizer([str(corpus_dir)], tmp_path / "a", vocab_size=400)
    b = train_tokenizer([STDLIB_JSON], tmp_path / "b", vocab_size=400)
    (tmp_path / "a" / "tokenizer.model").write_bytes((b.directory / "tokenizer.model").read_bytes())
    with pytest.raises(TokenizerError, match=f"sha256 {b.sha256} but .* records {a.sha256}"):
        Tokenizer.load(tmp_path / "a")


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file missing: .*tokenizer.model; train one"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize(
    "vocab, model_type, message",
    [(100, "bpe", "too small"), (50000, "bpe", "Vocabulary size too high"), (600, "wordpiece", "unknown model type")],
)
def test_bad_training_options(tmp_path, corpus_dir, vocab, model_type, message):
    with pytest.raises(TokenizerError, match=message) as e:
        train_tokenizer([str(corpus_dir)], tmp_path, vocab_size=vocab, model_type=model_type)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "tokenizer.model").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(TokenizerError, match="the corpus has no documents"):
        train_tokenizer([str(tmp_path / "empty.txt")], tmp_path / "out", vocab_size=400)


def test_corpus_error_surfaces_from_inside_training(tmp_path, corpus_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2: JSONL line is not valid JSON"):
        train_tokenizer([str(corpus_dir), str(bad)], tmp_path / "out", vocab_size=400)


def test_a_char_tokenizer_at_full_coverage_is_exactly_the_alphabet(tmp_path):
    text = tmp_path / "t.txt"
    # a line holding only a form feed (as license texts have) is text too
    text.write_text("the quick brown fox\njumps over the lazy dog\n\x0c\n\tTHE END: 42!\n" * 20)
    alphabet = set(text.read_text()) - {"\n"}
    tok = train_tokenizer([str(text)], tmp_path / "c", model_type="char", character_coverage=1.0)
    assert tok.vocab_size == len(alphabet) + 1 + 4  # the characters, "\n" (a piece of its own), pad/unk/bos/eos
    assert tok.meta["byte_fallback"] is False and tok.meta["options"]["requested_vocab_size"] is None
    sample = "the lazy fox: 42\n\tEND"
    assert tok.decode(tok.encode(sample)) == sample and len(tok.encode(sample)) == len(sample)
    assert tok.encode("fox!?") == tok.encode("fox!") + [tok.unk_id]  # "?" is not in the training text
    assert train_tokenizer([str(text)], tmp_path / "d", model_type="char", character_coverage=1.0,
                           vocab_size=tok.vocab_size).vocab_size == tok.vocab_size  # fmt: skip
    with pytest.raises(TokenizerError, match=rf"--vocab-size 20 is below this corpus's character vocabulary "
                       rf"\({tok.vocab_size} ids.*leave --vocab-size out or raise it"):  # fmt: skip
        train_tokenizer([str(text)], tmp_path / "e", model_type="char", character_coverage=1.0, vocab_size=20)
    fallback = train_tokenizer([str(text)], tmp_path / "f", model_type="char")  # default coverage: byte fallback
    assert fallback.meta["byte_fallback"] is True and fallback.decode(fallback.encode("fox!?")) == "fox!?"


def test_the_preparation_counts_the_characters_a_char_vocabulary_lacks(tmp_path):
    from llm.data.prepare import PrepareConfig, prepare

    (tmp_path / "train.txt").write_text("abc abc\nabba cab\n" * 10)
    tok = train_tokenizer([str(tmp_path / "train.txt")], tmp_path / "tok", model_type="char", character_coverage=1.0)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("abc x yz\n")  # x, then yz: a run of unknown characters is one unk
    (tmp_path / "corpus" / "b.txt").write_text("cab\n")
    cfg = PrepareConfig([str(tmp_path / "corpus")], str(tmp_path / "tok"), str(tmp_path / "out"), workers=1)
    manifest = prepare(cfg, progress=False, verbose=False)
    assert manifest["stats"]["unk_tokens"] == 2 and tok.vocab_size == 3 + 2 + 4  # a b c, space, "\n", specials
