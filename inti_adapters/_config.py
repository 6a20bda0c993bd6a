"""One configuration style for the whole package (peft-like dataclasses).

Every config (inject, compressors, temporal adapters, data, shard writer, training) is a
``@dataclass`` deriving from :class:`Config`:

- each field is declared with :func:`option`, which carries its help text (shown by the CLIs
  and ``Config.describe()``);
- ``__post_init__`` checks the values with :func:`check_choice` / :func:`check_int` / ... and
  raises :class:`ConfigError` (a ``ValueError``) saying what was received and what is allowed;
- ``to_dict`` / ``from_dict`` round-trip through JSON and YAML (tuples become lists, nested
  configs become mappings); keys this version does not know are reported, not silently used.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class PoolConfig(Config):
    ...     size: int = option(2, help="Frames pooled together.")
    ...     def __post_init__(self) -> None:
    ...         check_int("size", self.size, 1)
    >>> PoolConfig.from_dict(PoolConfig(size=4).to_dict())
    PoolConfig(size=4)
    >>> PoolConfig(size=0)
    Traceback (most recent call last):
    ...
    inti_adapters._config.ConfigError: size must be an int >= 1, got 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar, Union

__all__ = [
    "Config",
    "ConfigError",
    "add_config_arguments",
    "as_dict",
    "with_current_names",
    "check_choice",
    "check_int",
    "config_from_namespace",
    "option",
]

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration value is invalid: unknown key, wrong type or value out of range."""


def option(default: Any = dataclasses.MISSING, *, help: str,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text (``metadata['help']``)."""
    if default is not dataclasses.MISSING and isinstance(default, (list, dict, set)):
        raise TypeError("mutable default: use default_factory")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int (not a bool) ``>= minimum`` (or None)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if optional else ""
        raise ConfigError(f"{name} must be an int >= {minimum}{extra}, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def with_current_names(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with option names a config class renamed (its ``renamed`` mapping) brought up to date."""
    renamed = getattr(cls, "renamed", None) or {}
    old = [k for k in data if k in renamed]
    if not old:
        return data
    warnings.warn(f"{cls.__name__}: option(s) {old} are now called {[renamed[k] for k in old]}",
                  DeprecationWarning, stacklevel=3)
    return {renamed.get(k, k): v for k, v in data.items()}


def as_dict(config: Any) -> dict[str, Any]:
    """Plain values of a config dataclass (a :class:`Config`, or any dataclass a user wrote)."""
    if isinstance(config, Config):
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    raise TypeError(f"expected a config dataclass, got {type(config).__name__}")


class Config:
    """Base of every config dataclass: dict / JSON / YAML round trip and help texts."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (JSON/YAML-ready): tuples become lists, nested configs mappings."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, strict: bool = False) -> C:
        """Build from a mapping; keys this version does not know warn (``strict``: raise)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} needs a mapping of options, got {type(data).__name__}: {data!r}")
        data = with_current_names(cls, data)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; its options are {sorted(names)}")
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown} (saved by a newer inti_adapters?)",
                          stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml  # optional dependency of the core

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[C], text: str) -> C:
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied and checked again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


# -- command-line options from a config -------------------------------------------------------------
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else args), True
    return tp, False


def _none_or(base: Any) -> Any:
    def conv(value: str) -> Any:  # "none" on the command line means None
        return None if value.lower() == "none" else base(value)

    return conv


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Config], *, skip: tuple[str, ...] = (),
                         required: tuple[str, ...] = ()) -> None:
    """One ``--option`` per field of a flat config, with its help text and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f.metadata.get("help", "") + (f" (default: {default!r})" if default not in ("", None) else "")
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": help_}
        if f.name in required:
            kw = {"dest": f.name, "required": True, "help": f.metadata.get("help", "")}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            nargs: Any = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
            parser.add_argument(flag, nargs=nargs, type=args[0], **kw)
        elif isinstance(tp, list):  # e.g. str | list[str] | None: one or more strings
            parser.add_argument(flag, nargs="+", type=str, **kw)
        else:
            conv = tp if tp in (int, float, str) else str
            parser.add_argument(flag, type=_none_or(conv) if optional else conv, **kw)


def config_from_namespace(cls: type[C], ns: argparse.Namespace) -> C:
    """Build ``cls`` from the attributes of an argparse namespace that name its fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(ns).items() if k in names}
    for k, v in values.items():
        if isinstance(v, list) and len(v) == 1 and k.endswith("shards"):
            values[k] = v[0]
    return cls(**values)
