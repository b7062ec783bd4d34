"""Fine-tuning (llm/training/tasks.py, llm/data/examples.py, llm/model/lora.py, llm/model/classifier.py): the
training loop with task=sft or task=classify, from a pretraining run, with or without LoRA."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import HF_LOGITS_ATOL, classify_rows, make_cfg, one_thread, records, sft_rows, write_jsonl
from launch import launch, overrides, run_module

from llm.config.compose import load_config
from llm.config.schema import ConfigError, LoraConfig, ModelConfig
from llm.data.examples import IGNORE, ExampleError, pack_sft
from llm.data.tokenizer import Tokenizer
from llm.model.classifier import Classifier
from llm.model.gpt import GPT
from llm.model.lora import add_lora, merge
from llm.store.checkpoint import CheckpointError, Checkpoints
from llm.store.weights import load_model, load_weights
from llm.train import train


@pytest.fixture(scope="module")
def base(tmp_path_factory, prepared_dir, tokenizer_dir):
    """A short pretraining run to fine-tune, and fine-tuning files."""
    root = tmp_path_factory.mktemp("ft")
    out = train(make_cfg(root, prepared_dir, tokenizer_dir, "base", train={"max_steps": 4}))
    files = {
        "sft_train": write_jsonl(root / "sft_train.jsonl", sft_rows(60)),
        "sft_val": write_jsonl(root / "sft_val.jsonl", sft_rows(12, seed=1)),
        "cls_train": write_jsonl(root / "cls_train.jsonl", classify_rows(64)),
        "cls_val": write_jsonl(root / "cls_val.jsonl", classify_rows(24, seed=1)),
    }
    return {"run": out["run_dir"], "root": root, **files}


def ft_cfg(base, tmp_path, name, task="sft", **sections):
    cfg = make_cfg(tmp_path, tmp_path, tmp_path, name, **sections)
    cfg.task = task
    key = "sft" if task == "sft" else "cls"
    files = {"init_from": base["run"], "train_file": base[f"{key}_train"], "val_file": base[f"{key}_val"]}
    cfg.finetune = replace(cfg.finetune, **{**files, **sections.get("finetune", {})})
    cfg.train = replace(
        cfg.train, **{"max_steps": 6, "eval_every": 3, "ckpt_every_steps": 3, **sections.get("train", {})}
    )
    cfg.optim = replace(cfg.optim, lr=3e-3, grad_clip=0.0)
    return cfg


def nll(logits, targets):
    """The mean loss over the non-ignored targets, in the logits' precision (float64 here)."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def test_packed_examples_give_exactly_the_loss_of_each_example_alone_on_its_responses(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    rows = sft_rows(3)[:3]
    arrays, stats = pack_sft(write_jsonl(tmp_path / "t.jsonl", rows), tok, 64)
    assert stats.rows == 1 and stats.examples == 3  # all three in one window
    idx, targets, docs, pos = (torch.from_numpy(arrays[k]) for k in ("idx", "targets", "doc_ids", "positions"))
    assert docs[0].unique().tolist() == [0, 1, 2, 3]  # three examples and the padding
    for d, row in enumerate(rows):
        at = docs[0] == d
        assert pos[0][at].tolist() == list(range(int(at.sum())))  # positions restart per example
        trained = targets[0][at][targets[0][at] != IGNORE].tolist()
        assert trained == tok.encode(row["response"]) + [tok.eos_id]  # the response and EOS, nothing else
    for cfg in (
        ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=32, max_seq_len=64),
        ModelConfig(
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=4,
            n_embd=32,
            max_seq_len=64,
            norm="rmsnorm",
            pos="rope",
            mlp="swiglu",
            n_kv_head=2,
            kernels="torch",
        ),
    ):
        torch.manual_seed(0)
        model = GPT(cfg).double()
        packed = nll(model(idx, doc_ids=docs, positions=pos), targets)
        total, count = 0.0, 0
        for row in rows:  # each example alone, unpadded, positions from 0: summed over its response targets
            p, r = tok.encode(row["prompt"]), tok.encode(row["response"]) + [tok.eos_id]
            x, y = torch.tensor([p + r[:-1]]), torch.tensor([[IGNORE] * (len(p) - 1) + r])
            total, count = total + nll(model(x), y).item() * len(r), count + len(r)
        assert packed.item() == pytest.approx(total / count, rel=1e-12)
        assert model(idx, targets, docs, positions=pos).item() == pytest.approx(packed.item(), rel=1e-6)  # fp32 loss


