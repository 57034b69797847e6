"""Configuration mechanics shared by every section: errors, validation helpers, loading.

This module owns how configuration is read, not what it contains: the
``ConfigError`` every section raises (its message names ``section.field``
and the fix), the two validation helpers sections use in ``__post_init__``,
building a (nested) dataclass from a mapping with unknown keys refused,
YAML/JSON files, and ``section.key=value`` overrides.

Each section's dataclass lives next to the code it configures
(``mpo.config``, ``moe.config``, ``omoe.config``, ``models.config``,
``data.config``, ``training.config``); ``training.run_config`` assembles the
run. Importing this module (or any section module) needs neither torch nor
DeepSpeed, so a bad config fails in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NoReturn, Sequence, Union, get_type_hints


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def fail(section: str, name: str, value: Any, fix: str) -> NoReturn:
    """Raise ``ConfigError("section.name=value: fix")``."""
    raise ConfigError(f"{section}.{name}={value!r}: {fix}")


def check_choice(section: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """Fail unless ``value`` is one of ``choices``, listing them."""
    if value not in choices:
        fail(section, name, value, f"choose one of {list(choices)}")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a parsed value to a dataclass field type (nested dataclasses too)."""
    if dataclasses.is_dataclass(hint):
        if isinstance(hint, type) and isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {hint.__name__}, got {value!r}")
        return from_dict(hint, value, where)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the valid ones."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _coerce(value, hint, sub)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'moe.num_experts=8' -> (['moe', 'num_experts'], 8); values parse as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_mapping(path: Union[str, Path]) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data
