"""Load the Avro schemas of every topic and give each its fixed Confluent schema id.

The platform's topics (``TOPICS``) are built in. A features file may declare more
(``sources:``); ``register_source`` derives each one's record schema (``event_id`` and
``event_ts`` first, then the declared fields) and a schema id from its content, so every
process that loads the same file agrees on both. ``event_topics()`` lists both kinds.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Mapping
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
#: field types a declared source may use (each has a columnar form; ``?``: may be null)
SOURCE_FIELD_TYPES: tuple[str, ...] = ("string", "string?", "long", "int", "double")
#: fields every event record starts with; a declared source gets them too
COMMON_FIELDS: tuple[str, ...] = ("event_id", "event_ts")
#: declared sources' schema ids are this plus a hash of the schema (built-in ids are below)
DECLARED_ID_BASE = 1000
_DECLARED: dict[str, TopicSchema] = {}
_DECLARED_FIELDS: dict[str, dict[str, str]] = {}
_DECLARED_LOCK = threading.Lock()
_CACHES: list[Any] = []


def per_schema_cache(fn):
    """``functools.cache`` for functions of a topic's schema: cleared when a source's
    declaration changes in this process (a test, or a features file read again)."""
    cached = cache(fn)
    _CACHES.append(cached)
    return cached


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


def event_topics() -> tuple[str, ...]:
    """The event topics of this process: the built-in ones, then the declared sources."""
    return (*TOPICS, *_DECLARED)


def is_event_topic(topic: str) -> bool:
    """Whether ``topic`` is a built-in event topic or a declared source."""
    return topic in TOPICS or topic in _DECLARED


def declared_schema(name: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """The Avro record schema of a declared source: ``event_id``, ``event_ts``, then ``fields``.

    ``fields`` maps each field name to one of ``SOURCE_FIELD_TYPES``.

    Raises:
        SchemaError: a type outside ``SOURCE_FIELD_TYPES`` or a field named like a common one.
    """
    out: list[dict[str, Any]] = [
        {"name": "event_id", "type": "string", "doc": "Unique id of the event."},
        {"name": "event_ts", "type": "long", "doc": "Event time, epoch ms UTC."},
    ]
    for fname, ftype in fields.items():
        if fname in COMMON_FIELDS:
            raise SchemaError(
                f"source {name!r}: field {fname!r} is part of every event record already "
                "(event_id: string, event_ts: epoch ms); leave it out of 'fields'")
        if ftype not in SOURCE_FIELD_TYPES:
            raise SchemaError(
                f"source {name!r}: field {fname!r} has type {ftype!r}; declared fields take "
                f"one of {', '.join(SOURCE_FIELD_TYPES)}")
        if ftype.endswith("?"):
            out.append({"name": fname, "type": ["null", ftype[:-1]], "default": None})
        else:
            out.append({"name": fname, "type": ftype})
    return {"type": "record", "name": name, "namespace": "tessera.sources", "fields": out}


def register_source(name: str, fields: Mapping[str, str]) -> TopicSchema:
    """Make ``name`` an event topic of this process with the schema ``declared_schema`` gives.

    Registering the same name with the same fields again is a no-op; with other fields it
    replaces the earlier declaration (a features file was edited). The schema id is
    ``DECLARED_ID_BASE`` plus a hash of the schema, the same in every process.

    Raises:
        SchemaError: ``name`` is a built-in topic, or a field is not allowed.
    """
    if name in _RECORD_TOPICS or name == BATCH_SCHEMA_NAME:
        raise SchemaError(f"{name!r} is a built-in topic; declare a source under another name")
    raw = declared_schema(name, fields)
    text = json.dumps(raw, sort_keys=True)
    schema_id = DECLARED_ID_BASE + zlib.crc32(text.encode("utf-8")) % 1_000_000_000
    with _DECLARED_LOCK:
        known = _DECLARED.get(name)
        if known is not None and known.schema_id == schema_id:
            return known
        schema = TopicSchema(name=name, schema_id=schema_id, raw=raw, parsed=parse_schema(raw),
                             fields=tuple(_field_info(name, f) for f in raw["fields"]))
        _DECLARED[name] = schema
        _DECLARED_FIELDS[name] = dict(fields)
        if known is not None:
            for cached in _CACHES:
                cached.cache_clear()
        return schema


def declared_sources() -> dict[str, dict[str, str]]:
    """Every source declared in this process, ``{name: fields}``: what another process (a
    distributed job's worker) passes to :func:`register_source` to know the same topics."""
    with _DECLARED_LOCK:
        return {name: dict(fields) for name, fields in _DECLARED_FIELDS.items()}


def topic_schema(topic: str) -> TopicSchema:
    """Return the loaded schema of ``topic`` (an event topic, a declared source, or the
    dead-letter topic).

    Raises:
        UnknownTopicError: ``topic`` has no schema.
    """
    declared = _DECLARED.get(topic)
    if declared is not None:
        return declared
    if topic not in _RECORD_TOPICS:
        raise UnknownTopicError(topic, (*_RECORD_TOPICS, *_DECLARED))
    return _load(topic)


def schema_named(name: str) -> TopicSchema:
    """The schema called ``name``: a built-in one (a topic, ``deadletter``, ``event_batch``)
    or a declared source's. Raises ``UnknownTopicError`` for any other name."""
    if name in SCHEMA_IDS:
        return _load(name)
    return topic_schema(name)


def schema_ids() -> dict[str, int]:
    """Every schema id this process knows: the fixed ones and the declared sources'."""
    return {**SCHEMA_IDS, **{n: d.schema_id for n, d in list(_DECLARED.items())}}


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
    for name, schema in list(_DECLARED.items()):
        if schema.schema_id == schema_id:
            return name
    raise UnknownSchemaIdError(schema_id, [*SCHEMA_IDS.values(),
                                           *(d.schema_id for d in _DECLARED.values())])


def schema_by_id(schema_id: int) -> ParsedSchema:
    """Return the parsed schema with the id ``schema_id``; raise UnknownSchemaIdError."""
    name = topic_for_schema_id(schema_id)
    return (_load(name) if name in SCHEMA_IDS else topic_schema(name)).parsed


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
