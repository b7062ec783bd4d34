"""Every setting and its default, as typed dataclasses; Hydra YAML under conf/ only overrides them.

The Hydra entry point composes conf/config.yaml over `Config` (registered below as `base_config`), then
converts the result once with `to_config`, so nothing downstream sees a DictConfig. `validate` fails
before any work starts, naming the field at fault.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """An invalid setting; the message names the field and the fix."""


# Per-field rules: each takes the value and returns what is wrong with it, or None; `setting` puts one
# beside every field (tests/test_config.py checks that each catches a bad value).
def _need(cond: bool, field_name: str, problem: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {problem}")


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


def _entries(v: list) -> str | None:  # a list that may be empty
    return None if all(s.strip() for s in v) else "has an empty entry"


def _task_names(v: list) -> str | None:
    twice = sorted({n for n in v if v.count(n) > 1})
    return _entries(v) or (f"{twice[0]!r} is named twice" if twice else None)


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

LORA_TARGETS = ("qkv", "proj", "up", "gate", "down")


def _lora_targets(v: list) -> str | None:
    return _path_list(v) or next(
        (f"{t!r} is not one of {', '.join(LORA_TARGETS)}" for t in v if t not in LORA_TARGETS), None
    )


def setting(default=MISSING, rule=None, *, factory=MISSING):
    """A config field with its check beside it: `rule(value)` says what is wrong with a value, or None (after
    the value's type has been checked against the field's annotation)."""
    assert rule is not None, "every setting has a rule"
    return field(default=default, default_factory=factory, metadata={"rule": rule})


@dataclass
class ModelConfig:
    """A GPT-style decoder. `vocab_size: null` takes the tokenizer's size."""

    name: str = setting("tiny", _non_empty)
    vocab_size: int | None = setting(None, _optional(_at_least(1)))
    # the embedding and head are padded to a multiple of this (never-used rows)
    pad_vocab_to: int = setting(64, _at_least(1))
    n_layer: int = setting(4, _at_least(1))
    n_head: int = setting(4, _at_least(1))
    # grouped-query attention; None = n_head (multi-head)
    n_kv_head: int | None = setting(None, _optional(_at_least(1)))
    n_embd: int = setting(128, _at_least(1))
    max_seq_len: int = setting(256, _at_least(1))
    norm: str = setting("layernorm", _one_of("layernorm", "rmsnorm"))
    norm_eps: float = setting(1e-5, _positive)
    pos: str = setting("learned", _one_of("learned", "rope"))
    rope_theta: float = setting(10000.0, _positive)
    mlp: str = setting("gelu", _one_of("gelu", "swiglu"))
    # the GELU of mlp=gelu: tanh (GPT-2's approximation) or exact (erf)
    gelu: str = setting("tanh", _one_of("tanh", "exact"))
    # None: 4 * n_embd for gelu; Llama's 2/3 * 4 * n_embd rounded for swiglu
    mlp_hidden: int | None = setting(None, _optional(_at_least(1)))
    mlp_multiple_of: int = setting(256, _at_least(1))  # swiglu hidden size rounding
    tie_embeddings: bool = setting(True, _ok)
    bias: bool = setting(True, _ok)
    dropout: float = setting(0.0, _fraction(high_open=True))
    doc_mask: bool = setting(True, _ok)  # attention stays inside each document of a packed window
    # the attention and norm implementation (auto: Triton on CUDA, the PyTorch references elsewhere)
    kernels: str = setting("auto", _one_of("auto", "triton", "torch"))
    # the head and the loss chunked together, never all the logits (kernels/cross_entropy.py)
    fused_loss: bool = setting(True, _ok)


# settings that change how the model computes, not its weights: free to change on resume and fine-tuning
RUNTIME_MODEL_FIELDS = ("kernels", "dropout", "fused_loss")


@dataclass
class DataConfig:
    """Prepared datasets (python -m llm.data.prepare_data) and, for the demo, how to build them when missing."""

    paths: list[str] = setting(rule=_path_list, factory=lambda: ["data/stdlib"])
    weights: list[float] | None = setting(None, _optional(_weights))  # mixture weights, one per path
    tokenizer: str = setting("data/tokenizer", _non_empty)
    seq_len: int = setting(256, _at_least(1))
    prepare_if_missing: bool = setting(True, _ok)  # build the tokenizer and shards from `corpus` when absent
    corpus: list[str] = setting(rule=_path_list, factory=lambda: ["stdlib"])
    tokenizer_vocab_size: int = setting(8192, _at_least(262))
    # every digit its own piece (python -m llm.data.train_tokenizer --split-digits)
    tokenizer_split_digits: bool = setting(True, _ok)
    val_fraction: float = setting(0.005, _fraction(high_open=True))


