"""Load the Avro schemas of every topic and give each its fixed Confluent schema id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema

from schemas.errors import SchemaError, UnknownFieldError, UnknownSchemaIdError, UnknownTopicError

ParsedSchema = dict[str, Any]
"""A schema as returned by ``fastavro.parse_schema``."""

TOPICS: tuple[str, ...] = ("views", "engagements", "impressions", "items")
DEADLETTER_TOPIC = "deadletter"
BATCH_SCHEMA_NAME = "event_batch"
BATCH_SCHEMA_ID = 100

SCHEMA_IDS: dict[str, int] = {
    "views": 1,
    "engagements": 2,
    "impressions": 3,
    "items": 4,
    DEADLETTER_TOPIC: 5,
    BATCH_SCHEMA_NAME: BATCH_SCHEMA_ID,
}
_RECORD_TOPICS: tuple[str, ...] = (*TOPICS, DEADLETTER_TOPIC)
_PRIMITIVES = {"string", "long", "int", "double", "float", "boolean", "bytes"}


@dataclass(frozen=True)
class FieldInfo:
    """One top-level field of a topic's record schema, reduced to what consumers need.

    ``kind`` is the simple type: string, long, int, double, float, boolean, bytes, enum, map
    or array. ``nullable`` is true for ``["null", X]`` unions.
    """

    name: str
    kind: str
    nullable: bool
    has_default: bool
    default: Any
    symbols: tuple[str, ...] | None = None
    map_values: str | None = None
    raw: Any = None

    @property
    def type_name(self) -> str:
        """Simple type name, with a ``?`` suffix when the field is nullable."""
        return f"{self.kind}?" if self.nullable else self.kind


@dataclass(frozen=True)
class TopicSchema:
    """A loaded schema: its name, id, parsed form and per-field information."""

    name: str
    schema_id: int
    raw: dict[str, Any]
    parsed: ParsedSchema
    fields: tuple[FieldInfo, ...]

    def field(self, name: str) -> FieldInfo:
        """Return the field called ``name``; raise UnknownFieldError if there is none."""
        for f in self.fields:
            if f.name == name:
                return f
        raise UnknownFieldError(self.name, name, [f.name for f in self.fields])

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


def _field_info(schema_name: str, field: dict[str, Any]) -> FieldInfo:
    t = field["type"]
    nullable = False
    if isinstance(t, list):
        branches = [b for b in t if b != "null"]
        if len(t) != 2 or len(branches) != 1:
            raise SchemaError(
                f'{schema_name}.{field["name"]}: only ["null", T] unions are supported, got {t}'
            )
        nullable, t = True, branches[0]
    symbols = map_values = None
    if isinstance(t, str) and t in _PRIMITIVES:
        kind = t
    elif isinstance(t, dict) and t.get("type") == "enum":
        kind, symbols = "enum", tuple(t["symbols"])
    elif isinstance(t, dict) and t.get("type") == "map":
        kind, map_values = "map", t["values"]
    elif isinstance(t, dict) and t.get("type") == "array":
        kind = "array"
    else:
        raise SchemaError(f"{schema_name}.{field['name']}: unsupported field type {t!r}")
    return FieldInfo(
        name=field["name"],
        kind=kind,
        nullable=nullable,
        has_default="default" in field,
        default=field.get("default"),
        symbols=symbols,
        map_values=map_values,
        raw=field,
    )


@cache
def _load(name: str) -> TopicSchema:
    text = resources.files("schemas").joinpath("avro", f"{name}.avsc").read_text("utf-8")
    raw = json.loads(text)
    parsed = parse_schema(raw)
    fields = tuple(_field_info(name, f) for f in raw["fields"])
    return TopicSchema(name=name, schema_id=SCHEMA_IDS[name], raw=raw, parsed=parsed, fields=fields)


def topic_schema(topic: str) -> TopicSchema:
    """Return the loaded schema of ``topic`` (an event topic or the dead-letter topic).

    Raises:
        UnknownTopicError: ``topic`` has no schema.
    """
    if topic not in _RECORD_TOPICS:
        raise UnknownTopicError(topic, _RECORD_TOPICS)
    return _load(topic)


def batch_schema() -> TopicSchema:
    """Return the columnar batch envelope schema (id 100)."""
    return _load(BATCH_SCHEMA_NAME)


def schema_for_topic(topic: str) -> ParsedSchema:
    """Return the parsed Avro schema of ``topic``; raise UnknownTopicError if unknown."""
    return topic_schema(topic).parsed


def schema_id_for_topic(topic: str) -> int:
    """Return the fixed Confluent schema id of ``topic``'s single-event schema."""
    return topic_schema(topic).schema_id


def topic_for_schema_id(schema_id: int) -> str:
    """Return the schema name (a topic, or ``event_batch``) that owns ``schema_id``.

    Raises:
        UnknownSchemaIdError: the id is not one of the fixed ids.
    """
    for name, sid in SCHEMA_IDS.items():
        if sid == schema_id:
            return name
    raise UnknownSchemaIdError(schema_id, SCHEMA_IDS.values())


def schema_by_id(schema_id: int) -> ParsedSchema:
    """Return the parsed schema with the fixed id ``schema_id``; raise UnknownSchemaIdError."""
    return _load(topic_for_schema_id(schema_id)).parsed


def topic_fields(topic: str) -> dict[str, str]:
    """Map each field of ``topic`` to its simple type name (``string``, ``long``, ``string?``...)."""
    return {f.name: f.type_name for f in topic_schema(topic).fields}


def enum_symbols(topic: str, field: str) -> tuple[str, ...]:
    """Return the allowed symbols of the enum ``field`` of ``topic``.

    Raises:
        UnknownTopicError, UnknownFieldError: no such topic or field.
        SchemaError: the field is not an enum.
    """
    info = topic_schema(topic).field(field)
    if info.symbols is None:
        raise SchemaError(f"field {field!r} of topic {topic!r} is {info.type_name}, not an enum")
    return info.symbols
