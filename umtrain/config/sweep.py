"""Config sweeps as pure functions: `--grid key=[v1,v2]` axes -> points -> named runs -> resolved, validated configs.

A sweep is the Cartesian product of its grid axes, times its zip groups: axes that vary together, each group one
more factor.
Each point gets a readable, unique, stable name (`lr3e-4_topk32`) built from the values it sets, and its own
`checkpoint.save` (and `logging.tensorboard_dir` when the base config logs to tensorboard) under `OUT/<name>/`.
Nothing here touches the filesystem except reading the base YAML; `umtrain.cli.sweep` writes and launches.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from umtrain.config.base import ConfigError, set_dotted
from umtrain.config.loader import apply_overrides, config_from_dict, parse_yaml, read_yaml
from umtrain.config.schema import Config

RUN_CHECKPOINTS = "checkpoints"
"""Each run's checkpoint.save: OUT/<name>/checkpoints."""
SWEEP_OWNED_KEYS = ("run_name", "checkpoint.save", "logging.tensorboard_dir", "logging.profile_dir")
"""Keys the sweep sets per run (so each run has its own name and directories): not sweepable or fixable."""


@dataclass(frozen=True)
class Axis:
    """One swept key and the values it takes, in the order given."""

    key: str
    values: tuple


@dataclass(frozen=True)
class ZipGroup:
    """Axes that vary together (the i-th values of each form the group's i-th point): one factor of the product.
    `label` is the GROUP of `--zip GROUP:KEY=[...]`; '' for the unlabelled group."""

    label: str
    axes: tuple[Axis, ...]

    def describe(self) -> str:
        return f"zip group {self.label!r}" if self.label else "the unlabelled zip group"


@dataclass(frozen=True)
class SweepRun:
    """One point of the sweep: its name, the swept values it sets, and its resolved config."""

    name: str
    point: dict[str, Any]
    config: Config


def parse_axis(text: str) -> Axis:
    """`key.path=[v1, v2, ...]` (a YAML list; each value parsed as YAML like an override value) -> Axis."""
    if "=" not in text:
        raise ConfigError(text, "a sweep axis must look like key.path=[v1,v2,...]")
    key, raw = (part.strip() for part in text.split("=", 1))
    if ":" in key:
        raise ConfigError(key, "a GROUP: label is only for --zip GROUP:KEY=[...]")
    try:
        values = parse_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(key, f"cannot parse the sweep values {raw!r}: {err}") from err
    if not isinstance(values, list) or not values:
        raise ConfigError(key, f"sweep values must be a non-empty YAML list like [1e-3,3e-4], got {raw!r}")
    seen = []
    for value in values:
        if value in seen:
            raise ConfigError(key, f"sweep value {value!r} is listed twice")
        seen.append(value)
    set_dotted({}, key, None, Config)   # an unknown key is named now, before any config is built
    return Axis(key, tuple(values))


ZIP_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_zip(texts: Iterable[str]) -> list[ZipGroup]:
    """`--zip [GROUP:]KEY=[...]` arguments -> their groups, in the order each group first appears; the keys of a
    group in the order given. Unlabelled arguments form one group, as labelled ones with the same GROUP do."""
    groups: dict[str, list[Axis]] = {}
    for text in texts:
        label, axis_text = "", text
        head = text.split("=", 1)[0]
        if ":" in head:
            label, axis_text = (part.strip() for part in text.split(":", 1))
            if not ZIP_LABEL.match(label):
                raise ConfigError(head.strip(), f"a zip group label (GROUP in --zip GROUP:KEY=[...]) is letters, "
                                                f"digits, '_' or '-', got {label!r}")
        groups.setdefault(label, []).append(parse_axis(axis_text))
    return [ZipGroup(label, tuple(axes)) for label, axes in groups.items()]


@dataclass(frozen=True)
class Setting:
    """One dotted leaf key that a swept key or a fixed override sets: the key itself, or a key inside its mapping
    value (a mapping merges into the section, so `model.memory={topk: 16}` sets `model.memory.topk` only)."""

    key: str
    leaf: str

    def describe(self) -> str:
        return self.key if self.leaf == self.key else f"{self.key} (whose value sets {self.leaf})"

    def overlaps(self, other: Setting) -> bool:
        """One leaf is the other or a section holding it (`model.memory` set to null and `model.memory.topk`)."""
        short, long = sorted((self.leaf, other.leaf), key=len)
        return long == short or long.startswith(short + ".")


