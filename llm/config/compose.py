"""The config of a run from conf/ and command-line overrides, as `python -m llm.train` and the other entry
points take them; a bad override becomes one line naming it (with the closest key when it is misspelt)."""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import OmegaConf

from llm.config.schema import RULES, Config, ConfigError, register, to_config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _all_keys(node, prefix="") -> list[str]:
    out = []
    for key, value in node.items():
        out += _all_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


def _check_additions(overrides: list[str]) -> None:
    """`+key=value` adds a key Hydra does not know: one that is not in the schema (a typo behind the `+`) would be
    dropped silently when the config becomes the dataclasses, so it is refused like any unknown override."""
    keys = _all_keys(OmegaConf.to_container(OmegaConf.structured(Config)))
    known = set(keys) | {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    groups = {d.name for d in CONF_DIR.iterdir() if d.is_dir()}
    for o in overrides:
        if not o.startswith("+"):
            continue
        key = o.lstrip("+").split("=", 1)[0]
        if key not in known and key not in groups:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"bad override: {o}: {key!r} is not a setting{hint} (`python -m llm.train --cfg` prints every key)"
            )


def load_config(overrides: list[str]) -> Config:
    """Compose conf/config.yaml with the overrides; a bad override raises ConfigError in one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    _check_additions(overrides)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            return to_config(compose("config", overrides))
    except (HydraException, OmegaConfBaseException) as e:
        text = str(e).split("Config search path")[0]
        first = text.splitlines()[0].strip()
        options = [line.strip() for line in text.splitlines()[1:] if line.startswith("\t")]
        cause = str(e.__cause__).splitlines()[0] if e.__cause__ else ""
        message = " ".join(x for x in (first, cause, f"(options: {', '.join(options)})" if options else "") if x)
        keys = _all_keys(OmegaConf.to_container(OmegaConf.structured(Config)))
        bad = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        close = [
            m for b in bad if "." in b and b not in keys for m in difflib.get_close_matches(b, keys, n=1, cutoff=0.8)
        ]
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"bad override: {message}{hint} (`python -m llm.train --cfg` prints every key)") from None


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.runs_dir) / cfg.name


def run_dir_problem(cfg: Config) -> str | None:
    """What is wrong with the settings that place the run directory (a bad name must not decide where files
    go), or None."""
    for key, value in (("name", cfg.name), ("runs_dir", cfg.runs_dir)):
        problem = "expected a string" if not isinstance(value, str) else RULES[key](value)
        if problem:
            return f"{key}: {problem}"
    return None
