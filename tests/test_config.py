"""The config schema and groups: every group composes, recipes are valid, bad values fail naming the field."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from llm.config import Config, ConfigError, register, to_config, validate
from llm.distributed import deepspeed_config
from llm.train import load_config

CONF = Path(__file__).resolve().parent.parent / "conf"


def load(*overrides: str) -> Config:
    register()
    with initialize_config_dir(str(CONF), version_base=None):
        return to_config(compose("config", list(overrides)))


def test_defaults_are_the_schema_defaults():
    cfg = load()
    assert cfg == Config()
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


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.n_embd=130"], "model.n_embd: 130 is not divisible by model.n_head=4"),
        (["model.n_kv_head=3"], "model.n_head: 4 is not divisible by model.n_kv_head=3"),
        (["data.seq_len=512"], "data.seq_len: 512 is above model.max_seq_len=256"),
        (["deepspeed.precision=fp16"], "deepspeed.precision: fp16 is not supported on CPU"),
        (["train.global_batch=12", "train.micro_batch=8"], "train.global_batch: 12 is not divisible"),
        (["model.norm=batchnorm"], "model.norm: 'batchnorm' is not layernorm or rmsnorm"),
        (["deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer: needs deepspeed.stage 2 or 3"),
        (["optim.schedule=linear"], "optim.schedule: 'linear' is not cosine|wsd|constant"),
        (["data.weights=[0.5,0.5]"], "data.weights: needs one weight per data.paths entry"),
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
