"""Exceptions of the wire contracts: one hierarchy, each message names what failed and why."""

from __future__ import annotations

from collections.abc import Iterable


class SchemaError(Exception):
    """Base class of every error the ``schemas`` package raises on purpose."""


class UnknownTopicError(SchemaError, KeyError):
    """A topic name has no schema."""

    def __init__(self, topic: str, known: Iterable[str]):
        self.topic = topic
        self.known = tuple(known)
        super().__init__(
            f"unknown topic {topic!r}: known topics are {', '.join(self.known)}; "
            "check the spelling or add schemas/avro/<topic>.avsc"
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownFieldError(SchemaError, KeyError):
    """A field name is not part of a topic's schema."""

    def __init__(self, topic: str, field: str, known: Iterable[str]):
        self.topic = topic
        self.field = field
        self.known = tuple(known)
        super().__init__(
            f"topic {topic!r} has no field {field!r}: its fields are {', '.join(self.known)}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownSchemaIdError(SchemaError, KeyError):
    """A Confluent schema id is not one of Tessera's fixed ids."""

    def __init__(self, schema_id: int, known: Iterable[int]):
        self.schema_id = schema_id
        self.known = tuple(known)
        super().__init__(
            f"unknown schema id {schema_id}: known ids are {', '.join(map(str, self.known))}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


def _where(topic: str | None, field: str | None, offset: int | None) -> str:
    parts = []
    if topic is not None:
        parts.append(f"topic {topic!r}")
    if field is not None:
        parts.append(f"field {field!r}")
    if offset is not None:
        parts.append(f"byte {offset}")
    return f" ({', '.join(parts)})" if parts else ""


class DecodeError(SchemaError, ValueError):
    """Bytes or JSON could not be decoded into a valid record.

    Attributes:
        reason: what is wrong, e.g. ``bad magic byte 0x7b``.
        topic: topic being decoded, when known.
        field: first field that failed, when known.
        offset: byte position in the message where the failing part starts, when known.
    """

    def __init__(
        self,
        reason: str,
        *,
        topic: str | None = None,
        field: str | None = None,
        offset: int | None = None,
    ):
        self.reason = reason
        self.topic = topic
        self.field = field
        self.offset = offset
        super().__init__(f"cannot decode{_where(topic, field, offset)}: {reason}")


class EncodeError(SchemaError, ValueError):
    """A record does not match its topic's schema and cannot be encoded."""

    def __init__(self, reason: str, *, topic: str | None = None, field: str | None = None):
        self.reason = reason
        self.topic = topic
        self.field = field
        super().__init__(f"cannot encode{_where(topic, field, None)}: {reason}")
