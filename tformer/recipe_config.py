"""Recipe configuration: nested defaults, a YAML file over them, ``key=value`` overrides on top.

The defaults are the schema: a key that is not in them is an error naming the valid keys (and
the closest match), and every value is converted to the type of its default, so a typo or a bad
value stops a run before any training starts. YAML is read with ``yaml.safe_load``: a config file
can hold data only, never code.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import yaml

from .errors import ConfigError


def _coerce(path: str, value, default):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} must be true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}={value!r} must be an integer")
    if isinstance(default, float):
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
                return float(value)
        except (ValueError, OverflowError):  # not a number, or an integer too large for a float
            pass
        raise ConfigError(f"{path}={value!r} must be a number")
    if isinstance(default, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}={value!r} must be a string")
    if isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{path}={value!r} must be a list")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{path}={value!r} must be a mapping")
    return value


def _unknown_key(path: str, key: str, valid) -> ConfigError:
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {where!r}{hint}; valid keys{' in ' + repr(path) if path else ''}: "
                       + ", ".join(sorted(valid)))


def merge(base: dict, update: dict, path: str = "") -> dict:
    """``base`` updated by ``update``, recursively; keys must exist in ``base`` (free-form dicts excepted)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise _unknown_key(path, key, base)
        where = f"{path}.{key}" if path else key
        default = base[key]
        if isinstance(default, dict) and default and isinstance(value, dict):
            out[key] = merge(default, value, where)
        else:
            out[key] = _coerce(where, value, default)
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _nest(keys: list[str], value) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def load_config(defaults: dict, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> dict:
    """``defaults`` <- the YAML file at ``path`` <- each ``key=value`` of ``overrides``, validated."""
    config = copy.deepcopy(defaults)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        config = merge(config, loaded or {})
    for text in overrides:
        keys, value = parse_override(text)
        config = merge(config, _nest(keys, value))
    return config


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
