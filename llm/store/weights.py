"""A trained model out of a checkpoint, whatever ZeRO stage and number of ranks wrote it: the run's settings and
the full fp32 weights, ready for a plain `GPT` on one device (generation, evaluation, export, fine-tuning).

    cfg, model, tokenizer = load_model("runs/demo")   # a run directory, its checkpoints/ or one step_* directory
    cfg, model, tokenizer = load_model("hf:exports/demo")   # a transformers GPT-2 / Llama directory (llm/model/hf.py)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import OmegaConf

from llm.config.schema import Config
from llm.data.tokenizer import Tokenizer
from llm.model.gpt import GPT
from llm.model.lora import merge
from llm.store.checkpoint import POINTER, CheckpointError, Checkpoints, check_checkpoint, read_pointer
from llm.store.record import RunRecord
from llm.store.rundir import HF_PREFIX, Origin, PathNotFound, run_tokenizer

MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory a path names: a step directory itself, or the one `latest` points to in a run's
    checkpoints/ (given the run directory or checkpoints/). Raises CheckpointError saying what it found."""
    path = Path(path)
    if (path / "COMPLETE.json").is_file() or path.name.startswith("step_"):
        tag_dir = path
    else:
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        tag, why = read_pointer(folder)
        if tag is None:
            raise CheckpointError(
                why or f"{path} holds no checkpoint (no {folder / POINTER}): name a run directory or a step_* directory"
            )
        tag_dir = folder / tag
    problem = check_checkpoint(tag_dir)
    if problem:
        raise CheckpointError(problem)
    return tag_dir


def _client_state(tag_dir: Path) -> dict:
    for name in MODEL_FILES:
        if (tag_dir / name).is_file():
            return torch.load(tag_dir / name, map_location="cpu", weights_only=False)
    raise CheckpointError(f"{tag_dir} has no model states file ({' or '.join(MODEL_FILES)})")


def _fp32_weights(tag_dir: Path, states: dict, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage < 3:  # the module's full weights are in rank 0's model file
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def _origin(record: RunRecord, run_dir: Path | None) -> Origin:
    """Where the run was started (checkpoints written before the run recorded it: this directory)."""
    if record.origin is not None:
        return Origin(**record.origin)
    return Origin(os.getcwd(), str((run_dir or Path.cwd()).absolute()))


def _tokenizer(cfg: Config, record: RunRecord, run_dir: Path | None, origin: Origin, tag_dir: Path) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: the run directory's own copy, else the one its settings name
    (found where the run was started, or where the tree has moved to); checked against the recorded sha256."""
    sha = record.tokenizer_sha256
    if run_dir is not None and (tok := run_tokenizer(run_dir, sha)) is not None:
        return tok
    try:
        where = origin.locate(cfg.data.tokenizer, run_dir, "the run's tokenizer")
    except PathNotFound as e:
        raise CheckpointError(f"{e} (and the run directory holds no copy of it); restore it there") from None
    tok = Tokenizer.load(where)
    if tok.sha256 != sha:
        raise CheckpointError(f"the tokenizer at {where} is not the one {tag_dir} was trained with (sha256 differs)")
    return tok


def parse_device(name: str, local_rank: int = 0) -> torch.device:
    """A --device argument as a device (a bare "cuda" is this rank's GPU), or ValueError saying what to pass."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


class Weights(NamedTuple):
    cfg: Config  # the run's settings (for hf:DIR, the schema's defaults with the model it describes)
    weights: dict[str, torch.Tensor]  # the full fp32 state dict, adapters merged
    tok: Tokenizer
    labels: list[str] | None  # a classifier's classes, in the order of its outputs


def load_weights(path: str | Path) -> Weights:
    """The settings, full weights and tokenizer of a checkpoint (any ZeRO stage, any number of ranks; a LoRA
    run's adapters merged into the weights it was initialised from) or of a transformers directory "hf:DIR"."""
    if str(path).startswith(HF_PREFIX):
        from llm.model.hf import read_hf

        model_cfg, weights, tok = read_hf(str(path)[len(HF_PREFIX) :])
        cfg = Config(model=model_cfg)
        cfg.data.tokenizer = str(tok.directory)
        return Weights(cfg, weights, tok, None)
    tag_dir = find_checkpoint(path)
    states = _client_state(tag_dir)
    record = RunRecord.from_client_state(states, tag_dir)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), record.config))
    run_dir = tag_dir.parent.parent if tag_dir.parent.name == "checkpoints" else None
    origin = _origin(record, run_dir)
    tok = _tokenizer(cfg, record, run_dir, origin, tag_dir)
    cfg.data.tokenizer = str(tok.directory)
    cfg.data.paths = [origin.resolve(p, run_dir) for p in cfg.data.paths]  # e.g. what evaluate scores by default
    weights = _fp32_weights(tag_dir, states, Checkpoints.meta(tag_dir)["zero_stage"])
    del states
    prefix = "trunk." if cfg.task == "classify" else ""
    if cfg.lora.rank:  # only the adapters (and a head) were saved: add them to the weights the run started from
        base = load_weights(origin.resolve(record.task["init_checkpoint"], run_dir)).weights
        weights = merge({**{prefix + k: v for k, v in base.items()}, **weights}, cfg.lora)
    if cfg.model.tie_embeddings and prefix + "lm_head.weight" not in weights:
        weights[prefix + "lm_head.weight"] = weights[prefix + "wte.weight"]
    return Weights(cfg, weights, tok, record.task.get("labels"))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Config, torch.nn.Module, Tokenizer]:
    """(the run's config, its model with the checkpoint's weights in eval mode on `device`, its tokenizer). The
    model is a GPT, or for a classification run a Classifier (llm/model/classifier.py) with its `labels`."""
    cfg, weights, tok, labels = load_weights(path)
    model = GPT(cfg.model)
    if cfg.task == "classify":
        from llm.model.classifier import Classifier

        model = Classifier(model, len(labels), cfg.finetune.pooling)
        model.labels = labels
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return cfg, model.to(device).eval(), tok
