"""Encode and decode single records in Confluent wire framing (magic 0, schema id, Avro body)."""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.validation import validate

from schemas.errors import DecodeError, EncodeError
from schemas.registry import (
    BATCH_SCHEMA_ID,
    DEADLETTER_TOPIC,
    FieldInfo,
    ParsedSchema,
    TopicSchema,
    per_schema_cache,
    schema_id_for_topic,
    schema_ids,
    schema_named,
    topic_for_schema_id,
    topic_schema,
)

MAGIC_BYTE = 0
HEADER_SIZE = 5
_HEADER = struct.Struct(">BI")
_FRAMING = "Confluent wire framing: magic byte 0, 4-byte big-endian schema id, Avro body"
_INT32 = (-(2**31), 2**31 - 1)


def frame(schema_id: int, body: bytes) -> bytes:
    """Prefix ``body`` with the Confluent header for ``schema_id``."""
    return _HEADER.pack(MAGIC_BYTE, schema_id) + body


def read_header(data: bytes, *, topic: str | None = None) -> int:
    """Check the Confluent header of ``data`` and return its schema id.

    Raises:
        DecodeError: empty message, bad magic byte, short header or unknown schema id.
    """
    if not data:
        raise DecodeError(f"empty message: expected {_FRAMING}", topic=topic)
    if data[0] != MAGIC_BYTE:
        hint = "; it looks like JSON" if data[0] in b"{[" else ""
        raise DecodeError(
            f"bad magic byte 0x{data[0]:02x}: expected 0x00 ({_FRAMING}){hint}",
            topic=topic,
            offset=0,
        )
    if len(data) < HEADER_SIZE:
        raise DecodeError(
            f"truncated header: message has {len(data)} bytes, the Confluent header needs "
            f"{HEADER_SIZE}",
            topic=topic,
            offset=len(data),
        )
    schema_id = int.from_bytes(data[1:HEADER_SIZE], "big")
    ids = schema_ids()
    if schema_id not in ids.values():
        known = ", ".join(f"{i} ({n})" for n, i in ids.items())
        raise DecodeError(
            f"unknown schema id {schema_id}: known ids are {known}", topic=topic, offset=1
        )
    return schema_id


def check_schema_allowed(schema_id: int, topic: str, *, allow_batch: bool) -> None:
    """Raise DecodeError unless ``schema_id`` may appear on ``topic``."""
    expected = schema_id_for_topic(topic)
    if schema_id == expected or (allow_batch and schema_id == BATCH_SCHEMA_ID):
        return
    allowed = f"{expected}" + (f" or {BATCH_SCHEMA_ID} (event_batch)" if allow_batch else "")
    hint = (
        "; read batches with schemas.columnar.decode_message"
        if schema_id == BATCH_SCHEMA_ID
        else ""
    )
    raise DecodeError(
        f"schema id {schema_id} ({topic_for_schema_id(schema_id)}) is not allowed on topic "
        f"{topic!r}: expected {allowed}{hint}",
        topic=topic,
        offset=1,
    )


@per_schema_cache
def _field_schemas(name: str) -> tuple[tuple[str, ParsedSchema], ...]:
    """One single-field record schema per field, to find which field a bad body breaks."""
    ts = schema_named(name)
    return tuple(
        (
            f.name,
            parse_schema({"type": "record", "name": f"tessera.diag.{name}_{i}", "fields": [f.raw]}),
        )
        for i, f in enumerate(ts.fields)
    )


def _failure_reason(exc: Exception, field: str, remaining: int, at_end: bool) -> str:
    # fastavro reports a varint cut short as "string index out of range", a bad enum or
    # union index as "list index out of range".
    ran_out = isinstance(exc, IndexError) and at_end and "list index" not in str(exc)
    if isinstance(exc, EOFError) or ran_out:
        return (
            f"truncated body: the message ended while reading field {field!r} "
            f"({remaining} bytes were left)"
        )
    if isinstance(exc, UnicodeDecodeError):
        return f"invalid UTF-8 in string field {field!r}: {exc.reason}"
    if isinstance(exc, IndexError):
        return f"invalid enum symbol or union branch index in field {field!r}"
    return f"field {field!r} is malformed: {type(exc).__name__}: {exc}"


def _diagnose(ts: TopicSchema, data: bytes, topic: str | None, exc: Exception) -> DecodeError:
    bio = io.BytesIO(data)
    bio.seek(HEADER_SIZE)
    for name, schema in _field_schemas(ts.name):
        start = bio.tell()
        try:
            schemaless_reader(bio, schema, None)
        except Exception as field_exc:
            return DecodeError(
                _failure_reason(field_exc, name, len(data) - start, bio.tell() >= len(data)),
                topic=topic,
                field=name,
                offset=start,
            )
    return DecodeError(
        f"body does not match schema {ts.name}: {type(exc).__name__}: {exc}", topic=topic
    )


@per_schema_cache
def _int_fields(name: str) -> tuple[str, ...]:
    """Top-level ``int`` fields of a schema (nullable ones included)."""
    return tuple(f.name for f in schema_named(name).fields if f.kind == "int")


