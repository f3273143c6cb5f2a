"""JSON form of topic records for HTTP: same fields as the Avro schemas, checked the same way.

Bytes fields travel as base64 strings; nullable fields as null or the value; maps as objects.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from schemas.errors import DecodeError, EncodeError
from schemas.registry import FieldInfo, topic_schema

_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


class _Bad(Exception):
    """A value does not fit its field; carries the reason only."""


def _coerce_scalar(kind: str, value: Any, info: FieldInfo) -> Any:
    if kind in _RANGES:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Bad(f"expected an integer ({kind}), got {_describe(value)}")
        lo, hi = _RANGES[kind]
        if not lo <= value <= hi:
            raise _Bad(f"{value} is outside the {kind} range [{lo}, {hi}]")
        return value
    if kind in ("double", "float"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Bad(f"expected a number, got {_describe(value)}")
        return float(value)
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _Bad(f"expected true or false, got {_describe(value)}")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise _Bad(f"expected a string, got {_describe(value)}")
        return value
    if kind == "enum":
        symbols = info.symbols or ()
        if value not in symbols or not isinstance(value, str):
            raise _Bad(f"unknown symbol {value!r}; allowed: {', '.join(symbols)}")
        return value
    if kind == "bytes":
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if not isinstance(value, str):
            raise _Bad(f"expected a base64 string, got {_describe(value)}")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
            raise _Bad(f"invalid base64: {exc}") from exc
    raise _Bad(f"type {kind} is not supported in JSON")


def _describe(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    text = repr(value)
    return f"{names.get(type(value), type(value).__name__)} {text[:40]}"


def _coerce(info: FieldInfo, value: Any) -> Any:
    if value is None:
        if info.nullable:
            return None
        raise _Bad(f"null is not allowed, expected {info.kind}")
    if info.kind == "map":
        if not isinstance(value, Mapping):
            raise _Bad(
                f"expected an object (map of string to {info.map_values}), got {_describe(value)}"
            )
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Bad(f"map key {k!r} is not a string")
            try:
                out[k] = _coerce_scalar(str(info.map_values), v, info)
            except _Bad as exc:
                raise _Bad(f"key {k!r}: {exc}") from None
        return out
    return _coerce_scalar(info.kind, value, info)


def _check(topic: str, record: Any, error: type[DecodeError | EncodeError]) -> dict[str, Any]:
    ts = topic_schema(topic)
    if not isinstance(record, Mapping):
        raise error(f"expected a JSON object, got {_describe(record)}", topic=topic)
    known = set(ts.field_names)
    for key in record:
        if key not in known:
            raise error(
                f"unknown field; the fields of {topic!r} are {', '.join(ts.field_names)}",
                topic=topic,
                field=str(key),
            )
    out: dict[str, Any] = {}
    for info in ts.fields:
        if info.name not in record:
            if not info.has_default:
                raise error(
                    f"missing required field of type {info.type_name}", topic=topic, field=info.name
                )
            default = info.default
            out[info.name] = dict(default) if isinstance(default, dict) else default
            continue
        try:
            out[info.name] = _coerce(info, record[info.name])
        except _Bad as exc:
            raise error(str(exc), topic=topic, field=info.name) from None
    return out


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_json(topic: str, record: Mapping[str, Any]) -> bytes:
    """Validate ``record`` (defaults filled) and return its JSON bytes.

    Raises:
        EncodeError: the record does not match ``topic``'s schema (``.field`` names the field).
    """
    return orjson.dumps(_check(topic, record, EncodeError), default=_default)


def from_json(topic: str, data: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """Parse and validate a JSON record of ``topic``; fill defaults and coerce numbers.

    Integral floats become ints for int/long fields, ints become floats for doubles; unknown
    fields, unknown enum symbols and wrong types are rejected.

    Raises:
        DecodeError: invalid JSON or a record that does not match (``.field`` names the field).
    """
    if isinstance(data, (bytes, bytearray, memoryview, str)):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"invalid JSON: {exc}", topic=topic) from exc
    return _check(topic, data, DecodeError)
