"""YAML <-> dataclass conversion with strict keys and types, plus ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_sfm.config.presets import model_preset
from megatron_sfm.config.schema import RunConfig
from megatron_sfm.errors import ConfigError


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {_describe(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and (dataclasses.is_dataclass(inner[0])
                                or typing.get_origin(inner[0]) in (list, tuple, dict)):
            raise ConfigError(errors[0]) from None  # `Section | None`: the inner error names the deeper key
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        inner = (typing.get_args(tp) + (Any, Any))[1]  # dict[str, X]: each value checked as X
        return {k: _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)) or str(value) == "":
            raise ConfigError(f"{key}: expected a path, got {type(value).__name__} {value!r}")
        return Path(value)
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])] \
                or difflib.get_close_matches(str(key), sorted(names), n=3, cutoff=0.6)  # sed -> seed
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{full}: unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    for f in dataclasses.fields(cls):
        if f.init and f.name not in kwargs and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}.{f.name}: required" if prefix else f"{f.name}: required")
    return cls(**kwargs)


def dataclass_from_dict(cls: type, data: Any, source: str | os.PathLike | None = None) -> Any:
    """Build the dataclass ``cls`` from nested plain data (e.g. parsed YAML), strictly.

    The same checks as the run config: unknown keys (with a "did you mean"), types
    (``int``, ``float``, ``bool``, ``str``, ``Path``, ``Literal``, ``X | None``, lists,
    dicts and nested dataclasses), and required fields (those without a default).
    Errors are :class:`ConfigError` naming the key (``stages[0].slurm.time: ...``),
    prefixed with ``source`` (a file name) when given.
    """
    try:
        return _build(cls, data, "")
    except ConfigError as exc:
        if source is not None:
            raise ConfigError(f"{source}: {exc}") from None
        raise


def _expand_presets(data: dict) -> dict:
    """``model: NAME`` or ``model: {preset: NAME, ...}`` starts from a preset's fields."""
    data = dict(data)
    model = data.get("model")
    if isinstance(model, str):
        model = {"preset": model}
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        name = model.pop("preset")
        base = model_preset(name)  # raises ConfigError for an unknown name
        merged = _deep_merge(base, model)
        data["model"] = merged
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict | None) -> RunConfig:
    """Build a :class:`RunConfig` from nested plain data (strict keys and types)."""
    return _build(RunConfig, _expand_presets(data or {}), "")


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (["a", "b", "c"], VALUE parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. training.train_iters=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` strings to nested plain data (before type checking)."""
    data = _expand_presets(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        if path == ["model", "preset"]:
            data["model"] = _deep_merge(data.get("model") or {}, {"preset": value})
            data = _expand_presets(data)
            continue
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: is not a section (override {text!r})")
            else:
                nxt = node[part] = dict(nxt)
            node = nxt
        node[path[-1]] = value
        if path[0] == "model":
            data = _expand_presets(data)
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """A config file's top-level mapping (``{}`` when empty); errors are ``ConfigError`` lines."""
    from megatron_sfm.utils.readers import read_yaml as _read

    return _read(path, error=ConfigError)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, type-check.

    Errors raised while building name the file as well as the key.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def dump_config(cfg: RunConfig, path: str | os.PathLike | None = None) -> str:
    """The resolved config as YAML; written atomically when ``path`` is given."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if path is not None:
        from megatron_sfm.utils.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return text
