"""Load a YAML config, apply `key.path=value` overrides, build the typed `Config`, validate it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import yaml

from umtrain.config.base import ConfigError, build, set_dotted, to_dict
from umtrain.config.schema import Config
from umtrain.config.validate import validate_config


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(str(path), f"is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must hold a mapping of sections (model:, data:, ...)")
    return data


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply `a.b.c=value` strings; the value is parsed as YAML (`x=[1,2]`, `y=null`, `z=1e-4`)."""
    for text in overrides:
        if "=" not in text:
            raise ConfigError(text, "an override must look like key.path=value")
        dotted, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(dotted, f"cannot parse override value {raw!r}: {err}") from err
        set_dotted(data, dotted.strip(), value, Config)
    return data


def config_from_dict(data: dict, world_size: Optional[int] = None, check_files: bool = True) -> Config:
    config = build(Config, data)
    validate_config(config, world_size=world_size, check_files=check_files)
    return config


def load_config(
    path: Optional[str | os.PathLike] = None,
    overrides: Iterable[str] = (),
    world_size: Optional[int] = None,
    check_files: bool = True,
) -> Config:
    """The single entry point: YAML file + overrides -> validated `Config` (raises `ConfigError`)."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    return config_from_dict(data, world_size=world_size, check_files=check_files)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
