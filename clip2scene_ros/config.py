"""YAML configuration loaded into typed dataclasses, validated at load.

Every configuration in the package (bag reader topics, calibration files, vocabularies, training
and node settings) is a frozen dataclass; ``load_config`` builds it from YAML and checks every
value against the dataclass's type hints, so a typo or a wrong type fails at start-up with a
``ConfigError`` naming the dotted key, rather than deep inside a run. Range checks that types
cannot express go in the dataclass's ``validate()`` method, which may raise ``ConfigError``.

Hand-written because the typed-YAML libraries we could use (pydantic, omegaconf) are large
dependencies for what is ~100 lines here, and a ROS install does not carry them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file with the safe loader; errors name the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read: {exc.strerror}", str(path)) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"invalid YAML: {exc}", str(path)) from exc


def load_config(cls: type[T], source: str | Path | dict[str, Any] | None) -> T:
    """Build dataclass ``cls`` from a YAML file or an already-parsed mapping."""
    origin = None
    if isinstance(source, str | Path):
        origin = str(source)
        source = read_yaml(source)
    try:
        return _convert(cls, {} if source is None else source, "")
    except ConfigError as exc:
        if origin and exc.source is None:
            raise ConfigError(exc.key, exc.reason, origin) from None
        raise


def _convert(tp: Any, value: Any, key: str) -> Any:
    where = key or "<root>"
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass(tp, value, key)
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(where, " / ".join(errors))
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(where, f"must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(where, f"must be a list, got {type(value).__name__}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(where, f"must have {len(args)} items, got {len(value)}")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in pairs)
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"must be a mapping, got {type(value).__name__}")
        kt, vt = get_args(tp) or (Any, Any)
        return {
            _convert(kt, k, f"{key}.<key>"): _convert(vt, v, f"{key}.{k}" if key else str(k))
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(where, f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(where, f"must be a path string, got {value!r}")
        return Path(value)
    raise TypeError(f"config type {tp!r} at {where} is not supported")


def _dataclass(cls: type, value: Any, key: str) -> Any:
    where = key or "<root>"
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(where, f"must be a mapping, got {type(value).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        name = f"{key}.{unknown[0]}" if key else str(unknown[0])
        raise ConfigError(name, f"unknown key; expected one of {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, "is required")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            if key and not exc.key.startswith(key):
                raise ConfigError(f"{key}.{exc.key}", exc.reason) from None
            raise
    return obj


def to_dict(obj: Any) -> Any:
    """A config dataclass back to plain YAML-able data (Paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