def test_sft_resumes_exactly_and_its_checkpoint_generates(base, tmp_path):
    whole = train(ft_cfg(base, tmp_path, "whole"))
    assert whole["outcome"] == "finished" and whole["val_loss"] is not None
    for _ in range(2):
        out = train(ft_cfg(base, tmp_path, "chain", train={"steps_per_run": 3}))
    assert out["outcome"] == "finished"
    run = tmp_path / "runs"
    assert records(run / "whole") == records(run / "chain") and len(records(run / "whole")) == 6
    assert records(run / "whole", "val/loss") == records(run / "chain", "val/loss")
    init = json.loads((run / "chain" / "init_from.json").read_text())
    assert init["path"].endswith("step_00000004") and init["requested"] == base["run"]
    cfg, model, tok = load_model(run / "chain")
    assert isinstance(model, GPT) and cfg.task == "sft" and cfg.model.vocab_size == tok.vocab_size
    from llm.evaluate import score_sft

    again = score_sft(model, base["sft_val"], tok, cfg.data.seq_len, 3)["loss"]  # llm.evaluate on the val file
    assert again == pytest.approx(records(run / "chain", "val/loss")[6], abs=1e-5)
    assert not torch.equal(model.wte.weight, load_model(base["run"])[1].wte.weight)  # it did train
    # the checkpoint the run started from is recorded; if it is not the same any more, a resume refuses it
    record = run / "chain" / "init_from.json"
    record.write_text(json.dumps({**init, "fingerprint": "0" * 64}))
    with pytest.raises(CheckpointError, match="which is gone or has changed since; restore it, or start over"):
        train(ft_cfg(base, tmp_path, "chain", train={"max_steps": 7}))


