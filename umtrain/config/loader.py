"""Load a YAML config, apply `key.path=value` overrides, build the typed `Config`, validate it."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable, Optional

import yaml

from umtrain.config.base import ConfigError, build, merged, set_dotted, to_dict
from umtrain.config.schema import PKM_MEMORY_DEFAULTS, Config
from umtrain.config.validate import validate_config

logger = logging.getLogger("umtrain")


class ConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load` with two changes, for config files and override values alike:

    - numbers are read as YAML 1.2 reads them: PyYAML's YAML 1.1 turns `1:30` into 90 (base 60), `0755` into 493
      (octal) and `1_000` into 1000, so a placement `[1:2]`, a directory `0755` or a run name `007` would silently
      become other values; here they stay strings (as do `1_000`, `0b101` and signed hex), and `1e-4` is a float
      (YAML 1.1 needs `1.0e-4`);
    - a key given twice in one mapping is an error (PyYAML keeps the last one); merge keys (`<<: *defaults`) work.
    """


_YAML_1_2_NUMBERS = [
    ("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+)$"), "-+0123456789"),
    ("tag:yaml.org,2002:float",
     re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
     "-+.0123456789"),
]
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _regexp, _first in _YAML_1_2_NUMBERS:
    ConfigLoader.add_implicit_resolver(_tag, _regexp, list(_first))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    try:
        return int(text, 0)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer (YAML 1.2: decimal without "
                                                            f"leading zeros, 0x hex or 0o octal)", node.start_mark)


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


class ConfigDumper(yaml.SafeDumper):
    """`yaml.safe_dump` that quotes every string a reader could take for another type: those `ConfigLoader` reads as
    numbers (YAML 1.2: a run name `1e3`) as well as those `yaml.safe_load` does (YAML 1.1: `1:30`, `0755`), so that
    a dumped config reads back the same through either."""


ConfigDumper.yaml_implicit_resolvers = {
    first: [*yaml.SafeDumper.yaml_implicit_resolvers.get(first, []),
            *ConfigLoader.yaml_implicit_resolvers.get(first, [])]
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *ConfigLoader.yaml_implicit_resolvers}}


def parse_yaml(text: str):
    return yaml.load(text, Loader=ConfigLoader)


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        data = parse_yaml(path.read_text())
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
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(dotted, f"cannot parse override value {raw!r}: {err}") from err
        set_dotted(data, dotted.strip(), value, Config)
    return data


REMOVED_KEYS = {
    "data.num_workers": "it was never read (the dataset is indexed in the training process)",
}
"""Keys older configs (and the configs saved in older checkpoints) may hold: dropped with a warning, not refused."""


def drop_removed_keys(data: dict) -> dict:
    for dotted, why in REMOVED_KEYS.items():
        *sections, name = dotted.split(".")
        parent = data
        for section in sections:
            parent = parent.get(section) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and name in parent:
            del parent[name]
            logger.warning("config key %s is ignored: %s", dotted, why)
    return data


def with_family_defaults(data: dict) -> dict:
    """A PKM model's memory section starts from PKM's switches (`PKM_MEMORY_DEFAULTS`), not UltraMem's: `family:
    pkm` with a partial memory section would otherwise train an UltraMem layer under the PKM name."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("family") != "pkm" or not isinstance(model.get("memory"), dict):
        return data   # no PKM memory section to complete (`build` and the checks name what is wrong)
    return {**data, "model": {**model, "memory": merged(PKM_MEMORY_DEFAULTS, model["memory"])}}


def config_from_dict(data: dict, world_size: Optional[int] = None, check_files: bool = True) -> Config:
    config = build(Config, drop_removed_keys(with_family_defaults(data)))
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
    return yaml.dump(to_dict(config), Dumper=ConfigDumper, sort_keys=False)
