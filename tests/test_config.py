"""The config schema and groups: every group composes, recipes are valid, bad values fail naming the field."""

import dataclasses
import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from llm.config.schema import Config, ConfigError, register, to_config, validate
from llm.parallel.distributed import autocast_dtype, deepspeed_config
from llm.train import load_config

CONF = Path(__file__).resolve().parent.parent / "conf"


def load(*overrides: str) -> Config:
    register()
    with initialize_config_dir(str(CONF), version_base=None):
        return to_config(compose("config", list(overrides)))


def test_defaults_are_the_schema_defaults_and_the_demo_experiment():
    cfg = load()
    base = Config()
    assert cfg == replace(
        base,
        model=replace(base.model, max_seq_len=128),
        data=replace(base.data, seq_len=128, tokenizer_vocab_size=2048, tokenizer_split_digits=False),
        train=replace(base.train, max_steps=1000, eval_every=250, ckpt_every_steps=250),
    )  # conf/model/tiny.yaml and conf/experiment/demo.yaml: the demo's changes to the schema, nothing else
    validate(cfg, world_size=2, cuda=False)  # the demo as it is on two ranks
    # another model at another length composes over the default experiment (nothing of the demo's to undo)
    gpt2 = load("model=gpt2-124m", "data.seq_len=1024")
    validate(gpt2, world_size=2, cuda=False)
    assert gpt2.model.max_seq_len == 1024 and gpt2.data.seq_len == 1024
    assert cfg.model.name == "tiny" and cfg.deepspeed.stage == 0 and cfg.logger.wandb and cfg.logger.mode == "offline"


@pytest.mark.parametrize(
    "group, option", [(g.name, f.stem) for g in sorted(CONF.iterdir()) if g.is_dir() for f in sorted(g.glob("*.yaml"))]
)
def test_every_group_option_composes(group, option):
    cfg = load(f"{group}={option}")
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(
    "experiment, world", [("gpt2-124m", 8), ("gpt2-350m", 8), ("gpt2-774m", 16), ("llama-1b", 32), ("llama-7b", 64)]
)
def test_recipes_are_valid_at_their_scale(experiment, world):
    cfg = load(f"experiment={experiment}")
    assert cfg.model.name == experiment and cfg.name == experiment
    validate(cfg, world_size=world, cuda=True)
    ds = deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * world * ds["gradient_accumulation_steps"]


