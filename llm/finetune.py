"""`python -m llm.finetune`: fine-tune a checkpoint. It is `python -m llm.train` with task=sft unless the
overrides choose task=classify: the same loop, engine, checkpoints, exact resume, signals, metrics and exit codes.
"""

from __future__ import annotations

import sys

from llm.training.launch import run

USAGE = """usage: python -m llm.finetune [--cfg] finetune.init_from=RUN|CHECKPOINT|hf:DIR finetune.train_file=FILE.jsonl
                                 [finetune.val_file=FILE.jsonl] [task=sft|classify] [lora=r8 | lora.rank=N ...]
                                 [key=value ...]

task=sft (default): JSONL lines {"prompt": ..., "response": ...} or {"messages": [{"role": "user"|"assistant"|
  "system", "content": ...}, ...]}; the loss covers the responses (assistant turns) only; examples are packed
  into data.seq_len windows with document masks and positions restarting per example.
task=classify: JSONL lines {"text": ..., "label": ...}; a linear head on the pretrained trunk, pooled at the EOS
  after each text (finetune.pooling=last) or over the text (mean); accuracy, macro-F1, ROC-AUC logged, and the
  full report with its plots in <run_dir>/eval/ at the end.
lora=r8 / lora=r16-mlp, or lora.rank, lora.alpha, lora.dropout, lora.targets=[qkv,proj,up,gate,down]: train
  low-rank adapters only; the checkpoints hold only them (and a head).
The model's shape and tokenizer come from init_from; model.dropout, model.kernels and model.fused_loss stay
settable. Every other setting is llm.train's (python -m llm.train --help)."""


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("task=") for a in args):
        args.insert(0, "task=sft")
    run(args, USAGE)


if __name__ == "__main__":
    main()