def leaf_keys(key: str, value: Any) -> list[str]:
    """The dotted keys setting `key` to `value` changes: a mapping's leaves (recursively), else `key` itself."""
    if not isinstance(value, dict):
        return [key]
    return [leaf for name, item in value.items() for leaf in leaf_keys(f"{key}.{name}", item)]


def axis_settings(axis: Axis) -> list[Setting]:
    leaves = dict.fromkeys(leaf for value in axis.values for leaf in leaf_keys(axis.key, value))
    return [Setting(axis.key, leaf) for leaf in leaves]


def override_settings(text: str) -> list[Setting]:
    """The leaves of a fixed `key=value` override; one that does not parse is named later by `apply_overrides`."""
    key, _, raw = (part.strip() for part in text.partition("="))
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError:
        value = None
    return [Setting(key, leaf) for leaf in leaf_keys(key, value)]


OWNED_SETTINGS = [Setting(key, key) for key in SWEEP_OWNED_KEYS]


def first_overlap(settings: list[Setting], others: list[Setting]) -> Optional[tuple[Setting, Setting]]:
    return next(((a, b) for a in settings for b in others if a.overlaps(b)), None)


def conflict(message: str, a: Setting, b: Setting) -> str:
    """`message`, with the two settings named unless they are the same plain key."""
    return message if a == b and a.leaf == a.key else f"{message} ({a.describe()} and {b.describe()} overlap)"


def owned_conflict(setting: Setting, owned: Setting, verb: str) -> ConfigError:
    subject = "is" if setting == owned else f"sets {owned.key}, which is"
    return ConfigError(setting.key, f"{subject} set per run by the sweep (under --out); it cannot be {verb}")


def check_axes(grid: list[Axis], zip_groups: list[ZipGroup], fixed_overrides: Iterable[str] = ()) -> None:
    """Each key swept once, not also fixed, not a key the sweep sets itself; the axes of a zip group of equal
    length. Keys are compared by the leaves they set, so that a swept or fixed section mapping
    (`model.memory=[{topk: 16}]`, `optimizer={lr: 1e-2}`) conflicts with the sub-keys it sets."""
    fixed = [setting for text in fixed_overrides for setting in override_settings(text)]
    swept: list[Setting] = []
    for axis in [*grid, *(axis for group in zip_groups for axis in group.axes)]:
        settings = axis_settings(axis)
        if overlap := first_overlap(settings, swept):
            raise ConfigError(axis.key, conflict("is swept twice", *overlap))
        if overlap := first_overlap(settings, fixed):
            raise ConfigError(axis.key, conflict("is both swept and fixed by an override", *overlap))
        if overlap := first_overlap(settings, OWNED_SETTINGS):
            raise owned_conflict(*overlap, "swept")
        swept += settings
    if overlap := first_overlap(fixed, OWNED_SETTINGS):
        raise owned_conflict(*overlap, "overridden")
    for group in zip_groups:
        if len({len(axis.values) for axis in group.axes}) > 1:
            described = ", ".join(f"{axis.key} has {len(axis.values)}" for axis in group.axes)
            raise ConfigError(group.axes[0].key, f"the keys of {group.describe()} must have the same number of "
                                                 f"values ({described})")
    if not grid and not zip_groups:
        raise ConfigError("--grid", "a sweep needs at least one --grid or --zip axis")


def expand(grid: list[Axis], zip_groups: list[ZipGroup] = ()) -> list[dict[str, Any]]:
    """The sweep's points: the product of the grid axes, then the zip groups (each group's axes taken together),
    first factor slowest. Each point maps the swept keys, in that order, to their values."""
    factors = [[{axis.key: value} for value in axis.values] for axis in grid]
    factors += [[dict(zip((axis.key for axis in group.axes), values))
                 for values in zip(*(axis.values for axis in group.axes))] for group in zip_groups]
    points = []
    for combination in itertools.product(*factors):
        point: dict[str, Any] = {}
        for part in combination:
            point.update(part)
        points.append(point)
    return points


