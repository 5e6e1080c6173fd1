"""The base of every component's config dataclass (model, engine, server, trainer, RL, study): built from a dict,
a JSON file or `FIELD=VALUE` overrides; unknown fields refused by name; every field type-checked from its
annotation (NaN and infinities refused) before the component's own checks, and every error names the field, the
value and what is allowed. A field's documentation is the string literal on the line after it (as torchtitan's
configs): `field_docs` reads it for the CLI's help."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import textwrap
import types
import typing
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config field holds a value that is not allowed; the message names the field, the value and the rule."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal that follows its definition in the class body (for every dataclass in
    the MRO; subclasses win). Empty for a class whose source is not available."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (PEP 563 strings evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _union_args(tp: Any) -> tuple | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _check_value(value: Any, tp: Any) -> tuple[bool, Any, str]:
    """(ok, value converted to the field's type, what the type allows)."""
    if tp is Any:
        return True, value, "any value"
    args = _union_args(tp)
    if args is not None:
        if value is None and type(None) in args:
            return True, None, "null"
        wants = []
        for sub in (a for a in args if a is not type(None)):
            ok, conv, what = _check_value(value, sub)
            if ok:
                return True, conv, what
            wants.append(what)
        return False, value, " or ".join(wants + (["null"] if type(None) in args else []))
    origin = typing.get_origin(tp) or tp
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, value, "a finite number"
    if tp is str:
        return isinstance(value, str), value, "a string"
    if origin in (list, tuple):
        item_types = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value, f"a list{_of(item_types)}"
        if origin is tuple and item_types and item_types[-1] is not Ellipsis:
            if len(value) != len(item_types):
                return False, value, f"a list of {len(item_types)} items"
            pairs = list(zip(value, item_types))
        else:
            pairs = [(v, item_types[0] if item_types else Any) for v in value]
        out = []
        for v, t in pairs:
            ok, conv, _ = _check_value(v, t)
            if not ok:
                return False, value, f"a list{_of(item_types)}"
            out.append(conv)
        return True, tuple(out) if origin is tuple else out, f"a list{_of(item_types)}"
    if origin is dict:
        return isinstance(value, dict), value, "an object"
    return isinstance(value, origin) if isinstance(origin, type) else True, value, getattr(origin, "__name__", str(tp))


def _of(item_types: tuple) -> str:
    names = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    return f" of {names[item_types[0]]}" if item_types and item_types[0] in names else ""


def parse_override(item: str) -> tuple[str, Any]:
    """'FIELD=VALUE' -> (FIELD, VALUE parsed as JSON, or the raw string when it is not JSON)."""
    if "=" not in item:
        raise ConfigError(f"an override must be FIELD=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


class ConfigBase:
    """Mixin for `@dataclass` configs. Subclasses set `_where` (how messages name the config) and add their
    rules in `validate()` with `self.require(ok, field, allowed)` after `super().validate()`."""

    _where: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        self.validate()

    # ---- checks ---------------------------------------------------------------------------------
    def fail(self, name: str, allowed: str):
        raise ConfigError(f"{self._where} field {name}={_show(getattr(self, name, None))}: {allowed}")

    def require(self, ok: bool, name: str, allowed: str) -> None:
        if not ok:
            self.fail(name, allowed)

    def check_types(self) -> None:
        """Every field against its annotation (ints where ints are declared, finite numbers, lists of the item
        type, ...); lists become tuples for tuple fields (an int stays an int in a float field: JSON round trips)."""
        for name, tp in field_types(type(self)).items():
            ok, conv, what = _check_value(getattr(self, name), tp)
            if not ok:
                self.fail(name, f"must be {what}")
            object.__setattr__(self, name, conv)

    def validate(self) -> None:
        self.check_types()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls._where}: expected an object of fields, got {_show(d)}")
        known = set(cls.field_names())
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{cls._where}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{cls._where}: {path} is not a JSON file ({e})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    def replace(self, **changes: Any):
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"{self._where}: unknown field(s) {unknown}; known: {sorted(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, items: list[str] | None):
        """A copy with `FIELD=VALUE` items applied (values parsed as JSON where they are JSON)."""
        changes = dict(parse_override(item) for item in items or [])
        return self.replace(**changes) if changes else self