def test_deepspeed_json_is_generated_from_the_schema():
    cfg = load(
        "deepspeed=zero3-offload",
        "train.micro_batch=2",
        "train.global_batch=16",
        "optim.grad_clip=0.5",
        "deepspeed.precision=bf16",
    )
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    json.dumps(ds)
    zero = deepspeed_config(cfg, world_size=2, n_params=1_000_000)["zero_optimization"]  # buckets: the model at most
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 1_000_000
    assert ds["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert ds["timers"] == {"throughput": {"enabled": False}}  # DeepSpeed's default synchronises every micro-batch
    assert "stage3_param_persistence_threshold" not in ds["zero_optimization"]  # DeepSpeed's default
    cfg.deepspeed.param_persistence_threshold = 0
    assert deepspeed_config(cfg, world_size=2)["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_without_zero_is_autocast_and_under_zero_deepspeed_bf16(stage):
    cfg = load(f"deepspeed.stage={stage}", "deepspeed.precision=bf16", "optim.grad_clip=0.5")
    ds = deepspeed_config(cfg, world_size=1)
    if stage == 0:  # fp32 weights and gradients, bf16 matmuls (the engine's autocast); the loop clips, as in fp32
        assert autocast_dtype(cfg) == torch.bfloat16 and not ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    else:
        assert autocast_dtype(cfg) is None and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
        assert not ds["torch_autocast"]["enabled"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.n_embd=130"], "model.n_embd: 130 is not divisible by model.n_head=4"),
        (["model.n_kv_head=3"], "model.n_head: 4 is not divisible by model.n_kv_head=3"),
        (["data.seq_len=512"], "data.seq_len: 512 is above model.max_seq_len=128"),
        (["deepspeed.precision=fp16"], "deepspeed.precision: fp16 is not supported on CPU"),
        (["train.global_batch=12", "train.micro_batch=8"], "train.global_batch: 12 is not divisible"),
        (["deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer: needs deepspeed.stage 2 or 3"),
        (["data.weights=[0.5,0.5]"], "data.weights: needs one weight per data.paths entry"),
        (
            ["task=classify", "finetune.init_from=runs/demo", "finetune.train_file=t.jsonl", "train.eval_tasks=[a]"],
            "train.eval_tasks: task=classify has no language-model head",
        ),
    ],
)
def test_invalid_values_fail_naming_the_field(overrides, field):
    cfg = load(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1, cuda=False)
    assert str(e.value).startswith(field), str(e.value)


@pytest.mark.parametrize("override", ["model.n_layr=3", "train.nope=1", "deepspeed=zero9", "model.n_layer=abc"])
def test_unknown_or_mistyped_overrides_are_refused(override):
    with pytest.raises(ConfigCompositionException):
        load(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layr=3", "Key 'n_layr' not in 'ModelConfig'; did you mean model.n_layer?"),
        ("deepspeed=zero9", "Could not find 'deepspeed/zero9' (options: zero0, zero1, zero2, zero3, zero3-offload)"),
        ("model.n_layer=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ],
)
def test_the_entry_point_explains_a_bad_override_in_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([override])
    assert str(e.value).startswith("bad override: ") and message in str(e.value) and "\n" not in str(e.value)


# One invalid value for every field of the schema (a wrong type, out of range, or not a choice), with the start
# of the one-line error it must give. test_every_field_has_a_bad_value keeps this table complete.
BAD_VALUES = {
    "model.name": ("", "model.name: must not be empty"),
    "model.vocab_size": (0, "model.vocab_size: 0 must be at least 1"),
    "model.pad_vocab_to": (0, "model.pad_vocab_to: 0 must be at least 1"),
    "model.n_layer": ("4", "model.n_layer: expected an integer, got '4'"),
    "model.n_head": (0, "model.n_head: 0 must be at least 1"),
    "model.n_kv_head": (-2, "model.n_kv_head: -2 must be at least 1"),
    "model.n_embd": (True, "model.n_embd: expected an integer, got True"),
    "model.max_seq_len": (0, "model.max_seq_len: 0 must be at least 1"),
    "model.norm": ("batchnorm", "model.norm: 'batchnorm' is not one of layernorm, rmsnorm"),
    "model.norm_eps": (0.0, "model.norm_eps: 0.0 must be a positive number"),
    "model.pos": ("alibi", "model.pos: 'alibi' is not one of learned, rope"),
    "model.rope_theta": (float("inf"), "model.rope_theta: inf must be a positive number"),
    "model.mlp": ("relu", "model.mlp: 'relu' is not one of gelu, swiglu"),
    "model.gelu": ("approx", "model.gelu: 'approx' is not one of tanh, exact"),
    "model.mlp_hidden": (0, "model.mlp_hidden: 0 must be at least 1"),
    "model.mlp_multiple_of": (0, "model.mlp_multiple_of: 0 must be at least 1"),
    "model.tie_embeddings": ("yes", "model.tie_embeddings: expected true or false, got 'yes'"),
    "model.bias": (1, "model.bias: expected true or false, got 1"),
    "model.dropout": (1.0, "model.dropout: 1.0 is not in [0, 1)"),
    "model.doc_mask": (None, "model.doc_mask: expected true or false, got None"),
    "model.kernels": ("cuda", "model.kernels: 'cuda' is not one of auto, triton, torch"),
    "model.fused_loss": ("yes", "model.fused_loss: expected true or false, got 'yes'"),
    "data.paths": ([], "data.paths: needs at least one entry"),
    "data.weights": ([-1.0], "data.weights: -1.0 is not a positive weight"),
    "data.tokenizer": ("", "data.tokenizer: must not be empty"),
    "data.seq_len": (0, "data.seq_len: 0 must be at least 1"),
    "data.prepare_if_missing": ("no", "data.prepare_if_missing: expected true or false, got 'no'"),
    "data.tokenizer_split_digits": (1, "data.tokenizer_split_digits: expected true or false, got 1"),
    "data.corpus": ([""], "data.corpus: has an empty entry"),
    "data.tokenizer_vocab_size": (100, "data.tokenizer_vocab_size: 100 must be at least 262"),
    "data.val_fraction": (1.0, "data.val_fraction: 1.0 is not in [0, 1)"),
    "optim.lr": (0.0, "optim.lr: 0.0 must be a positive number"),
    "optim.min_lr_ratio": (1.5, "optim.min_lr_ratio: 1.5 is not in [0, 1]"),
    "optim.weight_decay": (-0.1, "optim.weight_decay: -0.1 must be a finite number >= 0"),
    "optim.beta1": (1.5, "optim.beta1: 1.5 is not in [0, 1)"),
    "optim.beta2": (1.0, "optim.beta2: 1.0 is not in [0, 1)"),
    "optim.eps": (0.0, "optim.eps: 0.0 must be a positive number"),
    "optim.schedule": ("linear", "optim.schedule: 'linear' is not one of cosine, wsd, constant"),
    "optim.warmup_steps": (-1, "optim.warmup_steps: -1 must be at least 0"),
    "optim.decay_fraction": (0.0, "optim.decay_fraction: 0.0 is not in (0, 1]"),
    "optim.grad_clip": (float("nan"), "optim.grad_clip: nan must be a finite number >= 0"),
    "deepspeed.stage": (4, "deepspeed.stage: 4 is not one of 0, 1, 2, 3"),
    "deepspeed.offload_optimizer": ("cpu", "deepspeed.offload_optimizer: expected true or false, got 'cpu'"),
    "deepspeed.offload_param": (0, "deepspeed.offload_param: expected true or false, got 0"),
    "deepspeed.precision": ("fp8", "deepspeed.precision: 'fp8' is not one of auto, fp32, bf16, fp16"),
    "deepspeed.reduce_bucket_size": (0, "deepspeed.reduce_bucket_size: 0 must be at least 1"),
    "deepspeed.allgather_bucket_size": (-1, "deepspeed.allgather_bucket_size: -1 must be at least 1"),
    "deepspeed.overlap_comm": ("true", "deepspeed.overlap_comm: expected true or false, got 'true'"),
    "parallel.sequence": (0, "parallel.sequence: 0 must be at least 1"),
    "logger.wandb": (None, "logger.wandb: expected true or false, got None"),
    "logger.mode": ("disabled", "logger.mode: 'disabled' is not one of offline, online"),
    "logger.project": (" ", "logger.project: must not be empty"),
    "logger.entity": ("", "logger.entity: must not be empty"),
    "logger.log_every": (0, "logger.log_every: 0 must be at least 1"),
    "train.micro_batch": (0, "train.micro_batch: 0 must be at least 1"),
    "train.global_batch": (0, "train.global_batch: 0 must be at least 1"),
    "train.max_steps": (0, "train.max_steps: 0 must be at least 1"),
    "train.eval_every": (-1, "train.eval_every: -1 must be at least 0"),
    "train.eval_batches": (0, "train.eval_batches: 0 must be at least 1"),
    "deepspeed.param_persistence_threshold": (-1, "deepspeed.param_persistence_threshold: -1 must be at least 0"),
    "train.eval_tasks": (["stdlib_rolling", "stdlib_rolling"], "train.eval_tasks: 'stdlib_rolling' is named twice"),
    "train.eval_task_limit": (0, "train.eval_task_limit: 0 must be at least 1"),
    "train.eval_task_paths": ([" "], "train.eval_task_paths: has an empty entry"),
    "train.ckpt_every_steps": (-5, "train.ckpt_every_steps: -5 must be at least 0"),
    "train.ckpt_every_minutes": (-1.0, "train.ckpt_every_minutes: -1.0 must be a finite number >= 0"),
    "train.keep_last": (0, "train.keep_last: 0 must be at least 1"),
    "train.steps_per_run": (0, "train.steps_per_run: 0 must be at least 1"),
    "train.max_bad_steps": (0, "train.max_bad_steps: 0 must be at least 1"),
    "train.activation_checkpointing": ("on", "train.activation_checkpointing: expected true or false, got 'on'"),
    "train.compile": (2, "train.compile: expected true or false, got 2"),
    "train.seed": (-1, "train.seed: -1 is not in [0, 2**63)"),
    "train.deterministic": ("1", "train.deterministic: expected true or false, got '1'"),
    "train.sample_tokens": (-1, "train.sample_tokens: -1 must be at least 0"),
    "train.peak_tflops": (0.0, "train.peak_tflops: 0.0 must be a positive number"),
    "train.collective_timeout_s": (0, "train.collective_timeout_s: 0 must be a positive number"),
    "name": ("a/b", "name: 'a/b' must be a single directory name"),
    "runs_dir": ("", "runs_dir: must not be empty"),
    "resume": ("", "resume: must not be empty"),
    "task": ("dpo", "task: 'dpo' is not one of pretrain, sft, classify"),
    "finetune.init_from": (3, "finetune.init_from: expected a string, got 3"),
    "finetune.train_file": (None, "finetune.train_file: expected a string, got None"),
    "finetune.val_file": ("", "finetune.val_file: must not be empty"),
    "finetune.pooling": ("cls", "finetune.pooling: 'cls' is not one of last, mean"),
    "finetune.random_init": ("no", "finetune.random_init: expected true or false, got 'no'"),
    "lora.rank": (-1, "lora.rank: -1 must be at least 0"),
    "lora.alpha": (0, "lora.alpha: 0 must be a positive number"),
    "lora.dropout": (1.0, "lora.dropout: 1.0 is not in [0, 1)"),
    "lora.targets": (["qkv", "attn"], "lora.targets: 'attn' is not one of qkv, proj, up, gate, down"),
}


def leaf_fields(node, prefix=""):
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        out += leaf_fields(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [f"{prefix}{f.name}"]
    return out


def test_every_field_has_a_bad_value():
    assert sorted(BAD_VALUES) == sorted(leaf_fields(Config()))


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_every_field_is_validated(name):
    value, message = BAD_VALUES[name]
    cfg = Config()
    *path, leaf = name.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, leaf, value)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1, cuda=False)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_the_defaults_and_every_recipe_pass_every_rule():
    validate(Config())
    for recipe in sorted((CONF / "experiment").glob("*.yaml")):
        cfg = load(f"experiment={recipe.stem}")
        validate(cfg, world_size=cfg.parallel.sequence, cuda=True)  # the fewest ranks it can run on


def hydra_literal(value) -> str:
    """A value as a Hydra command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_literal(v) for v in value) + "]"
    return str(value)


# values that the command line turns into valid ones (OmegaConf converts '4' to 4, 'yes', 1 and 2 to true, 3 to
# '3'): others of the same kind of mistake there
CLI_BAD = {
    "model.n_layer": "four",
    "model.n_embd": "big",
    "model.tie_embeddings": "maybe",
    "model.bias": "maybe",
    "model.fused_loss": "maybe",
    "data.prepare_if_missing": "maybe",
    "data.tokenizer_split_digits": "maybe",
    "deepspeed.offload_optimizer": "cpu",
    "deepspeed.offload_param": "maybe",
    "deepspeed.overlap_comm": "maybe",
    "train.activation_checkpointing": "maybe",
    "train.compile": "maybe",
    "train.deterministic": "maybe",
    "finetune.random_init": "maybe",
    "finetune.init_from": "[a]",
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_every_field_is_refused_by_train_and_the_command_line_in_one_line_writing_nothing(
    name, tmp_path, monkeypatch, capsys
):
    from llm import train as train_module

    monkeypatch.chdir(tmp_path)  # relative settings (runs_dir="", resume="") land here
    value, message = BAD_VALUES[name]
    # were the bad value ever accepted, the run would stop at its missing data, not train
    safe = {"runs_dir": str(tmp_path / "runs"), "data.paths": [str(tmp_path / "none")]}
    safe["data.prepare_if_missing"] = False
    cfg = Config()
    for key, v in {**safe, name: value}.items():
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        setattr(node, leaf, v)
    with pytest.raises(ConfigError) as e:
        train_module.train(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    # the command line: exit 2, one line naming the field; at most the run's outcome record is written (the
    # job script reads it: bad input, not to be requeued)
    overrides = [f"{k}={hydra_literal(v)}" for k, v in safe.items() if k != name]
    overrides.append(f"{name}={CLI_BAD.get(name, hydra_literal(value))}")
    handlers = [signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)]
    with pytest.raises(SystemExit) as exit_:
        train_module.main(overrides)
    assert [signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)] == handlers  # left as they were
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert name in err or name.split(".")[-1] in err, err
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all("/outcome/" in p for p in written), written
