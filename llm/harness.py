"""`python -m llm.harness`: the lm-evaluation-harness's own command line (`lm_eval`) with our model class registered
as `--model llm-pretrain` (llm/evals/harness.py) and the shipped offline tasks (llm/evals/tasks/) as its
include path unless one is given; nothing is downloaded (the harness runs with the HuggingFace hubs offline).

    python -m llm.harness --model llm-pretrain --model_args checkpoint=runs/demo --tasks stdlib_next_line
    python -m llm.harness --model llm-pretrain --model_args checkpoint=runs/demo,batch_size=32 \\
        --tasks mytask --include_path DIR --limit 100 --output_path results/

`python -m llm.evaluate --checkpoint RUN --tasks NAME` runs the same in-process, checking first that every task's
data is on this machine.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        import llm.evals.harness  # noqa: F401 (registers the model with the harness)
        from llm.evals.suite import SHIPPED
    except ImportError:
        print("error: the eval extra is not installed: pip install 'llm-pretrain[eval]' (lm-eval)", file=sys.stderr)
        sys.exit(2)
    if not any(a.split("=")[0] == "--include_path" for a in args) and not {"-h", "--help"} & set(args):
        args += ["--include_path", str(SHIPPED)]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["python -m llm.harness", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