def test_lora_trains_only_adapters_saves_them_alone_and_merges_exactly(base, tmp_path):
    cfg = ft_cfg(base, tmp_path, "lora", deepspeed={"stage": 2})
    cfg.lora = LoraConfig(rank=4, alpha=8.0, targets=["qkv", "proj", "up"])
    whole = train(cfg)  # exact resume of adapters and their optimizer (on another number of ranks): below
    run = tmp_path / "runs"
    full = train(ft_cfg(base, tmp_path, "full", deepspeed={"stage": 2}))
    lora_ckpt = Checkpoints.size(run / "lora" / "checkpoints" / "step_00000006")
    full_ckpt = Checkpoints.size(run / "full" / "checkpoints" / "step_00000006")
    assert lora_ckpt < full_ckpt / 5, (lora_ckpt, full_ckpt)
    # it learned: LoRA's B starts at zero, so adapters that do not train score exactly the base model's loss
    # (measured: base 6.10, LoRA 6.06, full fine-tuning 5.42; the margin is half the LoRA gain)
    from llm.evaluate import score_sft

    _, base_model, tok = load_model(base["run"])
    base_val = score_sft(base_model, base["sft_val"], tok, cfg.data.seq_len, 3)["loss"]
    assert whole["val_loss"] < base_val - 0.02 and full["val_loss"] < whole["val_loss"], (base_val, whole, full)
    # the base weights did not move: the merged model differs from the base only in the adapted projections
    merged, base_w = load_weights(run / "lora").weights, load_weights(base["run"]).weights
    changed = sorted(k for k in base_w if not torch.equal(merged[k], base_w[k]))
    assert changed and all(k.endswith(("attn.qkv.weight", "attn.proj.weight", "mlp.up.weight")) for k in changed)
    # exported with the adapters merged: transformers gives the fine-tuned model's logits
    transformers = pytest.importorskip("transformers")
    from llm.model.hf import write_hf

    cfg_l, weights, tok, _ = load_weights(run / "lora")
    write_hf(cfg_l.model, weights, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.arange(40).reshape(2, 20) * 13 % tok.vocab_size
    with torch.no_grad():
        assert (load_model(run / "lora")[1](ids) - hf(ids).logits).abs().max().item() <= HF_LOGITS_ATOL


@pytest.mark.distributed
@pytest.mark.slow
def test_fine_tuning_resumes_on_another_number_of_ranks_and_two_ranks_train_as_one(
    base, tmp_path, prepared_dir, tokenizer_dir
):
    # SFT with LoRA at ZeRO-2, 3 steps on 1 rank then resumed on 2 (adapter-only checkpoint, partitioned optimizer
    # state through the universal format); classify, a whole run on 2 ranks. Both against the same run on 1 rank
    # in this process: the same loss at every step (1 rank x 2 micro-batches sums exactly as 2 ranks x 1).
    def args(name, task, *extra):
        key = "sft" if task == "sft" else "cls"
        files = [f"finetune.init_from={base['run']}", f"finetune.train_file={base[key + '_train']}"]
        files += [f"finetune.val_file={base[key + '_val']}", "optim.grad_clip=0"]
        return [f"task={task}", *overrides(tmp_path, prepared_dir, tokenizer_dir, name, *files, *extra)]

    lora = ("deepspeed=zero2", "lora.rank=4", "lora.alpha=8", "lora.targets=[qkv,proj,up]")
    chain = args("sft-chain", "sft", *lora, "train.steps_per_run=3")
    with one_thread():
        train(load_config(args("sft", "sft", *lora)))
        assert train(load_config(chain))["outcome"] == "paused"
        train(load_config(args("classify", "classify")))
    launch(chain, nproc=2)
    launch(args("classify-2", "classify"), nproc=2)
    run = tmp_path / "runs"
    for one, two in [("sft", "sft-chain"), ("classify", "classify-2")]:
        assert records(run / one) == records(run / two) and len(records(run / one)) == 6, one
        assert records(run / one, "val/loss") == records(run / two, "val/loss"), one
    assert (run / "sft-chain" / "checkpoints" / "universal").is_dir()
    assert records(run / "classify", "val/accuracy") == records(run / "classify-2", "val/accuracy")


def test_fine_tuning_from_an_exported_directory_is_fine_tuning_from_the_run(base, tmp_path):
    pytest.importorskip("safetensors")
    from llm.model.hf import write_hf

    cfg, weights, tok, _ = load_weights(base["run"])
    write_hf(cfg.model, weights, tok, tmp_path / "hf")
    from_run = train(ft_cfg(base, tmp_path, "from-run", train={"max_steps": 3}))
    from_hf = train(
        ft_cfg(base, tmp_path, "from-hf", train={"max_steps": 3}, finetune={"init_from": f"hf:{tmp_path}/hf"})
    )
    assert from_run["outcome"] == from_hf["outcome"] == "finished"
    run = tmp_path / "runs"
    assert records(run / "from-run") == records(run / "from-hf") and len(records(run / "from-hf")) == 3
    assert records(run / "from-run", "val/loss") == records(run / "from-hf", "val/loss")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_adapters_give_the_outputs_of_the_adapted_model(family):
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=32, max_seq_len=32)
    if family == "llama":
        cfg = replace(cfg, norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=2)
    torch.manual_seed(0)
    model = GPT(cfg).double()
    plain = GPT(cfg).double()
    plain.load_state_dict(model.state_dict())
    lora = LoraConfig(
        rank=4, alpha=8.0, targets=["qkv", "proj", "up", "down"] + (["gate"] if family == "llama" else [])
    )
    add_lora(model, lora)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.1)  # trained adapters (they start at zero)
    plain.load_state_dict(merge(model.state_dict(), lora))
    x = torch.randint(0, 97, (2, 32))
    assert (model(x) - plain(x)).abs().max().item() < 1e-10
    assert (model(x) - GPT(cfg).double()(x)).abs().max().item() > 1e-3


