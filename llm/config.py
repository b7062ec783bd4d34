"""Every setting and its default, as typed dataclasses; Hydra YAML under conf/ only overrides them.

The Hydra entry point composes conf/config.yaml over `Config` (registered below as `base_config`), then
converts the result once with `to_config`, so nothing downstream sees a DictConfig. `validate` fails
before any work starts, naming the field at fault.
"""

from __future__ import annotations

import dataclasses
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
    gelu: str = "tanh"  # the GELU of mlp=gelu: tanh (GPT-2's approximation, the default) | exact (erf)
    mlp_hidden: int | None = None  # None: 4 * n_embd for gelu; Llama's 2/3 * 4 * n_embd rounded for swiglu
    mlp_multiple_of: int = 256  # swiglu hidden size rounding
    tie_embeddings: bool = True
    bias: bool = True
    dropout: float = 0.0
    doc_mask: bool = True  # attention stays inside each document of a packed window
    kernels: str = "auto"  # auto | triton | torch: the attention and norm implementation
    fused_loss: bool = True  # the head and the loss chunked together, never all the logits (kernels/cross_entropy.py)


# settings that change how the model computes, not its weights: free to change on resume and fine-tuning
RUNTIME_MODEL_FIELDS = ("kernels", "dropout", "fused_loss")


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
    tokenizer_split_digits: bool = True  # every digit its own piece (tools/train_tokenizer.py --split-digits)
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
    collective_timeout_s: float = 300.0  # a collective that waits longer (a hung or dead rank) ends the run


@dataclass
class FinetuneConfig:
    """What fine-tuning (`python -m llm.finetune`, task=sft or classify) starts from and learns. The model's
    shape and the tokenizer come from `init_from`; model.dropout, model.kernels and model.fused_loss stay settable."""

    init_from: str = ""  # a pretraining run directory, a checkpoint directory, or hf:DIR (a transformers model)
    train_file: str = ""  # JSONL: sft {"prompt", "response"} or {"messages": [...]}; classify {"text", "label"}
    val_file: str | None = None  # the same format; evaluated every train.eval_every steps and at the end
    pooling: str = "last"  # classify: last (the EOS appended to each text) | mean (over the text's tokens)
    random_init: bool = False  # a baseline: init_from's model shape and tokenizer, but freshly initialised weights


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA): with rank > 0 only the adapters (and a classifier's head) train."""

    rank: int = 0  # 0: full fine-tuning
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])  # of qkv, proj, up, gate, down


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
    task: str = "pretrain"  # pretrain | sft | classify (the last two: python -m llm.finetune)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """The composed Hydra config as the typed dataclass tree."""
    return OmegaConf.to_object(cfg)


