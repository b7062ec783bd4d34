"""`python -m llm.export`: a checkpoint (any ZeRO stage, any number of ranks) as a HuggingFace transformers model
directory: model.safetensors, config.json, tokenizer.json + tokenizer_config.json (what `AutoTokenizer`
loads), and tokenizer.model (so that `hf:DIR` imports it back). See llm/model/hf.py for what maps to what.

    python -m llm.export --checkpoint runs/demo --output exports/demo
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exports/demo')"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llm.data.tokenizer import TokenizerError
from llm.store.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llm.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run directory, its checkpoints/ or a step_* directory")
    p.add_argument("--output", required=True, help="the transformers model directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--force", action="store_true", help="write into an output directory that is not empty")
    args = p.parse_args(argv)
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        print(
            f"error: {out} exists and is not an empty directory; choose another --output or add --force",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        from llm.model.hf import ExportError, write_hf
    except ImportError as e:
        print(
            f"error: export needs transformers' libraries ({e.name} is missing): pip install -e '.[hf]'",
            file=sys.stderr,
        )
        sys.exit(2)
    from llm.store.weights import load_weights

    t0 = time.perf_counter()
    try:
        cfg, weights, tok, labels = load_weights(args.checkpoint)
        if labels is not None:
            raise ExportError(f"{args.checkpoint} is a classifier (task=classify); only language models are exported")
        from llm.model.hf import family

        family(cfg.model)  # refuse before writing anything
        info = write_hf(cfg.model, weights, tok, out, args.dtype)
    except (CheckpointError, TokenizerError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"wrote {out}: {info['architecture']}, {info['parameters']:,} parameters in {info['dtype']}, "
        f"tokenizer of {tok.vocab_size} ids ({time.perf_counter() - t0:.1f} s)"
    )


if __name__ == "__main__":
    main()