@dataclass
class OptimConfig:
    """AdamW with decay on matrices only, and a warmup + cosine (or WSD, or constant) learning rate."""

    lr: float = setting(1e-3, _positive)
    min_lr_ratio: float = setting(0.1, _fraction())  # the final LR as a fraction of lr
    weight_decay: float = setting(0.1, _non_negative)
    beta1: float = setting(0.9, _fraction(high_open=True))
    beta2: float = setting(0.95, _fraction(high_open=True))
    eps: float = setting(1e-8, _positive)
    schedule: str = setting("cosine", _one_of("cosine", "wsd", "constant"))
    warmup_steps: int = setting(20, _at_least(0))
    decay_fraction: float = setting(0.2, _fraction(low_open=True))  # wsd: the share of steps spent decaying at the end
    grad_clip: float = setting(1.0, _non_negative)  # 0 disables clipping


@dataclass
class DeepSpeedConfig:
    """The ZeRO engine. The DeepSpeed JSON is generated from this (llm/parallel/distributed.py), never hand-written."""

    stage: int = setting(0, _one_of(0, 1, 2, 3))  # the ZeRO stage
    offload_optimizer: bool = setting(False, _ok)  # ZeRO-Offload of optimizer state to CPU (stages 2, 3)
    offload_param: bool = setting(False, _ok)  # parameters to CPU too (stage 3)
    # auto: bf16 on GPUs that have it, else fp32
    precision: str = setting("auto", _one_of("auto", "fp32", "bf16", "fp16"))
    reduce_bucket_size: int = setting(500_000_000, _at_least(1))
    allgather_bucket_size: int = setting(500_000_000, _at_least(1))
    overlap_comm: bool = setting(False, _ok)
    # ZeRO-3: a parameter of fewer elements stays whole on every rank instead of being partitioned (DeepSpeed's
    # stage3_param_persistence_threshold); null: DeepSpeed's default, 1e5
    param_persistence_threshold: int | None = setting(None, _optional(_at_least(0)))


@dataclass
class ParallelConfig:
    """How the ranks share the work besides data parallelism (llm/parallel/mesh.py)."""

    # ranks per sequence-parallel group: each holds 1/sequence of every sequence (DeepSpeed-Ulysses' scheme)
    sequence: int = setting(1, _at_least(1))


@dataclass
class LoggerConfig:
    """Where metrics go besides the run directory's metrics.jsonl (always written)."""

    wandb: bool = setting(True, _ok)
    # offline: files under the run dir, which `wandb sync` uploads later
    mode: str = setting("offline", _one_of("offline", "online"))
    project: str = setting("llm", _non_empty)
    entity: str | None = setting(None, _optional(_non_empty))
    log_every: int = setting(10, _at_least(1))  # steps between console/W&B/metrics.jsonl records


@dataclass
class TrainConfig:
    micro_batch: int = setting(8, _at_least(1))  # sequences per rank per forward
    # sequences per optimizer step = micro_batch x world_size x grad accumulation
    global_batch: int = setting(16, _at_least(1))
    max_steps: int = setting(300, _at_least(1))
    eval_every: int = setting(100, _at_least(0))  # 0 disables periodic evaluation (one still runs at the end)
    eval_batches: int = setting(8, _at_least(1))
    # downstream tasks scored at every evaluation, on all ranks (lm-evaluation-harness YAMLs over local data: the
    # shipped stdlib_* tasks, or those in eval_task_paths), logged as eval/<task>/<metric> (docs/evaluation.md)
    eval_tasks: list[str] = setting(rule=_task_names, factory=list)
    eval_task_limit: int | None = setting(100, _optional(_at_least(1)))  # examples per task (null: all)
    eval_task_paths: list[str] = setting(rule=_entries, factory=list)  # directories of task YAMLs
    ckpt_every_steps: int = setting(100, _at_least(0))  # 0 disables step-based checkpoints
    ckpt_every_minutes: float = setting(0.0, _non_negative)  # 0 disables time-based checkpoints
    keep_last: int = setting(3, _at_least(1))
    # stop (with a checkpoint) after this many steps in one invocation
    steps_per_run: int | None = setting(None, _optional(_at_least(1)))
    max_bad_steps: int = setting(5, _at_least(1))  # consecutive non-finite losses before the run stops
    activation_checkpointing: bool = setting(False, _ok)
    compile: bool = setting(False, _ok)
    seed: int = setting(1337, lambda v: None if 0 <= v < 2**63 else f"{v} is not in [0, 2**63)")
    deterministic: bool = setting(False, _ok)  # torch deterministic algorithms (exact-resume tests)
    sample_tokens: int = setting(120, _at_least(0))  # tokens of text generated at the end (0 skips)
    # the device peak for MFU; None = known GPU table, or measured on CPU
    peak_tflops: float | None = setting(None, _optional(_positive))
    # a collective that waits longer (a hung or dead rank) ends the run
    collective_timeout_s: float = setting(300.0, _positive)