def _need(cond: bool, field_name: str, problem: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {problem}")


# Per-field rules: each takes the value and returns what is wrong with it, or None. Every field of the schema
# has one (tests/test_config.py checks that), applied after its type has been checked against the annotation.
def _at_least(low: float):
    return lambda v: None if v >= low else f"{v} must be at least {low}"


def _positive(v: float) -> str | None:
    return None if v > 0 and math.isfinite(v) else f"{v} must be a positive number"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 and math.isfinite(v) else f"{v} must be a finite number >= 0"


def _fraction(low_open: bool = False, high_open: bool = False):
    def check(v: float) -> str | None:
        ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
        return None if ok else f"{v} is not in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"

    return check


def _one_of(*choices):
    return lambda v: None if v in choices else f"{v!r} is not one of {', '.join(map(str, choices))}"


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _path_list(v: list) -> str | None:
    if not v:
        return "needs at least one entry"
    return None if all(s.strip() for s in v) else "has an empty entry"


def _weights(v: list) -> str | None:
    bad = [w for w in v if not (w > 0 and math.isfinite(w))]
    return f"{bad[0]} is not a positive weight" if bad else None


def _run_name(v: str) -> str | None:
    if not v.strip() or v in (".", "..") or "/" in v or "\\" in v:
        return f"{v!r} must be a single directory name (no '/', not '.' or '..')"
    if len(v.encode()) > 255:
        return f"{v[:20]!r}... is {len(v.encode())} bytes long; a directory name has at most 255"
    return None


def _optional(rule):
    return lambda v: None if v is None else rule(v)


_ok = lambda v: None  # booleans: the type check is the whole check

RULES = {
    "model.name": _non_empty,
    "model.vocab_size": _optional(_at_least(1)),
    "model.pad_vocab_to": _at_least(1),
    "model.n_layer": _at_least(1),
    "model.n_head": _at_least(1),
    "model.n_kv_head": _optional(_at_least(1)),
    "model.n_embd": _at_least(1),
    "model.max_seq_len": _at_least(1),
    "model.norm": _one_of("layernorm", "rmsnorm"),
    "model.norm_eps": _positive,
    "model.pos": _one_of("learned", "rope"),
    "model.rope_theta": _positive,
    "model.mlp": _one_of("gelu", "swiglu"),
    "model.gelu": _one_of("tanh", "exact"),
    "model.mlp_hidden": _optional(_at_least(1)),
    "model.mlp_multiple_of": _at_least(1),
    "model.tie_embeddings": _ok,
    "model.bias": _ok,
    "model.dropout": _fraction(high_open=True),
    "model.doc_mask": _ok,
    "model.kernels": _one_of("auto", "triton", "torch"),
    "model.fused_loss": _ok,
    "data.paths": _path_list,
    "data.weights": _optional(_weights),
    "data.tokenizer": _non_empty,
    "data.seq_len": _at_least(1),
    "data.prepare_if_missing": _ok,
    "data.tokenizer_split_digits": _ok,
    "data.corpus": _path_list,
    "data.tokenizer_vocab_size": _at_least(262),  # byte fallback alone takes 261 ids (256 bytes, specials, "\n")
    "data.val_fraction": _fraction(high_open=True),
    "optim.lr": _positive,
    "optim.min_lr_ratio": _fraction(),
    "optim.weight_decay": _non_negative,
    "optim.beta1": _fraction(high_open=True),
    "optim.beta2": _fraction(high_open=True),
    "optim.eps": _positive,
    "optim.schedule": _one_of("cosine", "wsd", "constant"),
    "optim.warmup_steps": _at_least(0),
    "optim.decay_fraction": _fraction(low_open=True),
    "optim.grad_clip": _non_negative,
    "deepspeed.stage": _one_of(0, 1, 2, 3),
    "deepspeed.offload_optimizer": _ok,
    "deepspeed.offload_param": _ok,
    "deepspeed.precision": _one_of("auto", "fp32", "bf16", "fp16"),
    "deepspeed.reduce_bucket_size": _at_least(1),
    "deepspeed.allgather_bucket_size": _at_least(1),
    "deepspeed.overlap_comm": _ok,
    "logger.wandb": _ok,
    "logger.mode": _one_of("offline", "online"),
    "logger.project": _non_empty,
    "logger.entity": _optional(_non_empty),
    "logger.log_every": _at_least(1),
    "train.micro_batch": _at_least(1),
    "train.global_batch": _at_least(1),
    "train.max_steps": _at_least(1),
    "train.eval_every": _at_least(0),
    "train.eval_batches": _at_least(1),
    "train.ckpt_every_steps": _at_least(0),
    "train.ckpt_every_minutes": _non_negative,
    "train.keep_last": _at_least(1),
    "train.steps_per_run": _optional(_at_least(1)),
    "train.max_bad_steps": _at_least(1),
    "train.activation_checkpointing": _ok,
    "train.compile": _ok,
    "train.seed": lambda v: None if 0 <= v < 2**63 else f"{v} is not in [0, 2**63)",
    "train.deterministic": _ok,
    "train.sample_tokens": _at_least(0),
    "train.peak_tflops": _optional(_positive),
    "train.collective_timeout_s": _positive,
    "name": _run_name,
    "runs_dir": _non_empty,
    "resume": _non_empty,
    "task": _one_of("pretrain", "sft", "classify"),
    "finetune.init_from": _ok,  # required by the fine-tuning tasks: checked with them below
    "finetune.train_file": _ok,
    "finetune.val_file": _optional(_non_empty),
    "finetune.pooling": _one_of("last", "mean"),
    "finetune.random_init": _ok,
    "lora.rank": _at_least(0),
    "lora.alpha": _positive,
    "lora.dropout": _fraction(high_open=True),
    "lora.targets": lambda v: (
        _path_list(v)
        or next((f"{t!r} is not one of {', '.join(LORA_TARGETS)}" for t in v if t not in LORA_TARGETS), None)
    ),
}
LORA_TARGETS = ("qkv", "proj", "up", "gate", "down")


def _type_problem(value, annotation) -> str | None:
    """What is wrong with the value's type for a field annotated `annotation` (a string: the module uses
    postponed annotations), or None. Supports the few forms the schema uses."""
    kind = annotation.replace(" ", "")
    if kind.endswith("|None"):
        if value is None:
            return None
        kind = kind[: -len("|None")]
    if kind.startswith("list["):
        if not isinstance(value, list):
            return f"expected a list, got {value!r}"
        for item in value:
            problem = _type_problem(item, kind[5:-1])
            if problem:
                return problem
        return None
    types, wanted = {
        "int": ((int,), "an integer"),
        "float": ((int, float), "a number"),
        "bool": ((bool,), "true or false"),
        "str": ((str,), "a string"),
    }[kind]
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, types):
        return f"expected {wanted}, got {value!r}"
    return None


