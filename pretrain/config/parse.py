"""Reading a run config: YAML files and `section.field=value` overrides -> typed dataclasses,
and writing it back. Raises ConfigError naming the field for unknown keys, malformed overrides
and wrong types, and naming file and line for what YAML itself would let through: duplicate keys
(PyYAML keeps the last one silently), bytes that are not UTF-8, an empty file. Ranges and
cross-field checks are in validate.py."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.config.schema import RunConfig
from pretrain.errors import ConfigError
from pretrain.files import atomic_write_text
from pretrain.models import DEFAULT_FAMILY, ModelConfig, family_config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (or start from the defaults), apply `a.b=value` overrides, check types.

    Raises ConfigError naming the field for unknown keys, malformed overrides and wrong types.
    Cross-field checks are in `validate()`.
    """
    raw = _read_file(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    return _build(RunConfig, raw, prefix="")


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping, at any depth (SafeLoader keeps the
    last one silently: two `optim:` sections drop the first one's fields)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """The mapping, after checking its keys; merge keys (`<<:`) may be overridden, as YAML means."""
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if seen:
                raise _DuplicateKeyError(None, first[key], f"duplicate key {key}", key_node.start_mark)
            first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str, with_line: bool) -> Any:
    """`text` parsed strictly; an error names `where` (a file or an override) and, with_line, the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as err:
        at = f"{where}:{err.problem_mark.line + 1}" if with_line and err.problem_mark else where
        if isinstance(err, _DuplicateKeyError):
            earlier = f" (first at line {err.context_mark.line + 1})" if with_line else ""
            raise ConfigError(f"{at}: {err.problem}{earlier}; give each key once") from None
        what = "; ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError(f"{at}: not valid YAML: {what}") from None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer of more than 4300 digits
        raise ConfigError(f"{where}: not valid YAML: {err}") from None


def _read_file(path: Path) -> dict[str, Any]:
    """The mapping of sections in YAML file `path`: UTF-8, non-empty, each key once."""
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = "does not exist" if isinstance(err, FileNotFoundError) else f"cannot be read ({err.strerror})"
        raise ConfigError(f"config file {path} {reason}; pass a YAML file such as configs/shakespeare.yaml") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: config file is not UTF-8 text (byte 0x{data[err.start]:02x}); save it "
                          "as UTF-8") from None
    raw = _parse_yaml(text, str(path), with_line=True)
    if raw is None:
        raise ConfigError(f"config file {path} is empty; pass a YAML mapping of sections or omit the file to use "
                          "the defaults")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def split_config_args(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`proseco train a.b=1 c.d=2` names no file: the first 'argument' is then an override."""
    if config is not None and "=" in config and not _exists(config):
        return None, [config, *overrides]
    return config, list(overrides)


def _exists(path: str) -> bool:
    """Whether `path` names something on disk (False for a name the OS refuses, e.g. too long)."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def load_config_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                     drop_unknown: bool = False) -> RunConfig:
    """A RunConfig from an already parsed mapping (e.g. the config saved in a checkpoint).

    drop_unknown: ignore (with a warning) fields this version does not know, so that a checkpoint
    saved by an older version, whose config had fields since removed, still loads.
    """
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy overrides can change
    if drop_unknown:
        _drop_unknown(RunConfig, raw, prefix="")
    for override in overrides:
        _apply_override(raw, override)
    return _build(RunConfig, raw, prefix="")


def section_class(kind: type, raw: Any, prefix: str) -> type:
    """The dataclass that reads a section: the model family's own for `model:`."""
    if kind is not ModelConfig:
        return kind
    family = raw.get("family", DEFAULT_FAMILY) if isinstance(raw, dict) else DEFAULT_FAMILY
    if not isinstance(family, str):
        raise ConfigError(f"{prefix}family must be a string, got {family!r}")
    return family_config(family)


def _drop_unknown(cls: type, raw: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for key in list(raw):
        if key not in hints:
            warnings.warn(f"ignoring config field {prefix}{key}, unknown to this version", stacklevel=3)
            del raw[key]
        elif dataclasses.is_dataclass(hints[key]) and isinstance(raw[key], dict):
            _drop_unknown(section_class(hints[key], raw[key], f"{prefix}{key}."), raw[key], prefix=f"{prefix}{key}.")


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `section.field` in `raw` to the override's value, read as YAML (as it would be in a file)."""
    if any("\udc80" <= char <= "\udcff" for char in override):  # how Python passes on argv bytes that are not UTF-8
        raise ConfigError(f"override {override!r} is not UTF-8 text; pass it in UTF-8")
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{override}' is not of the form section.field=value, e.g. model.n_layers=4")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': {part} is a value, not a section")
        node = child
    # YAML parsing gives the same types as in a file: 4 -> int, 1e-3 -> float, true -> bool, [1,2] -> list
    node[parts[-1]] = _parse_yaml(value, f"override '{override}'", with_line=False) if value.strip() else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known fields: {', '.join(names)}"
            raise ConfigError(f"unknown config field {prefix}{key}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(section_class(kind, value, f"{prefix}{key}."), value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """Check `value` against the annotation `kind`; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        for option in others:
            try:
                return _coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name} must be {_describe(kind)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list ({_describe(kind)}), got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{name} must have {len(args)} entries, got {len(value)}")
            return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {kind!r} for {name}")  # a bug in this file


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_describe(a) for a in args)}]"
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), ready for YAML or JSON."""
    return yaml.safe_load(yaml.safe_dump(_plain(cfg)))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config atomically (every run keeps the config it ran with)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, to_yaml(cfg))
