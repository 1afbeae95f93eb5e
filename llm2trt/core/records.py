"""Typed records: what crosses a module or process boundary, serialized in exactly one place.

A record is a dataclass deriving from `Record`. `to_dict` / `from_dict` walk its fields by their
type hints (nested records, lists, dicts, optionals, enums such as `DType`), so a record written
by one process reads back as the same typed object in another, and no caller builds or picks
apart dicts by hand. `render` is its view for the terminal; `--json` prints `to_dict`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A serialized record does not fit its type (a malformed manifest, a stale worker result)."""


class Record:
    """Base of every typed record; subclasses are dataclasses. Unknown keys are ignored on read, so
    a reader accepts what a newer writer added (and what `to_dict` derives for readers)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        return _decode_record(cls, data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent) + ("\n" if indent else "")

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or an integer of 4300+ digits
            raise RecordError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RecordError("not a JSON object")
        return cls.from_dict(data)

    def write(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        return cls.from_json(path.read_text())

    def render(self) -> str:
        """The record for the terminal; records shown by the CLI override this."""
        return self.to_json().rstrip()


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode_record(cls: type[R], data: Any) -> R:
    if not isinstance(data, Mapping):
        raise RecordError(f"{cls.__name__}: expected an object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{cls.__name__}: missing {f.name!r}")
            continue
        try:
            kwargs[f.name] = _decode(hints[f.name], data[f.name])
        except RecordError as exc:
            raise RecordError(f"{cls.__name__}.{f.name}: {exc}") from None
    return cls(**kwargs)


def _decode(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise RecordError(f"expected one of {', '.join(map(repr, typing.get_args(hint)))}, found {value!r}")
        return value
    if origin in (Union, types.UnionType):
        return _decode_union(typing.get_args(hint), value)
    if origin in (list, tuple):
        return _decode_sequence(hint, origin, value)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise RecordError(f"expected an object, found {type(value).__name__}")
        item = typing.get_args(hint)[1]
        return {str(k): _decode(item, v) for k, v in value.items()}
    if isinstance(hint, type):
        return _decode_type(hint, value)
    return value


def _decode_union(args: tuple[Any, ...], value: Any) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _decode(arg, value)
        except (RecordError, ValueError, TypeError) as exc:
            errors.append(str(exc))
    raise RecordError("; ".join(errors) or f"unexpected {value!r}")


def _decode_sequence(hint: Any, origin: Any, value: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        raise RecordError(f"expected a list, found {type(value).__name__}")
    args = typing.get_args(hint)
    item = args[0] if args else Any
    items = [_decode(item, v) for v in value]
    return tuple(items) if origin is tuple else items


def _decode_type(hint: type, value: Any) -> Any:
    if issubclass(hint, Record):
        return _decode_record(hint, value)
    if issubclass(hint, enum.Enum):
        parse = getattr(hint, "parse", None)
        try:
            return parse(value) if parse else hint(value)
        except Exception as exc:  # an enum's own parser raises its own error type
            raise RecordError(str(exc)) from None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer past float's range (JSON allows any number of digits)
            raise RecordError(f"expected a float, found an integer of {len(str(value))} digits") from None
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint in (int, str, bool) and type(value) is not hint:
        raise RecordError(f"expected {hint.__name__}, found {value!r}")
    return value