def _fields(node, prefix: str = ""):
    """(dotted name, value, annotation) of every leaf field of a config dataclass tree."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f.type


def validate(cfg: Config, world_size: int = 1, cuda: bool = False) -> None:
    """Raise ConfigError naming the first invalid field: its type, its own range or choices, then the rules
    that tie fields together."""
    for name, value, annotation in _fields(cfg):
        problem = _type_problem(value, annotation) or RULES[name](value)
        if problem:
            raise ConfigError(f"{name}: {problem}")
    m, t, d = cfg.model, cfg.train, cfg.deepspeed
    kv = m.n_kv_head or m.n_head
    _need(m.n_embd % m.n_head == 0, "model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}")
    _need(m.n_head % kv == 0, "model.n_head", f"{m.n_head} is not divisible by model.n_kv_head={kv}")
    if m.pos == "rope":
        _need((m.n_embd // m.n_head) % 2 == 0, "model.n_embd", "rope needs an even head dimension")
    _need(
        cfg.data.seq_len <= m.max_seq_len,
        "data.seq_len",
        f"{cfg.data.seq_len} is above model.max_seq_len={m.max_seq_len}; lower it or raise the model's maximum",
    )
    if cfg.data.weights is not None:
        _need(len(cfg.data.weights) == len(cfg.data.paths), "data.weights", "needs one weight per data.paths entry")
    _need(
        t.global_batch % (t.micro_batch * world_size) == 0,
        "train.global_batch",
        f"{t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x world size {world_size}",
    )
    _need(
        not (d.precision == "fp16" and not cuda),
        "deepspeed.precision",
        "fp16 is not supported on CPU; use fp32 or bf16",
    )
    _need(not d.offload_optimizer or d.stage >= 2, "deepspeed.offload_optimizer", "needs deepspeed.stage 2 or 3")
    _need(not d.offload_param or d.stage == 3, "deepspeed.offload_param", "needs deepspeed.stage 3")
    f, lora = cfg.finetune, cfg.lora
    if cfg.task == "pretrain":
        _need(lora.rank == 0, "lora.rank", "LoRA adapters are for fine-tuning (python -m llm.finetune, task=sft)")
    else:
        _need(bool(f.init_from.strip()), "finetune.init_from", "name the run, checkpoint or hf:DIR to fine-tune")
        _need(bool(f.train_file.strip()), "finetune.train_file", "name the JSONL file of training examples")
    if lora.rank:
        _need(d.stage < 3, "lora.rank", "LoRA runs use deepspeed.stage 0-2 (stage 3 is not supported with adapters)")
        _need("gate" not in lora.targets or m.mlp == "swiglu", "lora.targets", "gate needs model.mlp=swiglu")
