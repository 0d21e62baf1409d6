"""Typed configuration machinery: dataclasses built from plain dicts with errors that name the key.

Every config section is a dataclass. `build(cls, data, path)` checks each value against the field's
type hint (int, float, bool, str, Optional, Literal, list, dict, nested dataclasses) and raises a
`ConfigError` that carries the dotted key. A section may define `validate(self, key_prefix)` for its
own cross-field rules; `build` calls it after the fields are set.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A bad configuration value. `key` is the dotted path of the offending field (or a file)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def closest_key(name: Any, candidates) -> str:
    """A ' (did you mean X?)' hint for a misspelt key or value, or '' when nothing is close. Case is ignored
    (`rmsnorm` suggests `RMSNorm`); `name` may be any YAML key (`12`)."""
    by_lower = {str(c).lower(): str(c) for c in candidates}
    match = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[match[0]]}'?)" if match else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Return `value` checked (and minimally converted) against the type hint `tp`."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, get_args(tp), key)
    if origin is Literal:
        return _coerce_literal(value, get_args(tp), key)
    if origin in (list, typing.List):
        return _coerce_list(value, tp, key)
    if origin in (dict, typing.Dict):
        return _coerce_dict(value, tp, key)
    if dataclasses.is_dataclass(tp):
        return _coerce_section(value, tp, key)
    if value is None:
        raise ConfigError(key, f"must be a {_type_name(tp)}, got null")
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(key, f"must be a {_type_name(tp)}, got {value!r}")
    return value


def _coerce_union(value: Any, args: tuple, key: str):
    """Optional[X] accepts null; otherwise the first member type that accepts the value (else its error)."""
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(key, "must not be null")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError as err:
            errors.append(err)
    raise errors[0]


def _coerce_literal(value: Any, allowed: tuple, key: str):
    if value not in allowed:
        raise ConfigError(key, f"must be one of {list(allowed)}, got {value!r}" + closest_key(str(value), map(str, allowed)))
    return value


def _coerce_list(value: Any, tp, key: str) -> list:
    (item_tp,) = get_args(tp) or (Any,)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"must be a list, got {type(value).__name__} {value!r}")
    return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_dict(value: Any, tp, key: str) -> dict:
    key_tp, val_tp = get_args(tp) or (Any, Any)
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
    return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}


def _coerce_section(value: Any, tp, key: str):
    """A nested config section: an instance already, or a mapping built (and validated) as one."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping (section {tp.__name__}), got {value!r}")
    return build(tp, value, key)


def _coerce_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _coerce_int(value: Any, key: str) -> int:
    """Integers, and floats with an integral value (1e3); never booleans."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"must be an integer, got {value!r}")
    return value


def _coerce_float(value: Any, key: str) -> float:
    """Finite numbers, and strings that parse as one ('3e-4': YAML 1.1 reads exponents without a dot as strings).
    No float key means anything by inf or nan (`.inf` in YAML): refused here, naming the key, rather than surfacing
    as a non-finite loss steps later."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(key, f"must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    return number


def _coerce_str(value: Any, key: str) -> str:
    """Strings, and integers written where a string is meant (a signal number `10`, a run name `7`). A float is
    refused: YAML has already rewritten it (`1.10` -> 1.1, `1e3` -> 1000.0), so its text would not be the one
    written, and distinct names could collide."""
    if isinstance(value, float):
        raise ConfigError(key, f"must be a string, got the number {value!r}: YAML reads an unquoted number as one "
                               f"(1.10 as 1.1, 1e3 as 1000.0); quote it to keep it as written, e.g. '1.10' (in a "
                               f"shell override: \"'1.10'\")")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}")
    return value


class BlendEntry(str):
    """The type of a Megatron blend's items (`data.data_path`): a weight or a path prefix. A weight may be written as
    a YAML number (`[0.3, corpus/a, 0.7, corpus/b]`): its exact text does not matter, its value does."""


def _coerce_blend_entry(value: Any, key: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _coerce_str(value, key)


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str,
            BlendEntry: _coerce_blend_entry}


def build(cls, data: dict | None, prefix: str = ""):
    """Construct dataclass `cls` from `data`, rejecting unknown keys and ill-typed values."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            full = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(full, "unknown key" + closest_key(name, fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            full = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], full)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def to_dict(obj) -> Any:
    """Plain nested dict of a config (for YAML dumps, checkpoints and logs)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _is_mapping_type(hint) -> bool:
    """Whether a field of type `hint` holds a mapping: a section (Optional or not) or a dict."""
    return any(dataclasses.is_dataclass(a) or get_origin(a) in (dict, typing.Dict) or a is dict
               for a in (get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)))


def merged(base: dict, update: dict) -> dict:
    """`update` deep-merged into a copy of `base` (as OmegaConf and Hydra merge): nested mappings merge, anything
    else (a list, a scalar, null) replaces. Copies, so that a mapping YAML shares through an alias stays intact."""
    result = dict(base)
    for name, item in update.items():
        both_mappings = isinstance(item, dict) and isinstance(result.get(name), dict)
        result[name] = merged(result[name], item) if both_mappings else item
    return result


def set_dotted(data: dict, dotted: str, value: Any, root_cls) -> None:
    """Set `a.b.c = value` in the nested dict `data`, checking each segment against `root_cls`. A mapping set on a
    section (or dict) that `data` already holds is merged into it, keeping its other keys; `null` clears it."""
    parts = dotted.split(".")
    cls = root_cls
    node = data
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        field_names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        if field_names is not None and part not in field_names:
            raise ConfigError(path, "unknown key" + closest_key(part, field_names))
        hint = get_type_hints(cls)[part]
        if depth == len(parts) - 1:
            if isinstance(value, dict) and isinstance(node.get(part), dict) and _is_mapping_type(hint):
                node[part] = merged(node[part], value)
            else:
                node[part] = value
            return
        nested = [a for a in (get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
        if not nested:
            raise ConfigError(path, "is not a section; cannot set a sub-key of it")
        cls = nested[0]
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
