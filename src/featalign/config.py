"""Settings: one dataclass per command, filled from YAML and flags by each field's type, checked in one place.

A field is declared once with ``setting``: its default, one sentence of help, its choices (a ``Literal`` type) and
its bounds (``gt``, ``ge``, ``lt``, ``le``). The command line, YAML files and the docs' CLI reference are all read
off the dataclass, so they cannot disagree. ``decode`` turns what YAML or a flag gives (``lr: 5e-6`` is a string to
PyYAML) into the field's type, and ``validate`` names the first wrong field in one line.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal

from .errors import ConfigError

BOUNDS = {
    "gt": (lambda v, b: v > b, ">"),
    "ge": (lambda v, b: v >= b, ">="),
    "lt": (lambda v, b: v < b, "<"),
    "le": (lambda v, b: v <= b, "<="),
}
_TRUE, _FALSE = {"true", "yes", "on", "1", "y", "t"}, {"false", "no", "off", "0", "n", "f"}


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, positional: bool = False, **bounds):
    """A config field: its default, its help (one sentence), and the bounds ``validate`` holds it to."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bound(s) {sorted(unknown)}; use {sorted(BOUNDS)}")
    meta = {"help": help, "bounds": bounds, "positional": positional}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _union_args(typ) -> list | None:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return list(typing.get_args(typ))
    return None


def base_type(typ):
    """``int | None`` -> ``int``: the type a value that is set must have."""
    args = _union_args(typ)
    if args is not None:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typ
    return typ


def choices(typ) -> list | None:
    """The allowed values of a ``Literal`` field (``Literal[...] | None`` too), else None."""
    typ = base_type(typ)
    return list(typing.get_args(typ)) if typing.get_origin(typ) is Literal else None


def decode(value: Any, typ, name: str) -> Any:
    """``value`` (from YAML, a flag or a Python caller) as type ``typ``; a ConfigError naming ``name`` otherwise."""
    args = _union_args(typ)
    if args is not None:
        if value is None and type(None) in args:
            return None
        typ = base_type(typ)
    if value is None:
        raise ConfigError(f"{name}: needs a value")
    allowed = choices(typ)
    if allowed is not None:
        if isinstance(value, bool) and isinstance(allowed[0], str):
            # YAML 1.1 reads on/off and yes/no as booleans: give them back as the choice they spell
            value = next(
                (w for w in (("on", "yes", "true") if value else ("off", "no", "false")) if w in allowed), value
            )
        if isinstance(value, str) and not isinstance(allowed[0], str):
            value = decode(value, type(allowed[0]), name)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            number = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected text, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(typ) or (Any,)
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [decode(v, item, f"{name}[{i}]") if item is not Any else v for i, v in enumerate(items)]
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    return value


def check_bounds(name: str, value: Any, bounds: dict) -> None:
    if value is None or isinstance(value, bool):
        return
    for key, bound in bounds.items():
        ok, sign = BOUNDS[key]
        if not ok(value, bound):
            raise ConfigError(f"{name}: must be {sign} {bound:g}, got {value:g}")


def hints(cls) -> dict:
    return typing.get_type_hints(cls)


class Config:
    """Base of every command's settings: reading from a mapping or YAML file, and ``validate``."""

    @classmethod
    def from_dict(cls, values: dict, source: str | None = None):
        """The settings in ``values`` (from YAML: strings such as ``5e-6`` are converted by type), others defaulted."""
        where = f"{source}: " if source else ""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{where}unknown setting(s) {unknown} for {cls.__name__}; valid: {', '.join(names)}")
        h = hints(cls)
        try:
            return cls(**{k: decode(v, h[k], k) for k, v in values.items()})
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        """Settings from a YAML mapping, then ``overrides`` on top (what flags do on the command line)."""
        import yaml

        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such config file")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of settings")
        return cls.from_dict({**loaded, **overrides}, source=path)

    def save(self, path: str) -> None:
        """The settings as a YAML file that ``from_yaml`` (and ``--config``) reads back."""
        import yaml

        from .atomic import atomic_file

        def write(tmp):
            with open(tmp, "w") as f:
                yaml.safe_dump(dataclasses.asdict(self), f, sort_keys=False)

        atomic_file(path, write)

    def validate(self) -> None:
        """Decode every field by its type (a Python caller may pass ``"5e-6"`` too) and hold it to its bounds;
        subclasses add their cross-field checks after calling this."""
        h = hints(type(self))
        for f in dataclasses.fields(self):
            value = decode(getattr(self, f.name), h[f.name], f.name)
            check_bounds(f.name, value, f.metadata.get("bounds", {}))
            setattr(self, f.name, value)


def settings_key(obj) -> str:
    """A short hash of settings (any JSON-able value): the name of what was built or run with them."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def check_model_path(path: str, what: str = "model") -> None:
    """A path that can only be local (absolute, relative with ./ or ../, ~, or a GGUF file) must exist; anything
    else may be a hub id such as ``org/name``, which transformers resolves."""
    if not path:
        return
    local = path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf") or path.count("/") > 1
    if local and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"{what} {path}: no such file or folder")
