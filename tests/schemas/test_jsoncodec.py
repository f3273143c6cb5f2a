from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings

from schemas.codec import decode, encode
from schemas.errors import DecodeError, EncodeError
from schemas.jsoncodec import from_json, to_json
from schemas.registry import DEADLETTER_TOPIC, TOPICS
from tests.schemas.samples import SAMPLES, VIEWS, sample


@pytest.mark.parametrize("topic", [*TOPICS, DEADLETTER_TOPIC])
def test_json_round_trip_every_schema(topic: str) -> None:
    data = to_json(topic, SAMPLES[topic])
    assert from_json(topic, data) == SAMPLES[topic]
    # the JSON form and the Avro form carry the same record
    assert decode(encode(topic, from_json(topic, data)))[1] == SAMPLES[topic]


@settings(max_examples=40, deadline=None)
@given(rec=VIEWS)
def test_views_json_round_trip_generated(rec: dict[str, Any]) -> None:
    assert from_json("views", to_json("views", rec)) == rec


def test_bytes_travel_as_base64() -> None:
    doc = orjson.loads(to_json("deadletter", SAMPLES["deadletter"]))
    assert doc["key"] == "dTE="
    assert from_json("deadletter", doc)["key"] == b"u1"


def test_defaults_filled_and_numbers_coerced() -> None:
    body = {
        "event_id": "g",
        "event_ts": 1.7e12,
        "impression_id": "i",
        "user_id": "u",
        "item_id": "x",
        "action": "click",
    }
    got = from_json("engagements", orjson.dumps(body))
    assert got["event_ts"] == 1_700_000_000_000 and isinstance(got["event_ts"], int)
    assert got["author_id"] == "" and got["dwell_ms"] == 0
    scores = from_json("impressions", {**SAMPLES["impressions"], "scores": {"l1": 1}})["scores"]
    assert scores == {"l1": 1.0} and isinstance(scores["l1"], float)


@pytest.mark.parametrize(
    ("topic", "body", "field", "message"),
    [
        (
            "engagements",
            sample("engagements", action="poke"),
            "action",
            "unknown symbol 'poke'; allowed: click, like, share, save, hide",
        ),
        (
            "views",
            sample("views", event_ts="2024-01-01"),
            "event_ts",
            "expected an integer (long), got string '2024-01-01'",
        ),
        (
            "views",
            sample("views", event_ts=1.5),
            "event_ts",
            "expected an integer (long), got float 1.5",
        ),
        ("views", sample("views", position=2**31), "position", "is outside the int range"),
        (
            "views",
            sample("views", dwell_ms=True),
            "dwell_ms",
            "expected an integer (long), got boolean True",
        ),
        ("views", sample("views", user_id=None), "user_id", "null is not allowed, expected string"),
        (
            "views",
            {**sample("views"), "colour": "red"},
            "colour",
            "unknown field; the fields of 'views'",
        ),
        (
            "impressions",
            sample("impressions", scores={"l1": "high"}),
            "scores",
            "key 'l1': expected a number, got string 'high'",
        ),
        (
            "items",
            {k: v for k, v in SAMPLES["items"].items() if k != "topic"},
            "topic",
            "missing required field of type string",
        ),
    ],
)
def test_json_validation_errors_name_the_field(
    topic: str, body: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(DecodeError) as info:
        from_json(topic, orjson.dumps(body))
    assert info.value.field == field
    assert message in str(info.value)
    assert f"field {field!r}" in str(info.value)


def test_not_json_or_not_an_object() -> None:
    with pytest.raises(DecodeError, match=r"\(topic 'views'\): invalid JSON"):
        from_json("views", b"{not json")
    with pytest.raises(DecodeError, match="expected a JSON object, got array"):
        from_json("views", b"[1, 2]")


def test_to_json_rejects_bad_records() -> None:
    with pytest.raises(EncodeError) as info:
        to_json("items", sample("items", op="archived"))
    assert info.value.field == "op"
