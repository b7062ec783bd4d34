"""Train the SentencePiece tokenizer.

python -m llm.data.train_tokenizer --input stdlib --vocab-size 8192 --model-type bpe --output data/tok
python -m llm.data.train_tokenizer --input notes.txt --model-type char --character-coverage 1.0 --output data/chars
"""

from __future__ import annotations

import argparse
import sys
import time

from llm.data.corpus import CorpusError
from llm.data.tokenizer import MODEL_TYPES, TokenizerError, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llm.data.train_tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, help="files, directories, globs, or 'stdlib'")
    p.add_argument(
        "--vocab-size", type=int, default=None, help="pieces (default 8192); for char only a check on the alphabet"
    )
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--output", required=True, help="directory for tokenizer.model and tokenizer.json")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed JSONL lines")
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=2_000_000,
        help="lines SentencePiece samples for training; bounds memory whatever the corpus size",
    )
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument(
        "--byte-fallback",
        choices=("true", "false"),
        default=None,
        help="unknown characters as UTF-8 bytes (default: true, except char with --character-coverage 1.0)",
    )
    p.add_argument(
        "--split-digits",
        choices=("true", "false"),
        default="true",
        help="every digit its own piece (default true, as Llama's tokenizer); false lets numbers merge",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        tok = train_tokenizer(
            args.input,
            args.output,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            text_field=args.text_field,
            skip_bad_lines=args.skip_bad_lines,
            input_sentence_size=args.input_sentence_size,
            character_coverage=args.character_coverage,
            seed=args.seed,
            byte_fallback=None if args.byte_fallback is None else args.byte_fallback == "true",
            split_digits=args.split_digits == "true",
        )
    except (CorpusError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = tok.meta["trained_on"]
    print(
        f"wrote {args.output}: {tok.meta['model_type']} vocab {tok.vocab_size:,} (sha256 {tok.sha256[:12]}), "
        f"trained on {t['sentences']:,} lines of {t['documents']:,} documents in {time.time() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
