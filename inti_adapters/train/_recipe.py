"""Recipe mechanics shared by the config dataclasses: YAML with ``base`` files, dotted overrides,
type checks against dataclass annotations, unknown-key errors with suggestions.

Recipes are read with :class:`RecipeLoader` (YAML's safe loader, stricter): a key given twice in one
mapping is refused (YAML would silently keep the last), aliases may not expand to more than
:data:`MAX_EXPANDED_NODES` values (an "alias bomb" of nested aliases would otherwise grow until memory
runs out), and ``.inf`` / ``.nan`` numbers are refused with their key."""

from __future__ import annotations

import difflib
import math
import os
import types
from collections.abc import Collection
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from .._config import ConfigError  # the one ConfigError of the package

MAX_EXPANDED_NODES = 100_000
"""The most values (scalars, lists, mappings) a recipe or override may hold once its aliases are expanded."""


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses duplicate keys and bounds the expansion of aliases."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first}): YAML would silently keep only "
                    "the last value; remove one of them", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Count the values of ``root`` with every alias expanded (shared nodes counted once per use)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to a value that contains it "
                                                    "(a recursive structure); recipes must be finite", node.start_mark)
        active.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        total = 1 + sum(size(child) for child in children)
        if total > MAX_EXPANDED_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases expand to more than {MAX_EXPANDED_NODES} values (nested aliases that "
                "repeat each other, an 'alias bomb', would fill the memory); recipes are limited to that size -- "
                "write the values out or use fewer nested aliases", node.start_mark)
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _load_yaml(stream: Any) -> Any:
    """``yaml.load`` with :class:`RecipeLoader`."""
    loader = RecipeLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_finite(where: str, value: Any) -> None:
    """Refuse ``.inf`` / ``.nan`` anywhere in ``value`` (a recipe's number), naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: got {value!r}; recipe numbers must be finite (.inf and .nan are refused: "
                          "a non-finite learning rate or size trains to NaN)")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(f"{where}.{k}" if where else str(k), v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(f"{where}[{i}]", v)


def parse_override(item: str, path_keys: Collection[tuple[str, str]] = ()) -> tuple[str, Any]:
    """``'optim.lr=1e-4'`` -> ``('optim.lr', 1e-4)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"overrides look like section.key=value (e.g. optim.lr=1e-4), got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(f"override keys are dotted section.key (e.g. train.epochs=5), got {key!r} in {item!r}")
    try:
        value = _load_yaml(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"cannot parse the value of override {item!r} as YAML: {_yaml_problem(e)}") from None
    check_finite(key, value)
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
            raw = _load_yaml(f) or {}
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    try:
        check_finite("", raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for section, key in path_keys:
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and not os.path.isabs(os.path.expanduser(value)):
            raw[section][key] = str((path.parent / value).resolve())
    merged: dict[str, Any] = {}
    for base in _base_files(path, raw.pop("base", None)):
        _deep_merge(merged, read_yaml(path.parent / base, path_keys, (*chain, path)))
    _deep_merge(merged, raw)
    return merged


def _base_files(path: Path, bases: Any) -> list[str]:
    """The ``base`` entry of ``path``: a file name or a list of them (relative to ``path``'s folder)."""
    if bases is None:
        return []
    items = [bases] if isinstance(bases, str) else bases
    if not isinstance(items, list):
        raise ConfigError(f"{path}: base must be a recipe file name or a list of them (relative to this file), "
                          f"got {bases!r} ({type(bases).__name__})")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{path}: base[{i}] must be a recipe file name (relative to this file), got {item!r} "
                              f"({type(item).__name__}) in base: {bases!r}")
    return items


def _yaml_problem(e: BaseException) -> str:
    return "it nests too deeply to be read" if isinstance(e, RecursionError) else str(e)


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
                number = float(value)
            except ValueError:
                pass
            else:
                check_finite(where, number)  # 'inf' and 'nan' as text too
                return number
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
