"""What the one training loop (llm/training/trainer.py) trains: pretraining on packed token shards, or fine-tuning a
checkpoint (task=sft: response-only loss on packed examples; task=classify: a head on the pretrained trunk),
with or without LoRA adapters. A task prepares its inputs, builds the model with its first weights, serves the
training batches (the model's keyword arguments) and evaluates; the loop does everything else.

Fine-tuning resolves `finetune.init_from` once, at the run's first start, and records the checkpoint it found
(and a fingerprint of it) in <run_dir>/init_from.json: a resumed run starts from the same weights even if the
pretraining run has moved on since, and refuses them if they changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llm.config.schema import RUNTIME_MODEL_FIELDS, Config, ConfigError, DataConfig, validate
from llm.data.dataset import BatchLoader, open_windows
from llm.data.examples import IGNORE, ExampleLoader, encode_classify, label_set, pack_sft
from llm.data.files import atomic_write_json
from llm.data.prepare import ensure_data
from llm.data.shards import ShardError
from llm.data.tokenizer import Tokenizer
from llm.model.gpt import GPT
from llm.model.lora import add_lora
from llm.parallel import distributed as D
from llm.parallel.mesh import Mesh
from llm.store.checkpoint import MARKER, CheckpointError
from llm.store.rundir import Origin

INIT_RECORD = "init_from.json"


def to_device(batch, device) -> dict[str, torch.Tensor]:
    """A batch (a pretraining Batch, or a dict of tensors) as the model's keyword arguments on `device`."""
    if not isinstance(batch, dict):
        batch = {"idx": batch.input_ids, "targets": batch.targets, "doc_ids": batch.doc_ids}
    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    # through pinned memory, without waiting: a plain copy from pageable memory waits for all the work queued on
    # the GPU (the previous micro-batch's), and the host could not queue the next meanwhile
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine, windows, cfg: Config, mesh: Mesh, device, eos_id: int, vocab_size: int | None = None) -> float:
    """Pretraining: the mean loss over the first eval_batches global batches of the val split, the same windows
    every time, whatever the number of ranks."""
    t = cfg.train
    loader = BatchLoader(windows, t.global_batch, t.micro_batch, eos_id, mesh.data_rank, mesh.data, vocab_size)
    batches = max(1, min(t.eval_batches, windows.n // t.global_batch))
    engine.eval()
    n = batches * loader.grad_accum
    losses = torch.stack([engine(**to_device(next(loader), device)).float() for _ in range(n)])
    engine.train()
    # every micro-batch's loss, in the order of the global samples it covers (data-parallel groups hold contiguous
    # parts of each global batch; the ranks of a sequence-parallel group the same loss), summed in that order:
    # the same number on any number of ranks
    gathered = [torch.empty_like(losses) for _ in range(mesh.world)]
    dist.all_gather(gathered, losses)
    ordered = torch.stack(gathered[:: mesh.sequence]).reshape(mesh.data, batches, -1).transpose(0, 1).flatten()
    return sum(ordered.double().tolist()) / len(ordered)


def build_model(cfg: Config, tok: Tokenizer) -> GPT:
    vocab = cfg.model.vocab_size or tok.vocab_size
    if vocab < tok.vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's {tok.vocab_size}")
    cfg.model = dataclasses.replace(cfg.model, vocab_size=vocab)
    model = GPT(cfg.model)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        for block in model.blocks:  # in place: state-dict keys stay those of the plain model
            block.compile()
    return model


class Pretrain:
    """Next-token prediction on prepared shards (built from data.corpus when missing)."""

    lora = False
    can_sample = True

    def __init__(self, cfg: Config, env: D.DistEnv, run_dir: Path):
        self.cfg, self.env, self.run_dir, self.notes = cfg, env, run_dir, []
        self.mesh = Mesh(env.world_size, env.rank, cfg.parallel.sequence)

    def prepare(self) -> None:  # rank 0, before the others start
        origin, default = Origin.of(self.run_dir), DataConfig()  # where the demo's own data goes: built if missing
        demo = [origin.resolve(p, self.run_dir) for p in default.paths], origin.resolve(default.tokenizer, self.run_dir)
        ensure_data(self.cfg.data, demo)

    def setup(self) -> Tokenizer:
        self.tok = Tokenizer.load(self.cfg.data.tokenizer)
        return self.tok

    def commit(self) -> None:  # rank 0, once setup has checked every input: pretraining records nothing more
        pass

    def build_model(self) -> GPT:
        return build_model(self.cfg, self.tok)

    def loader(self):
        cfg, t = self.cfg, self.cfg.train
        seq = cfg.data.seq_len
        windows = open_windows(cfg.data.paths, "train", seq, t.seed, cfg.data.weights, tokenizer_sha256=self.tok.sha256)
        try:
            self.val = open_windows(cfg.data.paths, "val", seq, t.seed, cfg.data.weights, shuffle=False)
        except ShardError:
            self.val = None  # too little val data for one window
            self.notes.append("val split too small for one window: evaluation is skipped")
        tok, mesh = self.tok, self.mesh
        return BatchLoader(
            windows, t.global_batch, t.micro_batch, tok.eos_id, mesh.data_rank, mesh.data, tok.vocab_size
        )

    def evaluate(self, engine, device, final: bool) -> dict | None:
        if self.val is None:
            return None
        loss = evaluate(engine, self.val, self.cfg, self.mesh, device, self.tok.eos_id, self.tok.vocab_size)
        return {"val/loss": loss, "val/ppl": float(np.exp(min(loss, 50.0)))}

    def client(self) -> dict:
        return {}


def fingerprint(path: str) -> str:
    """What identifies the weights a path holds: a checkpoint's COMPLETE.json (which lists every file's sha256),
    or a transformers directory's config and weight file sizes."""
    from llm.store.weights import HF_PREFIX

    h = hashlib.sha256()
    if path.startswith(HF_PREFIX):
        d = Path(path[len(HF_PREFIX) :])
        h.update((d / "config.json").read_bytes())
        for f in sorted(d.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    else:
        h.update((Path(path) / MARKER).read_bytes())
    return h.hexdigest()


class Finetune:
    """The shared part of sft and classify: the first weights from `finetune.init_from` (recorded), the model
    settings and tokenizer that come with them, LoRA."""

    can_sample = False

    def __init__(self, cfg: Config, env: D.DistEnv, run_dir: Path):
        self.cfg, self.env, self.run_dir, self.notes = cfg, env, run_dir, []
        self.mesh = Mesh(env.world_size, env.rank, cfg.parallel.sequence)
        self.lora = cfg.lora.rank > 0
        self.new_record: dict | None = None  # init_from.json at the run's first start

    def prepare(self) -> None:  # rank 0, before the others start: nothing to build
        pass

    def resolve_init(self) -> str:
        """The checkpoint to start from (every rank: checking a checkpoint is collective): the one recorded at
        the run's first start, or, at that start, the one init_from names now (recorded by `commit` once the
        run's inputs have been checked)."""
        from llm.store.weights import HF_PREFIX, find_checkpoint

        record, f = self.run_dir / INIT_RECORD, self.cfg.finetune
        if record.is_file() and self.cfg.resume != "none":
            saved = json.loads(record.read_text())
            path = Origin.of(self.run_dir).resolve(saved["path"], self.run_dir)  # found again if the tree moved
            if not Path(path.removeprefix(HF_PREFIX)).exists() or fingerprint(path) != saved["fingerprint"]:
                raise CheckpointError(
                    f"this run was initialised from {saved['path']}, which is gone or has changed since; "
                    "restore it, or start over with resume=none"
                )
            return path
        if f.init_from.startswith(HF_PREFIX):
            path = f.init_from
            if not Path(path[len(HF_PREFIX) :]).is_dir():
                raise CheckpointError(f"finetune.init_from={f.init_from}: no such directory")
        else:
            path = str(find_checkpoint(f.init_from))
        self.new_record = {"requested": f.init_from, "path": path, "fingerprint": fingerprint(path)}
        return path

    def commit(self) -> None:  # rank 0, once setup has checked every input
        if self.new_record is not None:
            atomic_write_json(self.run_dir / INIT_RECORD, self.new_record)

    def setup(self) -> Tokenizer:
        from llm.store.weights import load_weights

        self.init_path = self.resolve_init()
        init_cfg, self.weights, self.tok, _ = load_weights(self.init_path)
        if init_cfg.task == "classify":
            raise CheckpointError(f"finetune.init_from={self.init_path} is a classifier; start from a language model")
        cfg = self.cfg
        runtime = {k: getattr(cfg.model, k) for k in RUNTIME_MODEL_FIELDS}
        cfg.model = dataclasses.replace(init_cfg.model, **runtime)
        cfg.data.tokenizer = str(self.tok.directory)
        validate(cfg, self.env.world_size, torch.cuda.is_available())  # data.seq_len against this model
        self.read_data()
        return self.tok

    def base(self) -> GPT:
        model = GPT(self.cfg.model)
        model.activation_checkpointing = self.cfg.train.activation_checkpointing
        if self.cfg.finetune.random_init:  # the baseline: the same model, not pretrained
            del self.weights
            return model
        missing, unexpected = model.load_state_dict(self.weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{self.init_path} does not fit its own model settings: missing {missing[:3]}")
        del self.weights
        return model

    def loader(self) -> ExampleLoader:
        t, mesh = self.cfg.train, self.mesh
        return ExampleLoader(self.train_rows, t.global_batch, t.micro_batch, mesh.data_rank, mesh.data, t.seed)

    def client(self) -> dict:
        return {"init_checkpoint": self.init_path}

    def batches(self, engine, rows: dict[str, np.ndarray], device):
        """(batch index, that batch's rows on `device`, its model output) of every micro-batch of `rows`, split
        round-robin over the data-parallel groups; every rank runs the same number of forwards (ZeRO-3 gathers
        weights collectively), repeating its last batch where it has none left (yielded with index None)."""
        micro, rank, world = self.cfg.train.micro_batch, self.mesh.data_rank, self.mesh.data
        n = len(next(iter(rows.values())))
        n_batches = math.ceil(n / micro)
        for i in range(math.ceil(n_batches / world)):
            b = i * world + rank
            real = b < n_batches
            lo = (b if real else rank % n_batches) * micro
            batch = {k: torch.from_numpy(v[lo : lo + micro]).to(device) for k, v in rows.items()}
            yield (b if real else None), batch, engine(**batch)


class SFT(Finetune):
    """Supervised fine-tuning: loss on the responses only, examples packed with document masks."""

    can_sample = True

    def read_data(self) -> None:
        f, seq = self.cfg.finetune, self.cfg.data.seq_len
        self.train_rows, stats = pack_sft(f.train_file, self.tok, seq)
        self.notes.append(f"train: {f.train_file}: {stats.summary()}")
        self.val_rows = None
        if f.val_file:
            self.val_rows, stats = pack_sft(f.val_file, self.tok, seq)
            self.notes.append(f"val: {f.val_file}: {stats.summary()}")

    def build_model(self) -> GPT:
        model = self.base()
        return add_lora(model, self.cfg.lora) if self.lora else model

    @torch.no_grad()
    def evaluate(self, engine, device, final: bool) -> dict | None:
        """The val loss per target token over every val window."""
        if self.val_rows is None:
            return None
        engine.eval()
        n_batches = math.ceil(len(self.val_rows["idx"]) / self.cfg.train.micro_batch)
        sums = torch.zeros(n_batches, 2, dtype=torch.float64, device=device)
        for b, batch, loss in self.batches(engine, self.val_rows, device):
            if b is not None and self.mesh.sequence_rank == 0:  # one rank of a sequence-parallel group counts it
                count = (batch["targets"] != IGNORE).sum()
                sums[b] = torch.stack([loss.double() * count, count.double()])
        engine.train()
        dist.all_reduce(sums)
        loss = (sums[:, 0].sum() / sums[:, 1].sum()).item()
        return {"val/loss": loss, "val/ppl": float(np.exp(min(loss, 50.0)))}


class Classify(Finetune):
    """A classification head on the pretrained trunk (llm/model/classifier.py); metrics from scikit-learn."""

    def read_data(self) -> None:
        f, seq = self.cfg.finetune, self.cfg.data.seq_len
        self.labels = label_set(f.train_file)
        self.train_rows, stats = encode_classify(f.train_file, self.tok, seq, self.labels)
        self.notes.append(f"train: {f.train_file}: {stats.summary()}; labels {self.labels}")
        self.val_rows = None
        if f.val_file:
            self.val_rows, stats = encode_classify(f.val_file, self.tok, seq, self.labels)
            self.notes.append(f"val: {f.val_file}: {stats.summary()}")

    def build_model(self):
        from llm.model.classifier import Classifier

        trunk = self.base()
        if self.lora:
            add_lora(trunk, self.cfg.lora)
        return Classifier(trunk, len(self.labels), self.cfg.finetune.pooling)

    def client(self) -> dict:
        return {**super().client(), "labels": self.labels}

    @torch.no_grad()
    def evaluate(self, engine, device, final: bool) -> dict | None:
        """Accuracy, macro-F1, ROC-AUC and the loss over every val example; at the end of the run also the full
        report (per-class precision/recall/F1, confusion matrix) and its plots under <run_dir>/eval/."""
        from llm.training.classify_metrics import report, write_report

        if self.val_rows is None:
            return None
        engine.eval()
        rows = {k: v for k, v in self.val_rows.items() if k != "labels"}
        n, micro = len(rows["idx"]), self.cfg.train.micro_batch
        logits = torch.zeros(n, len(self.labels), dtype=torch.float64, device=device)
        for b, _, out in self.batches(engine, rows, device):
            if b is not None:
                logits[b * micro : b * micro + len(out)] = out.double()
        engine.train()
        dist.all_reduce(logits)  # each row was filled by one rank, zeros elsewhere: exact
        majority = int(np.bincount(self.train_rows["labels"]).argmax())  # the training set's commonest class
        r = report(logits.cpu().numpy(), self.val_rows["labels"], self.labels, majority)
        if final and self.env.rank == 0:
            write_report(r, self.run_dir / "eval")
        return {f"val/{k}": r[k] for k in ("loss", "accuracy", "macro_f1", "roc_auc")}


def make_task(cfg: Config, env: D.DistEnv, run_dir: Path):
    if cfg.task == "pretrain":
        return Pretrain(cfg, env, run_dir)
    return (SFT if cfg.task == "sft" else Classify)(cfg, env, run_dir)
