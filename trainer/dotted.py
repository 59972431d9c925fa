"""YAML mappings addressed by dotted keys: load a file, apply ``a.b.c=value`` overrides, flatten,
and name pydantic validation errors by their field path.

Trial configs (:mod:`trainer.config`) and sweep files (:mod:`sweeps.space`) share these helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConfigError

__all__ = ["apply_overrides", "flatten", "format_validation_error", "load_yaml_mapping", "set_dotted"]


def load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file, bad YAML or a non-mapping names the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw["a"]["b"]["c"] = value`` for ``key`` ``"a.b.c"``, creating missing sections."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a config section")
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars) in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        set_dotted(raw, key, yaml.safe_load(value) if value != "" else None)
    return raw


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``).

    An empty mapping contributes no key: a section that holds nothing logs nothing.
    """
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def format_validation_error(e: ValidationError, source: str, what: str = "trial config") -> str:
    """One line per problem, each naming the field (``a.b.c``); unknown keys said plainly."""
    lines = [f"{source}: invalid {what}"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")  # a check of several fields names them
    return "\n".join(lines)
