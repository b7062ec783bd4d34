"""Every setting and its default, as typed dataclasses; Hydra YAML under conf/ only overrides them.

The Hydra entry point composes conf/config.yaml over `Config` (registered below as `base_config`), then
converts the result once with `to_config`, so nothing downstream sees a DictConfig. `validate` fails
before any work starts, naming the field at fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """An invalid setting; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """A GPT-style decoder. `vocab_size: null` takes the tokenizer's size."""

    name: str = "tiny"
    vocab_size: int | None = None
    pad_vocab_to: int = 64  # the embedding and head are padded to a multiple of this (never-used rows)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (multi-head)
    n_embd: int = 128
    max_seq_len: int = 256
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    pos: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    mlp: str = "gelu"  # gelu | swiglu
    mlp_hidden: int | None = None  # None: 4 * n_embd for gelu; Llama's 2/3 * 4 * n_embd rounded for swiglu
    mlp_multiple_of: int = 256  # swiglu hidden size rounding
    tie_embeddings: bool = True
    bias: bool = True
    dropout: float = 0.0
    doc_mask: bool = True  # attention stays inside each document of a packed window
    kernels: str = "auto"  # auto | triton | torch: the attention and norm implementation


@dataclass
class DataConfig:
    """Prepared datasets (tools/prepare_data.py) and, for the demo, how to build them when missing."""

    paths: list[str] = field(default_factory=lambda: ["data/stdlib"])
    weights: list[float] | None = None  # mixture weights, one per path
    tokenizer: str = "data/tokenizer"
    seq_len: int = 256
    prepare_if_missing: bool = True  # build the tokenizer and shards from `corpus` when absent
    corpus: list[str] = field(default_factory=lambda: ["stdlib"])
    tokenizer_vocab_size: int = 8192
    val_fraction: float = 0.005


@dataclass
class OptimConfig:
    """AdamW with decay on matrices only, and a warmup + cosine (or WSD, or constant) learning rate."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the final LR as a fraction of lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying at the end
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class DeepSpeedConfig:
    """The ZeRO engine. The DeepSpeed JSON is generated from this (llm/distributed.py), never hand-written."""

    stage: int = 0  # ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (stages 2, 3)
    offload_param: bool = False  # parameters to CPU too (stage 3)
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False


@dataclass
class LoggerConfig:
    """Where metrics go besides the run directory's metrics.jsonl (always written)."""

    wandb: bool = True
    mode: str = "offline"  # offline (files under the run dir; `wandb sync` uploads later) | online
    project: str = "llm"
    entity: str | None = None
    log_every: int = 10  # steps between console/W&B/metrics.jsonl records


@dataclass
class TrainConfig:
    micro_batch: int = 8  # sequences per rank per forward
    global_batch: int = 16  # sequences per optimizer step = micro_batch x world_size x grad accumulation
    max_steps: int = 300
    eval_every: int = 100  # 0 disables periodic evaluation (one still runs at the end)
    eval_batches: int = 8
    ckpt_every_steps: int = 100  # 0 disables step-based checkpoints
    ckpt_every_minutes: float = 0.0  # 0 disables time-based checkpoints
    keep_last: int = 3
    steps_per_run: int | None = None  # stop (with a checkpoint) after this many steps in one invocation
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 1337
    deterministic: bool = False  # torch deterministic algorithms (exact-resume tests)
    sample_tokens: int = 120  # tokens of text generated at the end (0 skips)
    peak_tflops: float | None = None  # the device peak for MFU; None = known GPU table, or measured on CPU


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "demo"  # the run's name; the run directory is <runs_dir>/<name>
    runs_dir: str = "runs"
    resume: str = "auto"  # auto (latest checkpoint of this run, if any) | none | a checkpoint directory


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """The composed Hydra config as the typed dataclass tree."""
    return OmegaConf.to_object(cfg)


def _need(cond: bool, field_name: str, problem: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {problem}")


def validate(cfg: Config, world_size: int = 1, cuda: bool = False) -> None:
    """Raise ConfigError naming the first invalid field."""
    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.deepspeed
    kv = m.n_kv_head or m.n_head
    _need(m.n_embd % m.n_head == 0, "model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}")
    _need(m.n_head % kv == 0, "model.n_head", f"{m.n_head} is not divisible by model.n_kv_head={kv}")
    _need(m.norm in ("layernorm", "rmsnorm"), "model.norm", f"{m.norm!r} is not layernorm or rmsnorm")
    _need(m.pos in ("learned", "rope"), "model.pos", f"{m.pos!r} is not learned or rope")
    _need(m.mlp in ("gelu", "swiglu"), "model.mlp", f"{m.mlp!r} is not gelu or swiglu")
    _need(m.kernels in ("auto", "triton", "torch"), "model.kernels", f"{m.kernels!r} is not auto, triton or torch")
    _need(0.0 <= m.dropout < 1.0, "model.dropout", f"{m.dropout} is not in [0, 1)")
    if m.pos == "rope":
        _need((m.n_embd // m.n_head) % 2 == 0, "model.n_embd", "rope needs an even head dimension")
    _need(
        cfg.data.seq_len <= m.max_seq_len,
        "data.seq_len",
        f"{cfg.data.seq_len} is above model.max_seq_len={m.max_seq_len}; lower it or raise the model's maximum",
    )
    _need(t.micro_batch >= 1, "train.micro_batch", "must be at least 1")
    _need(
        t.global_batch % (t.micro_batch * world_size) == 0,
        "train.global_batch",
        f"{t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x world size {world_size}",
    )
    _need(t.max_steps >= 1, "train.max_steps", "must be at least 1")
    _need(t.steps_per_run is None or t.steps_per_run >= 1, "train.steps_per_run", "must be at least 1")
    _need(t.keep_last >= 1, "train.keep_last", "must be at least 1")
    _need(o.schedule in ("cosine", "wsd", "constant"), "optim.schedule", f"{o.schedule!r} is not cosine|wsd|constant")
    _need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"{o.lr} must be a positive number")
    _need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"{o.min_lr_ratio} is not in [0, 1]")
    _need(d.stage in (0, 1, 2, 3), "deepspeed.stage", f"{d.stage} is not a ZeRO stage (0-3)")
    _need(d.precision in ("auto", "fp32", "bf16", "fp16"), "deepspeed.precision", f"{d.precision!r} is unknown")
    _need(
        not (d.precision == "fp16" and not cuda),
        "deepspeed.precision",
        "fp16 is not supported on CPU; use fp32 or bf16",
    )
    _need(not d.offload_optimizer or d.stage >= 2, "deepspeed.offload_optimizer", "needs deepspeed.stage 2 or 3")
    _need(not d.offload_param or d.stage == 3, "deepspeed.offload_param", "needs deepspeed.stage 3")
    _need(cfg.logger.mode in ("offline", "online"), "logger.mode", f"{cfg.logger.mode!r} is not offline or online")
    if cfg.data.weights is not None:
        _need(len(cfg.data.weights) == len(cfg.data.paths), "data.weights", "needs one weight per data.paths entry")
    _need(cfg.resume == "auto" or cfg.resume == "none" or bool(cfg.resume), "resume", "use auto, none or a path")