# --------------------------------------------------------------------------------------------- names


def number_text(value: float | int) -> str:
    """The shorter of plain and scientific notation: 0.0003 -> '3e-4', 0.001 -> '1e-3', 32 -> '32', 0.5 -> '0.5'."""
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e6):
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    plain = repr(value)
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    scientific = f"{mantissa}e{int(exponent)}"
    return scientific if len(scientific) < len(plain) else plain


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, (int, float)):
        return number_text(value)
    if isinstance(value, list):
        return "+".join(value_text(item) for item in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{value_text(v)}" for k, v in value.items())
    return str(value)


def sanitize(text: str) -> str:
    """Letters, digits and `.+-` only (safe in paths, shells and tensorboard/wandb names)."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9.+-]", "-", text)).strip("-") or "x"


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's last segment (`optimizer.lr` -> `lr`), or its whole dotted path where two keys share one."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (tail if last.count(tail) == 1 else key) for key, tail in zip(keys, last)}


MAX_VALUE_TEXT = 24
"""Longer value texts (paths, blends) are cut and end in a hash of the value, so that run names stay file names."""


def point_token(short: str, value: Any) -> str:
    """`lr` 3e-4 -> `lr3e-4`; `softmax` false -> `softmax-off` (a separator unless the value starts with a digit)."""
    text = sanitize(value_text(value))
    if len(text) > MAX_VALUE_TEXT:
        digest = hashlib.sha1(repr(value).encode()).hexdigest()[:8]
        text = f"{text[:MAX_VALUE_TEXT - 9].rstrip('-.+')}-{digest}"
    return sanitize(short + (text if text[0].isdigit() else "-" + text))


MAX_NAME = 120
"""Run names (directory names) longer than this are cut and end in a hash of the whole name."""


def point_names(points: list[dict[str, Any]]) -> list[str]:
    """Readable names joined by `_` (`lr3e-4_topk32`); points whose names coincide get `-p<index>` appended."""
    shorts = short_keys(list(points[0]))
    names = [_capped("_".join(point_token(shorts[key], value) for key, value in point.items())) for point in points]
    return [f"{name}-p{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _capped(name: str) -> str:
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                     for key, value in point.items())


# --------------------------------------------------------------------------------------------- configs


def run_directories(run_dir: Path, base: dict) -> dict[str, str]:
    """The per-run keys under `OUT/<name>/`: checkpoints always (resume and the summary need them), tensorboard and
    profiles when the base config has them on."""
    keys = {"checkpoint.save": str(run_dir / RUN_CHECKPOINTS)}
    logging = base.get("logging") or {}
    for key, directory in (("tensorboard_dir", "tensorboard"), ("profile_dir", "profile")):
        if logging.get(key) is not None:
            keys[f"logging.{key}"] = str(run_dir / directory)
    return keys


def point_config(base: dict, point: dict[str, Any], name: str, run_dir: Path, world_size: Optional[int]) -> Config:
    """The validated config of one point; a bad key or value raises a ConfigError naming the key and the point."""
    data = copy.deepcopy(base)
    try:
        for key, value in point.items():
            set_dotted(data, key, copy.deepcopy(value), Config)
        for key, value in run_directories(run_dir, base).items():
            set_dotted(data, key, value, Config)
        set_dotted(data, "run_name", f"{base.get('run_name', Config.run_name)}-{name}", Config)
        return config_from_dict(data, world_size=world_size)
    except ConfigError as err:
        message = str(err).removeprefix(f"{err.key}: ")
        raise ConfigError(err.key, f"{message} (sweep point '{name}': {describe(point)})") from err


def resolve_sweep(config_path: str | Path, grid: list[Axis], zip_groups: list[ZipGroup], fixed_overrides: list[str],
                  out: Path, world_size: Optional[int] = None) -> list[SweepRun]:
    """Every point's config, fully resolved and validated (nothing is written)."""
    check_axes(grid, zip_groups, fixed_overrides)
    base = apply_overrides(read_yaml(config_path), fixed_overrides)
    points = expand(grid, zip_groups)
    return [SweepRun(name, point, point_config(base, point, name, out / name, world_size))
            for name, point in zip(point_names(points), points)]
