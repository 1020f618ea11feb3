"""Typed configs from YAML: a tree of dataclasses, checked on the way in.

Shared by the training configs (``detection/config.py``) and the post-processing file
(``submission/postprocess.py``): an unknown key is refused with the closest valid one
("Did you mean 'optim.lr'?"), a value of the wrong type is refused naming the key, and range
rules name the value and what is allowed. ``key.sub=value`` overrides are parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from lungdet.errors import ConfigError

# Where a field's range rule is kept, in its dataclass field's metadata: (check, what is allowed).
RANGE = "lungdet_range"
# Marks a nested dataclass whose keys sit at its parent's level in the file (see flat_section).
FLAT = "lungdet_flat"


def flat_section(cls: type) -> Any:
    """A nested section that is its own type in code but whose keys sit beside its parent's in the file.

    The file stays as it was (and older files load); :func:`nest_flat_keys` and :func:`flattened`
    convert at the edge.
    """
    return dataclasses.field(default_factory=cls, metadata={FLAT: True})


def nest_flat_keys(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """File values -> :func:`build_dataclass` values: the keys of ``cls``'s flat sections moved into them."""
    values = dict(values)
    for item in dataclasses.fields(cls):
        if item.metadata.get(FLAT):
            names = {inner.name for inner in dataclasses.fields(item.default_factory)}
            section = {name: values.pop(name) for name in list(values) if name in names}
            if section:
                values[item.name] = {**values.get(item.name, {}), **section}
    return values


def flattened(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` with each flat section's keys in its place at the parent's level (the file's layout)."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.metadata.get(FLAT):
            values.update(dataclasses.asdict(value))
        else:
            values[item.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return values


def ranged(
    default: Any = dataclasses.MISSING,
    *,
    check: Callable[[Any], bool],
    allowed: str,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its range rule beside it: ``check(value)`` must hold; ``allowed`` says what does, in the error.

    ``image_size: int = ranged(512, check=lambda v: 64 <= v <= 2048, allowed="between 64 and 2048")``.
    """
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RANGE: (check, allowed)})


def suggest_key(key: str, valid: Sequence[str], prefix: str) -> str:
    """' Did you mean 'prefix.closest'?' for a mistyped key, else the list of valid keys."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{prefix}{close[0]}'?"
    return f" Valid keys here: {', '.join(prefix + name for name in valid)}."


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field's type, allowing int where float is expected."""
    origin = typing.get_origin(annotation)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [coerce_value(item, item_type, f"{where}[{index}]") for index, item in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """An instance of dataclass ``cls`` from nested dicts; missing keys take the defaults, nested dataclasses recurse."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'.{suggest_key(key, names, f'{where}.' if where else '')}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = build_dataclass(annotation, value, path)
        else:
            kwargs[key] = coerce_value(value, annotation, path)
    return cls(**kwargs)


def check_ranges(config: Any, *, name: str = "config", prefix: str = "") -> None:
    """Raise :class:`ConfigError` naming the first value that breaks its field's rule (:func:`ranged`) and what is allowed.

    Nested dataclasses are checked in field order, their keys dotted (``model.image_size``).
    """
    for item in dataclasses.fields(config):
        value, key = getattr(config, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, name=name, prefix=prefix if item.metadata.get(FLAT) else f"{key}.")
        elif RANGE in item.metadata:
            check, allowed = item.metadata[RANGE]
            if not check(value):
                raise ConfigError(f"{name} {key}={value!r} is out of range: must be {allowed}")


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to nested dicts; values are parsed as YAML (``0.01``, ``[1, 2]``, ``true``)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected key=value, e.g. optim.lr=0.005")
        key, raw = override.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def read_yaml_mapping(path: Path, *, what: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} for an empty one); ``what`` names the expected keys in the message."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {what}")
    return values
