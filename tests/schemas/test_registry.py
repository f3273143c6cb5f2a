from __future__ import annotations

import pytest

from schemas.errors import SchemaError, UnknownFieldError, UnknownSchemaIdError, UnknownTopicError
from schemas.registry import (
    DEADLETTER_TOPIC,
    TOPICS,
    enum_symbols,
    schema_by_id,
    schema_for_topic,
    schema_id_for_topic,
    topic_fields,
    topic_for_schema_id,
)


def test_fixed_ids() -> None:
    ids = {t: schema_id_for_topic(t) for t in (*TOPICS, DEADLETTER_TOPIC)}
    assert ids == {"views": 1, "engagements": 2, "impressions": 3, "items": 4, "deadletter": 5}
    assert topic_for_schema_id(100) == "event_batch"
    assert schema_by_id(1) is schema_for_topic("views")
    assert schema_by_id(100)["name"] == "tessera.events.EventBatch"


def test_topic_fields_simple_types() -> None:
    views = topic_fields("views")
    assert views["event_ts"] == "long"
    assert views["position"] == "int"
    assert views["request_id"] == "string?"
    assert topic_fields("engagements")["action"] == "enum"
    assert topic_fields("impressions")["scores"] == "map"
    assert topic_fields("deadletter")["key"] == "bytes?"
    assert topic_fields("deadletter")["payload"] == "bytes"
    for topic in TOPICS:
        assert {"event_id", "event_ts"} <= set(topic_fields(topic))


def test_enum_symbols() -> None:
    assert enum_symbols("engagements", "action") == ("click", "like", "share", "save", "hide")
    assert enum_symbols("items", "op") == ("created", "updated", "deleted")


def test_errors_name_the_problem() -> None:
    with pytest.raises(UnknownTopicError, match=r"unknown topic 'view': known topics are views,"):
        topic_fields("view")
    with pytest.raises(UnknownFieldError, match=r"topic 'engagements' has no field 'verb'"):
        enum_symbols("engagements", "verb")
    with pytest.raises(
        SchemaError, match=r"field 'user_id' of topic 'views' is string, not an enum"
    ):
        enum_symbols("views", "user_id")
    with pytest.raises(UnknownSchemaIdError, match=r"unknown schema id 42"):
        schema_by_id(42)
