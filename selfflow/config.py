"""Typed run configs: YAML presets plus `a.b=value` overrides -> nested dataclasses.

Each part of the system defines its own config dataclass next to the code that uses it (with
validation in `__post_init__`); a job composes them into one run config, and this module fills
it. Unknown keys, wrong types and impossible values are `ConfigError`s that name the key and
the file. The resolved config is written next to every output with `save_config`.

    cfg = load_config(SampleConfig, "configs/sample/tiny.yaml", ["sampler.num_steps=10"])
    save_config(cfg, out_dir / "config.yaml")

A field typed as a union of dataclasses (`model: MMDiTConfig | SiTConfig`) is told apart by each
class's `kind` field (the default of `kind` names the class): `model.kind=sit` builds a `SiTConfig`
from its own defaults, other keys of the section fill it.
"""

import dataclasses
import difflib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and the source file."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a YAML file (or defaults when `path` is None) and `key.sub=value` overrides."""
    source = str(path) if path else "<defaults>"
    if overrides:
        source += " with overrides"
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {' '.join(str(err).split())}") from None
        _set_path(data, key.strip().split("."), value, source=f"override {item!r}")
    return _build(cls, data, prefix="", source=source)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def field_comments(cls: type) -> dict[str, str]:
    """What the source says of each field of a dataclass: its trailing `# ...` comment, or the comment
    lines right above it (the convention of every config class here)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").rstrip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and match.group(1) in names:
            trailing = stripped.split("  # ", 1)[1].strip() if "  # " in stripped else ""
            comments[match.group(1)] = " ".join([*above, trailing]).strip()
        above = []
    return comments


def config_keys(cls: type, prefix: str = "", base: Any = None) -> list[tuple[str, str, Any, str]]:
    """Flattened `(key, type, default, comment)` rows of a config class, for `--help` texts."""
    rows = []
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = getattr(base, f.name) if base is not None else _field_default(f)
        if dataclasses.is_dataclass(hint):
            rows += config_keys(hint, f"{prefix}{f.name}.", default)
        elif _variants(hint):
            for cls in _variants(hint):
                rows += config_keys(cls, f"{prefix}{f.name}.", default if type(default) is cls else None)
        elif _is_dataclass_dict(hint):
            entry_cls = typing.get_args(hint)[1]
            for name, entry in (default or {"NAME": None}).items():
                rows += config_keys(entry_cls, f"{prefix}{f.name}.{name}.", entry)
        else:
            is_required = base is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = "(required)" if is_required else default
            rows.append((prefix + f.name, _type_name(hint), default, comments.get(f.name, "")))
    return rows


def _set_path(data: dict, keys: list[str], value: Any, source: str) -> None:
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def _build(cls: type[T], data: Any, prefix: str, source: str, base: Any = None) -> T:
    """Build `cls` from `data`; fields `data` leaves out come from `base` (an instance) or the defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.6)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} ({hint}known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], prefix + f.name
        default = getattr(base, f.name) if base is not None else _field_default(f)
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data.get(f.name, {}), key + ".", source, base=default)
        elif _variants(hint) and f.name in data:
            kwargs[f.name] = _build_variant(_variants(hint), data[f.name], default, key, source)
        elif _is_dataclass_dict(hint) and f.name in data:
            kwargs[f.name] = _build_dict(hint, data[f.name], default or {}, key, source)
        elif f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hint, key, source)
        elif base is not None:
            kwargs[f.name] = default
    try:
        return cls(**kwargs)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        section = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"{source}: {section}: {err}") from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {err}") from None


def _field_default(f: dataclasses.Field) -> Any:
    """The field's default instance (a fresh one for factories), or None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _variants(hint: Any) -> tuple[type, ...]:
    """The dataclasses of a union-of-dataclasses field (`A | B`), or () for any other annotation."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return ()
    classes = typing.get_args(hint)
    return classes if all(dataclasses.is_dataclass(a) for a in classes) else ()


def _kind(cls: type) -> Any:
    return next((_field_default(f) for f in dataclasses.fields(cls) if f.name == "kind"), None)


def _build_variant(classes: tuple[type, ...], value: Any, default: Any, key: str, source: str) -> Any:
    """A union field: the class whose `kind` default equals the section's `kind` (the default instance's
    kind when the section names none), built on the default instance when it is of that class."""
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
    kinds = {_kind(c): c for c in classes}
    kind = value.get("kind", getattr(default, "kind", None))
    if kind not in kinds:
        raise ConfigError(f"{source}: {key}.kind must be one of {sorted(map(str, kinds))}, got {kind!r}")
    cls = kinds[kind]
    return _build(cls, value, f"{key}.", source, base=default if type(default) is cls else None)


def _is_dataclass_dict(hint: Any) -> bool:
    return typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1])


def _build_dict(hint: Any, value: Any, defaults: dict, key: str, source: str) -> dict:
    """A `dict[str, Dataclass]` field: each given entry is built on the default entry of the same
    name (e.g. a modality's defaults) or on the class defaults; `name: null` removes an entry."""
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a mapping of name -> section, got {value!r}")
    cls = typing.get_args(hint)[1]
    out = {}
    for name in [*defaults, *(n for n in value if n not in defaults)]:
        entry = value.get(name, {})
        if entry is not None:
            out[name] = _build(cls, entry, f"{key}.{name}.", source, base=defaults.get(name))
    return out


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `hint`; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = ConfigError(f"{source}: {key} must be {_type_name(hint)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise bad
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {k: _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()} if args else value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{source}: {key}: unsupported config type {hint}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")
