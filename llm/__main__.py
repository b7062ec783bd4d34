"""`python -m llm <command> [arguments]`: every command of the project in one table. Each is also
`python -m llm.<module>` (the sbatch scripts and the docs use that form); `python -m llm <command> --help`
says how to use it."""

from __future__ import annotations

import importlib
import sys

# command: (module, what it does), grouped by what a user does
COMMANDS = {
    # data
    "train-tokenizer": ("llm.data.train_tokenizer", "train a SentencePiece tokenizer on a corpus"),
    "clean-data": ("llm.data.clean", "quality filters and near-duplicate removal for a raw corpus (datatrove)"),
    "data-report": ("llm.data.report", "draw what a cleaning run did (removed by reason, lengths, clusters)"),
    "prepare-data": ("llm.data.prepare_data", "tokenize a corpus into packed token shards, or verify them"),
    # pretraining and its machinery
    "train": ("llm.train", "pretrain a model (the demo without arguments); any launcher, resumable"),
    "submit": ("llm.submit", "submit a training run to Slurm (preemption-safe, requeued until done)"),
    "outcome": ("llm.outcome", "how a run's last launch ended, as a job script's exit code"),
    # fine-tuning
    "finetune": ("llm.finetune", "fine-tune a checkpoint: task=sft or classify, full or LoRA"),
    # using a checkpoint
    "generate": ("llm.generate", "sample text from a checkpoint"),
    "evaluate": ("llm.evaluate", "perplexity and bits per byte, a classifier's report, or downstream tasks"),
    "harness": ("llm.harness", "the lm-evaluation-harness's command line with our model (--model llm-pretrain)"),
    "export": ("llm.export", "write a checkpoint as a HuggingFace transformers directory"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<16} {what}" for name, (_, what) in COMMANDS.items())
    head = "usage: python -m llm <command> [arguments]"
    return f"{head}\n\ncommands:\n{rows}\n\npython -m llm <command> --help for its own"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module, _ = COMMANDS[args[0]]
    sys.argv = [f"python -m {module}", *args[1:]]
    sys.exit(importlib.import_module(module).main(args[1:]))


if __name__ == "__main__":
    main()