def test_classifier_reports_metrics_and_plots_and_loads(base, tmp_path):
    cfg = ft_cfg(base, tmp_path, "cls", task="classify", finetune={"pooling": "mean"})
    out = train(cfg)
    assert out["outcome"] == "finished"
    report = json.loads((tmp_path / "runs" / "cls" / "eval" / "metrics.json").read_text())
    assert report["labels"] == ["digits", "greek", "json"] and report["examples"] == 24
    assert set(report["per_class"]["json"]) == {"precision", "recall", "f1", "support"}
    assert sum(map(sum, report["confusion_matrix"])) == 24 and 0 <= report["roc_auc"] <= 1
    for png in ("roc.png", "confusion.png"):
        assert (tmp_path / "runs" / "cls" / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    assert records(tmp_path / "runs" / "cls", "val/accuracy")[6] == report["accuracy"]
    train_labels = [r["label"] for r in map(json.loads, open(base["cls_train"]))]
    val_labels = [r["label"] for r in map(json.loads, open(base["cls_val"]))]
    majority = max(sorted(set(train_labels)), key=train_labels.count)
    assert report["majority_baseline"]["label"] == majority
    assert report["majority_baseline"]["accuracy"] == val_labels.count(majority) / len(val_labels)
    _, model, tok = load_model(tmp_path / "runs" / "cls")
    assert isinstance(model, Classifier) and model.labels == report["labels"]
    # the command line scores a JSONL file with the loaded classifier: the run's own numbers
    r = run_module(
        "llm.evaluate",
        "--checkpoint",
        tmp_path / "runs" / "cls",
        "--data",
        base["cls_val"],
        "--output",
        tmp_path / "again",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["accuracy"] == report["accuracy"] and again["confusion_matrix"] == report["confusion_matrix"]
    assert again["loss"] == pytest.approx(report["loss"], abs=1e-6) and "accuracy" in r.stdout


def test_random_init_keeps_the_shape_and_tokenizer_but_not_the_weights(base, tmp_path):
    cfg = ft_cfg(base, tmp_path, "scratch", finetune={"random_init": True}, train={"max_steps": 1, "eval_every": 0})
    train(cfg)
    run_cfg, model, tok = load_model(tmp_path / "runs" / "scratch")
    _, pretrained, tok0 = load_model(base["run"])
    assert run_cfg.model == pretrained.cfg and tok.sha256 == tok0.sha256
    # one Adam step moves a weight by at most ~lr (1.5e-3 at the first warmup step): a larger distance from the
    # pretrained weights means the run did not start from them (it starts from the seed's fresh initialisation)
    assert (model.blocks[0].attn.qkv.weight - pretrained.blocks[0].attn.qkv.weight).abs().max() > 3e-3


def test_bad_fine_tuning_input_is_refused_in_one_line_before_training(base, tmp_path):
    def refused(cfg, error, message):
        with pytest.raises(error, match=message) as e:
            train(cfg)
        assert "\n" not in str(e.value), str(e.value)
        run_dir = Path(cfg.runs_dir) / cfg.name  # nothing recorded: no init_from.json, run.json, config, metrics
        assert [p for p in run_dir.rglob("*") if p.is_file()] == [], list(run_dir.rglob("*"))

    bad_lines = tmp_path / "bad.jsonl"
    cases = [
        ({"train_file": str(tmp_path / "missing.jsonl")}, ExampleError, "no such file"),
        (
            {"train_file": write_jsonl(bad_lines, [{"prompt": "x"}])},
            ExampleError,
            "bad.jsonl:1: needs 'prompt' and 'response'",
        ),
        (
            {"val_file": write_jsonl(tmp_path / "v.jsonl", [{"prompt": "a", "response": 3}])},
            ExampleError,
            "v.jsonl:1: 'response' must be a non-empty string",
        ),
        ({"init_from": str(tmp_path)}, CheckpointError, "holds no checkpoint"),
    ]
    for i, (fields, error, message) in enumerate(cases):
        cfg = ft_cfg(base, tmp_path, f"bad{i}")
        cfg.finetune = replace(cfg.finetune, **fields)
        refused(cfg, error, message)
    cfg = ft_cfg(base, tmp_path, "badlabel", task="classify")
    cfg.finetune = replace(cfg.finetune, val_file=write_jsonl(tmp_path / "l.jsonl", [{"text": "x", "label": "other"}]))
    refused(cfg, ExampleError, "label 'other' is not one of the training labels")
    cfg = ft_cfg(base, tmp_path, "lora3", deepspeed={"stage": 3})
    cfg.lora = LoraConfig(rank=4)
    refused(cfg, ConfigError, "lora.rank: LoRA runs use deepspeed.stage 0-2")
    cfg = ft_cfg(base, tmp_path, "seq", data={"seq_len": 128})  # the base model has 64 positions
    refused(cfg, ConfigError, "data.seq_len: 128 is above model.max_seq_len=64")
    # a corrected start of a refused run takes the init_from given now (nothing was recorded by the refusal)
    cfg = ft_cfg(base, tmp_path, "bad0", train={"max_steps": 1})
    assert train(cfg)["outcome"] == "finished"
    # the command line: exit 2, one line, for a bad task setting
    r = run_module("llm.finetune", "lora.rank=4", "lora.targets=[qkv,mlp]", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: lora.targets: 'mlp' is not one of")
    assert r.stderr.count("\n") == 1
