"""Recipe mechanics shared by the config dataclasses: YAML with ``base`` files, dotted overrides,
type checks against dataclass annotations, unknown-key errors with suggestions."""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Collection
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from .._config import ConfigError  # the one ConfigError of the package


def parse_override(item: str, path_keys: Collection[tuple[str, str]] = ()) -> tuple[str, Any]:
    """``'optim.lr=1e-4'`` -> ``('optim.lr', 1e-4)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"overrides look like section.key=value (e.g. optim.lr=1e-4), got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(f"override keys are dotted section.key (e.g. train.epochs=5), got {key!r} in {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of override {item!r} as YAML: {e}") from None
    if tuple(key.split(".")) in path_keys and isinstance(value, str):  # relative to the working directory
        value = os.path.abspath(os.path.expanduser(value))
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw['a']['b']['c'] = value`` for ``key='a.b.c'``, creating mappings on the way."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value


def read_yaml(path: Path, path_keys: Collection[tuple[str, str]] = (), chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML recipe merged over its ``base`` files; ``section.key`` paths in ``path_keys`` are made
    absolute relative to the file that sets them."""
    path = path.expanduser().resolve()
    if path in chain:
        raise ConfigError(f"recipe base files form a cycle: {' -> '.join(str(p) for p in (*chain, path))}")
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for section, key in path_keys:
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and not os.path.isabs(os.path.expanduser(value)):
            raw[section][key] = str((path.parent / value).resolve())
    bases = raw.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _deep_merge(merged, read_yaml(path.parent / base, path_keys, (*chain, path)))
    _deep_merge(merged, raw)
    return merged


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def reject_unknown(prefix: str, given: dict[str, Any], known: list[str]) -> None:
    """Raise :class:`ConfigError` for the first key of ``given`` not in ``known``, with a close match."""
    for key in given:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown key '{where}'.{hint} Known keys{' in ' + prefix if prefix else ''}: "
                              f"{', '.join(known)}")


def coerce(where: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted as floats, '1e-4' as a float)."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return coerce(where, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else Any
            return [coerce(f"{where}[{i}]", v, inner) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - annotations used above are the only ones
        return value
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


def type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {type_name(args[0]) if args else 'values'}"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))