@dataclass
class FinetuneConfig:
    """What fine-tuning (`python -m llm.finetune`, task=sft or classify) starts from and learns. The model's
    shape and the tokenizer come from `init_from`; model.dropout, model.kernels and model.fused_loss stay settable."""

    # a pretraining run directory, a checkpoint directory, or hf:DIR (a transformers model)
    init_from: str = setting("", _ok)
    # JSONL: sft {"prompt", "response"} or {"messages": [...]}; classify {"text", "label"}
    train_file: str = setting("", _ok)
    # the same format; evaluated every train.eval_every steps and at the end
    val_file: str | None = setting(None, _optional(_non_empty))
    # classify: last (the EOS appended to each text) or mean (over the text's tokens)
    pooling: str = setting("last", _one_of("last", "mean"))
    # a baseline: init_from's model shape and tokenizer, but freshly initialised weights
    random_init: bool = setting(False, _ok)


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA): with rank > 0 only the adapters (and a classifier's head) train."""

    rank: int = setting(0, _at_least(0))  # 0: full fine-tuning
    alpha: float = setting(16.0, _positive)  # the adapters' output is scaled by alpha / rank
    dropout: float = setting(0.0, _fraction(high_open=True))  # on the adapters' input
    targets: list[str] = setting(rule=_lora_targets, factory=lambda: ["qkv", "proj"])  # of LORA_TARGETS


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = setting("demo", _run_name)  # the run's name; the run directory is <runs_dir>/<name>
    runs_dir: str = setting("runs", _non_empty)
    # auto (latest checkpoint of this run, if any), none, or a checkpoint directory
    resume: str = setting("auto", _non_empty)
    # sft and classify: python -m llm.finetune
    task: str = setting("pretrain", _one_of("pretrain", "sft", "classify"))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


def _rules(node_type, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(node_type):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            out.update(_rules(globals()[f.type] if isinstance(f.type, str) else f.type, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f.metadata["rule"]
    return out


RULES = _rules(Config)  # "section.field" -> its rule, from the fields themselves


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """The composed Hydra config as the typed dataclass tree."""
    return OmegaConf.to_object(cfg)


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
    _check_sequence_parallel(cfg, world_size)
    data = world_size // cfg.parallel.sequence
    _need(
        t.global_batch % (t.micro_batch * data) == 0,
        "train.global_batch",
        f"{t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x "
        + (f"world size {world_size}" if data == world_size else f"{data} data-parallel groups"),
    )
    _need(
        not (d.precision == "fp16" and not cuda),
        "deepspeed.precision",
        "fp16 is not supported on CPU; use fp32 or bf16",
    )
    _need(not d.offload_optimizer or d.stage >= 2, "deepspeed.offload_optimizer", "needs deepspeed.stage 2 or 3")
    _need(not d.offload_param or d.stage == 3, "deepspeed.offload_param", "needs deepspeed.stage 3")
    f, lora = cfg.finetune, cfg.lora
    _need(
        not (t.eval_tasks and cfg.task == "classify"),
        "train.eval_tasks",
        "task=classify has no language-model head to score tasks with; leave train.eval_tasks empty",
    )
    if cfg.task == "pretrain":
        _need(lora.rank == 0, "lora.rank", "LoRA adapters are for fine-tuning (python -m llm.finetune, task=sft)")
    else:
        _need(bool(f.init_from.strip()), "finetune.init_from", "name the run, checkpoint or hf:DIR to fine-tune")
        _need(bool(f.train_file.strip()), "finetune.train_file", "name the JSONL file of training examples")
    if lora.rank:
        _need(d.stage < 3, "lora.rank", "LoRA runs use deepspeed.stage 0-2 (stage 3 is not supported with adapters)")
        _need("gate" not in lora.targets or m.mlp == "swiglu", "lora.targets", "gate needs model.mlp=swiglu")


def _check_sequence_parallel(cfg: Config, world_size: int) -> None:
    m, sp = cfg.model, cfg.parallel.sequence
    if sp == 1:
        return
    kv = m.n_kv_head or m.n_head
    name = "parallel.sequence"
    _need(
        m.n_head % sp == 0, name, f"{sp} does not divide model.n_head={m.n_head} (each rank takes 1/{sp} of the heads)"
    )
    _need(
        kv % sp == 0 or sp % kv == 0,
        name,
        f"{sp} and model.n_kv_head={kv}: one must divide the other (the KV heads are split over the group, or "
        "repeated up to one per rank)",
    )
    _need(
        cfg.data.seq_len % sp == 0,
        name,
        f"{sp} does not divide data.seq_len={cfg.data.seq_len} (each rank holds 1/{sp} of every sequence)",
    )
    _need(cfg.task != "classify", name, "task=classify reads whole sequences; train it with parallel.sequence=1")
    _need(world_size % sp == 0, name, f"{sp} does not divide the world size {world_size}; use a divisor of it")
