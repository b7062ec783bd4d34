"""`python -m llm.evaluate`: how well a checkpoint predicts held-out text.

    python -m llm.evaluate --checkpoint runs/demo                      # the run's own val split
    python -m llm.evaluate --checkpoint runs/demo --data data/other --max-windows 256 --output eval.json
    torchrun --nproc_per_node=4 -m llm.evaluate --checkpoint runs/gpt2  # the same numbers, 4x sooner
    python -m llm.evaluate --checkpoint runs/demo --tasks stdlib_next_line,stdlib_rolling --limit 50  # downstream
    python -m llm.evaluate --plot runs/demo           # the run's task scores and val loss over its steps

For each prepared dataset: the mean loss (nats per token) over every target token of the split's windows (in
order, document-masked as in training), its perplexity, and bits per byte: the summed loss in bits over the
UTF-8 bytes those tokens decode to, which compares models with different tokenizers. An EOS target counts in
the loss and as 0 bytes. Windows go in fixed batches to the ranks round-robin and the per-batch sums are added
in batch order, so the result is bitwise the same on any number of ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llm.data.dataset import BatchLoader, open_windows
from llm.data.tokenizer import Tokenizer
from llm.model.gpt import GPT


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """The number of UTF-8 bytes each id contributes to decoded text: 1 for a byte piece, 0 for control ids."""
    sp, out = tok.sp, np.zeros(tok.vocab_size, dtype=np.int64)
    for i in range(tok.vocab_size):
        if sp.is_control(i):
            continue
        out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


@torch.no_grad()
def score(
    model: GPT,
    windows,
    tok: Tokenizer,
    batch_size: int = 8,
    max_windows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Loss, perplexity and bits per byte of `model` over the first `max_windows` windows (all by default)."""
    device = next(model.parameters()).device
    n = windows.n if max_windows is None else min(max_windows, windows.n)
    n_batches = math.ceil(n / batch_size)
    sums = torch.zeros(n_batches, 3, dtype=torch.float64)  # per batch: loss (nats), target tokens, bytes
    nbytes = torch.from_numpy(token_bytes(tok))
    loader = BatchLoader(windows, batch_size, batch_size, tok.eos_id, vocab_size=tok.vocab_size)
    for b in range(rank, n_batches, world_size):
        loader.samples = b * batch_size
        batch = next(loader)
        keep = min(batch_size, n - b * batch_size)  # the last batch may be partly past max_windows
        x, y, docs = (t[:keep].to(device) for t in (batch.input_ids, batch.targets, batch.doc_ids))
        logits = model(x, doc_ids=docs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        sums[b] = torch.stack([loss.double().sum().cpu(), torch.tensor(y.numel()), nbytes[y.cpu()].sum()])
    if world_size > 1:
        torch.distributed.all_reduce(sums)  # each batch was filled by one rank, zeros elsewhere: exact
    nats, tokens, nb = (sums[:, i].sum().item() for i in range(3))
    loss = nats / tokens
    return {
        "windows": n,
        "tokens": int(tokens),
        "bytes": int(nb),
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bits_per_byte": nats / math.log(2) / nb if nb else None,
    }


def evaluate(
    checkpoint: str,
    data: list[str] | None,
    split: str,
    seq_len: int | None,
    batch_size: int,
    max_windows: int | None,
    device,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    from llm.store.weights import load_model

    cfg, model, tok = load_model(checkpoint, device)
    if not isinstance(model, GPT):
        return classify(model, cfg, tok, data, seq_len, batch_size, checkpoint)
    seq = seq_len or (cfg.model.max_seq_len if str(checkpoint).startswith("hf:") else cfg.data.seq_len)
    if seq > cfg.model.max_seq_len:
        raise ValueError(f"--seq-len {seq} is above the model's max_seq_len {cfg.model.max_seq_len}")
    results = {}
    for path in data or cfg.data.paths:
        if str(path).endswith(".jsonl"):
            results[str(path)] = score_sft(model, path, tok, seq, batch_size)
            continue
        windows = open_windows([path], split, seq, shuffle=False, tokenizer_sha256=tok.sha256)
        results[str(path)] = score(model, windows, tok, batch_size, max_windows, rank, world_size)
    return {"checkpoint": str(checkpoint), "split": split, "seq_len": seq, "data": results}


@torch.no_grad()
def score_sft(model: GPT, path, tok: Tokenizer, seq: int, batch_size: int) -> dict:
    """The loss per response token of an SFT file's examples (packed as fine-tuning packs them)."""
    from llm.data.examples import IGNORE, pack_sft

    rows, stats = pack_sft(path, tok, seq)
    device, nats, count = next(model.parameters()).device, 0.0, 0
    for i in range(0, stats.rows, batch_size):
        b = {k: torch.from_numpy(v[i : i + batch_size]).to(device) for k, v in rows.items()}
        logits = model(b["idx"], doc_ids=b["doc_ids"], positions=b["positions"])
        y = b["targets"].flatten()
        loss = F.cross_entropy(logits.float().flatten(0, 1), y, ignore_index=IGNORE, reduction="sum")
        nats, count = nats + loss.double().item(), count + int((y != IGNORE).sum())
    return {"examples": stats.examples, "tokens": count, "loss": nats / count, "ppl": math.exp(min(nats / count, 50))}


@torch.no_grad()
def classify(model, cfg, tok: Tokenizer, data: list[str] | None, seq_len: int | None, batch_size: int, checkpoint):
    """A classifier's full report (llm/training/classify_metrics.py) on JSONL files of {"text", "label"} (default: the
    run's finetune.val_file)."""
    from llm.data.examples import encode_classify
    from llm.training.classify_metrics import report

    files = data or ([cfg.finetune.val_file] if cfg.finetune.val_file else [])
    if not files:
        raise ValueError("this classifier's run had no finetune.val_file: name a JSONL file with --data")
    device, results = next(model.parameters()).device, {}
    for path in files:
        rows, _ = encode_classify(path, tok, seq_len or cfg.data.seq_len, model.labels)
        logits = [
            model(
                torch.from_numpy(rows["idx"][i : i + batch_size]).to(device),
                torch.from_numpy(rows["lengths"][i : i + batch_size]).to(device),
            )
            .double()
            .cpu()
            for i in range(0, len(rows["idx"]), batch_size)
        ]
        results[str(path)] = report(torch.cat(logits).numpy(), rows["labels"], model.labels)
    return {"checkpoint": str(checkpoint), "classifier": True, "data": results}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a run directory, its checkpoints/, a step_* directory or hf:DIR")
    p.add_argument(
        "--data",
        action="append",
        help="a prepared dataset directory, or an SFT or classification JSONL file (repeat; default: the run's data)",
    )
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="window length (default: the run's data.seq_len; an hf: model's context)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument(
        "--output",
        default=None,
        help="also write the results to this JSON file (a classifier: to this "
        "directory, metrics.json with roc.png and confusion.png, one subdirectory per file if several)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    h = p.add_argument_group("downstream tasks (lm-evaluation-harness, offline; docs/evaluation.md)")
    h.add_argument("--tasks", default=None, help="NAME[,NAME]: score these tasks instead of the held-out loss")
    h.add_argument("--include-path", action="append", help="a directory of task YAMLs besides the shipped ones")
    h.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    h.add_argument(
        "--plot", metavar="RUN", help="draw RUN's task scores and val loss over its steps (RUN/evals/scores.png)"
    )
    return p


def _plot(run: str) -> int:
    from llm.training.scores_plot import plot_scores

    try:
        print(f"wrote {plot_scores(run)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _tasks(args) -> int:
    """`--tasks`: the harness on the checkpoint; its table, and its results JSON at --output."""
    try:
        from llm.evals.harness import HarnessModel
        from llm.evals.suite import TaskError, run_tasks, task_manager
    except ImportError:
        print("error: --tasks needs the eval extra: pip install 'llm-pretrain[eval]' (lm-eval)", file=sys.stderr)
        return 2
    from llm.evals.suite import check_offline
    from llm.parallel import distributed as D
    from llm.store.checkpoint import CheckpointError
    from llm.store.weights import parse_device

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    env = D.detect()
    try:
        check_offline(task_manager(args.include_path), names)  # before the model is loaded
        device = parse_device(args.device, env.local_rank)
        if env.world_size > 1:  # the requests dealt to the ranks (llm/evals/harness.py)
            D.init(env)
        model = HarnessModel(checkpoint=args.checkpoint, batch_size=args.batch_size, device=device)
        result = run_tasks(model, names, args.include_path, args.limit)
    except (TaskError, ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if env.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if env.rank != 0:
        return 0
    for task, metrics in result["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown} ({metrics.get('sample_len', '?')} examples)")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _print(result: dict, split: str, output: str | None) -> None:
    """The results, one line per input (and the reports or JSON at --output)."""
    if result.get("classifier"):
        from llm.training.classify_metrics import write_report

        for path, r in result["data"].items():
            auc = "n/a" if r["roc_auc"] is None else f"{r['roc_auc']:.4f}"
            print(
                f"{path}: accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}, ROC-AUC {auc}, "
                f"loss {r['loss']:.4f} ({r['examples']} examples)"
            )
            if output:
                several = len(result["data"]) > 1
                write_report(r, Path(output) / Path(path).stem if several else Path(output))
        return
    for path, r in result["data"].items():
        if "windows" not in r:  # an SFT file
            print(
                f"{path}: response loss {r['loss']:.4f}, ppl {r['ppl']:.2f} ({r['examples']} examples, "
                f"{r['tokens']:,} response tokens)"
            )
            continue
        bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
        print(
            f"{path} [{split}]: loss {r['loss']:.4f}, ppl {r['ppl']:.2f}, bits/byte {bpb} "
            f"({r['windows']} windows, {r['tokens']:,} tokens, {r['bytes']:,} bytes)"
        )
    if output:
        Path(output).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    for name in ("batch_size", "max_windows", "seq_len", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.plot is not None:
        sys.exit(_plot(args.plot))
    if args.checkpoint is None:
        p.error("the following arguments are required: --checkpoint (or --plot RUN)")
    if args.tasks is not None:
        sys.exit(_tasks(args))
    from llm.data.examples import ExampleError
    from llm.data.shards import ShardError
    from llm.data.tokenizer import TokenizerError
    from llm.parallel import distributed as D
    from llm.store.checkpoint import CheckpointError
    from llm.store.weights import parse_device

    try:
        env = D.detect()
        device = parse_device(args.device, env.local_rank)
        if env.world_size > 1:
            D.init(env)
        scope = (args.seq_len, args.batch_size, args.max_windows, device, env.rank, env.world_size)
        result = evaluate(args.checkpoint, args.data, args.split, *scope)
    except (CheckpointError, ShardError, TokenizerError, ExampleError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if env.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if env.rank == 0:
        _print(result, args.split, args.output)


if __name__ == "__main__":
    main()
