"""`python -m llm.train [hydra overrides]`: pretrain (or, with task=sft|classify, fine-tune) a model, started
plainly, by torchrun, by the deepspeed launcher or by srun. The launch is llm/training/launch.py, the loop
llm/training/trainer.py; the process exits with the code of its outcome (llm/training/outcome.py)."""

from __future__ import annotations

from llm.config.compose import load_config
from llm.training.launch import run, train
from llm.training.outcome import OUTCOMES

__all__ = ["load_config", "train", "main"]

USAGE = f"""usage: python -m llm.train [--cfg] [key=value | group=option ...]

Groups: model (tiny gpt2-124m gpt2-350m gpt2-774m llama-1b llama-7b), data, optim (adamw wsd),
deepspeed (zero0 zero1 zero2 zero3 zero3-offload), logger (wandb-offline wandb-online none),
experiment (demo gpt2-124m gpt2-350m gpt2-774m llama-1b llama-7b), task (pretrain sft classify: see
python -m llm.finetune --help), lora (none r8 r16-mlp). --cfg prints the resolved config.
Exit codes (recorded in <run_dir>/outcome/; `python -m llm.outcome --help` says what each asks of a job script):
  {", ".join(f"{code} {name}" for name, code, _, _ in OUTCOMES)}."""


def main(argv: list[str] | None = None) -> None:
    run(argv, USAGE)


if __name__ == "__main__":
    main()