def read_body(ts: TopicSchema, data: bytes, *, topic: str | None = None) -> dict[str, Any]:
    """Decode the Avro body of framed ``data`` with schema ``ts``; no bytes may be left over.

    Raises:
        DecodeError: the body is truncated or malformed (naming the first bad field), has
        trailing bytes, or has an ``int`` outside 32 bits (an overlong varint, which fastavro
        reads as a 64-bit value).
    """
    bio = io.BytesIO(data)
    bio.seek(HEADER_SIZE)
    try:
        record = schemaless_reader(bio, ts.parsed, None)
    except Exception as exc:  # fastavro raises EOFError, IndexError, ...
        raise _diagnose(ts, data, topic, exc) from exc
    end = bio.tell()
    if end != len(data):
        raise DecodeError(
            f"trailing bytes: {len(data) - end} bytes after the end of the {ts.name} record; "
            "the writer used another schema or the message is corrupt",
            topic=topic,
            offset=end,
        )
    for name in _int_fields(ts.name):
        value = record[name]
        if value is not None and not _INT32[0] <= value <= _INT32[1]:
            raise DecodeError(
                f"int value {value} is outside the 32-bit range [{_INT32[0]}, {_INT32[1]}] "
                "(an overlong varint)",
                topic=topic,
                field=name,
            )
    return record


def decode(data: bytes, *, topic: str | None = None) -> tuple[int, dict[str, Any]]:
    """Decode one framed record and return ``(schema_id, record)``.

    With ``topic``, only that topic's single-event schema id is accepted; without it, any
    known id is (a batch envelope then decodes to its raw envelope record).

    Raises:
        DecodeError: the message is empty, badly framed, truncated, malformed or too long.
        UnknownTopicError: ``topic`` is not a known topic.
    """
    schema_id = read_header(data, topic=topic)
    if topic is not None:
        check_schema_allowed(schema_id, topic, allow_batch=False)
    ts = schema_named(topic_for_schema_id(schema_id))
    return schema_id, read_body(ts, data, topic=topic or ts.name)


def _describe(info: FieldInfo) -> str:
    if info.kind == "enum":
        desc = f"one of {', '.join(info.symbols or ())}"
    elif info.kind == "int":
        desc = "int (32-bit signed integer)"
    elif info.kind == "long":
        desc = "long (64-bit signed integer)"
    elif info.kind == "map":
        desc = f"map of string to {info.map_values}"
    else:
        desc = info.kind
    return f"{desc} or null" if info.nullable else desc


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@per_schema_cache
def _parsed_field_types(name: str) -> tuple[tuple[FieldInfo, Any], ...]:
    ts = schema_named(name)
    return tuple(zip(ts.fields, (f["type"] for f in ts.parsed["fields"]), strict=True))


@per_schema_cache
def _field_index(name: str) -> frozenset[str]:
    return frozenset(schema_named(name).field_names)


def check_record(topic: str, record: Mapping[str, Any]) -> None:
    """Check ``record`` against ``topic``'s schema: no unknown fields, required fields set, types.

    Raises:
        EncodeError: naming the first offending field, the expected type and the value.
    """
    ts = topic_schema(topic)
    if not isinstance(record, Mapping):
        raise EncodeError(f"expected a dict record, got {type(record).__name__}", topic=topic)
    for key in record:
        if key not in _field_index(ts.name):
            raise EncodeError(
                f"unknown field; the fields of {topic!r} are {', '.join(ts.field_names)}",
                topic=topic,
                field=str(key),
            )
    for info, avro_type in _parsed_field_types(ts.name):
        if info.name not in record:
            if info.has_default:
                continue
            raise EncodeError(
                f"missing required field of type {info.type_name}", topic=topic, field=info.name
            )
        value = record[info.name]
        if not validate(value, avro_type, raise_errors=False):
            raise EncodeError(
                f"expected {_describe(info)}, got {type(value).__name__} {_short(value)}",
                topic=topic,
                field=info.name,
            )


def encode(topic: str, record: Mapping[str, Any]) -> bytes:
    """Validate ``record`` and encode it as a framed single-event message of ``topic``.

    Missing fields that have a default take it.

    Raises:
        EncodeError: the record does not match the schema (the message names the field).
        UnknownTopicError: ``topic`` is not a known topic.
    """
    check_record(topic, record)
    ts = topic_schema(topic)
    bio = io.BytesIO()
    bio.write(_HEADER.pack(MAGIC_BYTE, ts.schema_id))
    schemaless_writer(bio, ts.parsed, record)
    return bio.getvalue()


Stage = Literal["decode", "validate", "process"]
STAGES: tuple[str, ...] = get_args(Stage)


@dataclass(frozen=True)
class DeadLetter:
    """A message that failed, with where it came from and why; the payload is kept untouched."""

    topic: str
    partition: int
    offset: int
    payload: bytes
    key: bytes | None
    reason: str
    stage: Stage
    failed_ts: int

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise EncodeError(
                f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}",
                topic=DEADLETTER_TOPIC,
                field="stage",
            )

    def to_record(self) -> dict[str, Any]:
        """Return the dead-letter record as a dict matching ``deadletter.avsc``."""
        return {
            "failed_ts": self.failed_ts,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "reason": self.reason,
            "stage": self.stage,
            "key": None if self.key is None else bytes(self.key),
            "payload": bytes(self.payload),
        }

    def encode(self) -> bytes:
        """Encode as a framed message of the dead-letter topic."""
        return encode(DEADLETTER_TOPIC, self.to_record())

    @classmethod
    def decode(cls, data: bytes) -> DeadLetter:
        """Decode a framed dead-letter message; raise DecodeError if it is not one."""
        _, rec = decode(data, topic=DEADLETTER_TOPIC)
        return cls(**rec)


def make_deadletter(
    topic: str,
    partition: int,
    offset: int,
    payload: bytes,
    key: bytes | None,
    reason: str,
    stage: Stage,
    failed_ts: int,
) -> bytes:
    """Return the encoded dead-letter message for a record that failed at ``stage``."""
    return DeadLetter(
        topic=topic,
        partition=partition,
        offset=offset,
        payload=bytes(payload),
        key=None if key is None else bytes(key),
        reason=reason,
        stage=stage,
        failed_ts=failed_ts,
    ).encode()
