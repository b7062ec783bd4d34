"""Text generation with a KV cache: batched prompts of different lengths, temperature / top-k / top-p sampling,
stop at EOS, a seed.

    python -m llm.generate --checkpoint runs/demo --prompt "def " --prompt "class Parser" --max-new-tokens 200
    python -m llm.generate --checkpoint runs/demo/checkpoints/step_00000300 --prompt "import " --temperature 0

Prompts are left-padded to a common length; pad positions are masked out of attention and every prompt's
positions start at 0, so a prompt generates the same tokens alone or in a batch. The prompt goes through the
model once (prefill); each new token then costs one position, attending to the cached keys and values.
`--no-cache` recomputes the whole sequence for every new token instead (the reference the cache is tested
against, and the baseline of tools/bench_generate.py). Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys

import torch

from llm.model.generation import GenerationError, Sampling, generate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m llm.generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a run directory, its checkpoints/ or a step_* directory")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for each new token")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max new tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    s = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, not args.ignore_eos)
    from llm.data.tokenizer import TokenizerError
    from llm.store.checkpoint import CheckpointError
    from llm.store.weights import load_model, parse_device

    try:
        device = parse_device(args.device)
    except ValueError as e:
        p.error(str(e))

    try:
        s.check()
        _, model, tok = load_model(args.checkpoint, device)
        if not hasattr(model, "lm_head"):
            raise GenerationError(f"{args.checkpoint} is a classifier (task=classify): it does not generate text")
        prompts = [tok.encode(text) for text in args.prompt]
        outputs = generate(model, prompts, s, tok.eos_id, use_cache=not args.no_cache)
    except (GenerationError, CheckpointError, TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for text, new in zip(args.prompt, outputs, strict=True):
        print(text + tok.decode([t for t in new if t != tok.eos_id]))
        print("-" * 40)


if __name__ == "__main__":
    main()
