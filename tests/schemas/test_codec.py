from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings

from schemas.codec import DeadLetter, decode, encode, make_deadletter
from schemas.errors import DecodeError, EncodeError, UnknownTopicError
from schemas.registry import DEADLETTER_TOPIC, TOPICS, schema_id_for_topic
from tests.schemas.samples import ENGAGEMENTS, SAMPLES, VIEWS, sample


@pytest.mark.parametrize("topic", [*TOPICS, DEADLETTER_TOPIC])
def test_round_trip_every_schema(topic: str) -> None:
    data = encode(topic, SAMPLES[topic])
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == schema_id_for_topic(topic)
    assert decode(data, topic=topic) == (schema_id_for_topic(topic), SAMPLES[topic])
    assert decode(data) == (schema_id_for_topic(topic), SAMPLES[topic])


def test_defaults_are_filled() -> None:
    rec = {k: v for k, v in SAMPLES["views"].items() if k not in ("surface", "request_id")}
    _, got = decode(encode("views", rec))
    assert got["surface"] == "explore"
    assert got["request_id"] is None


@settings(max_examples=60, deadline=None)
@given(rec=VIEWS)
def test_views_round_trip_generated(rec: dict[str, Any]) -> None:
    assert decode(encode("views", rec), topic="views")[1] == rec


@settings(max_examples=60, deadline=None)
@given(rec=ENGAGEMENTS)
def test_engagements_round_trip_generated(rec: dict[str, Any]) -> None:
    assert decode(encode("engagements", rec), topic="engagements")[1] == rec


GOOD = encode("views", SAMPLES["views"])


@pytest.mark.parametrize(
    ("data", "message", "field"),
    [
        (b"", "(topic 'views'): empty message: expected Confluent wire framing", None),
        (
            b'{"event_id": "x"}',
            (
                "(topic 'views', byte 0): bad magic byte 0x7b: expected 0x00 (Confluent wire "
                "framing: magic byte 0, 4-byte big-endian schema id, Avro body); it looks like JSON"
            ),
            None,
        ),
        (
            b"\x00\x00\x00",
            "truncated header: message has 3 bytes, the Confluent header needs 5",
            None,
        ),
        (
            b"\x00\x00\x00\x00\x07abc",
            "(topic 'views', byte 1): unknown schema id 7: known ids",
            None,
        ),
        (
            encode("items", SAMPLES["items"]),
            "schema id 4 (items) is not allowed on topic 'views': expected 1",
            None,
        ),
        (
            GOOD[:11],  # cut inside the event_ts varint
            (
                "(topic 'views', field 'event_ts', byte 9): truncated body: the message ended "
                "while reading field 'event_ts' (2 bytes were left)"
            ),
            "event_ts",
        ),
        (GOOD[:16], "field 'user_id', byte 15): truncated body", "user_id"),
        (
            GOOD[:-1],
            "truncated body: the message ended while reading field 'request_id'",
            "request_id",
        ),
        (GOOD + b"\x00\x00", "trailing bytes: 2 bytes after the end of the views record", None),
    ],
)
def test_malformed_bytes_give_clear_errors(data: bytes, message: str, field: str | None) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data, topic="views")
    assert message in str(info.value)
    assert info.value.field == field
    assert info.value.topic == "views"


def test_bad_enum_index_names_the_field() -> None:
    data = bytearray(encode("engagements", SAMPLES["engagements"]))
    data[-2] = 0x28  # zigzag 20: no such symbol
    with pytest.raises(DecodeError, match="invalid enum symbol or union branch index") as info:
        decode(bytes(data), topic="engagements")
    assert info.value.field == "action"


def test_bad_utf8_names_the_field() -> None:
    data = bytearray(GOOD)
    data[6] = 0xFF  # first byte of event_id
    with pytest.raises(DecodeError, match="invalid UTF-8 in string field 'event_id'"):
        decode(bytes(data), topic="views")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"event_ts": "soon"},
            (
                "(topic 'views', field 'event_ts'): expected long (64-bit signed "
                "integer), got str 'soon'"
            ),
        ),
        ({"position": 2**31}, "field 'position'): expected int (32-bit signed integer), got int"),
        ({"request_id": 5}, "field 'request_id'): expected string or null, got int 5"),
        ({"user_id": None}, "field 'user_id'): expected string, got NoneType None"),
        ({"surfce": "x"}, "field 'surfce'): unknown field; the fields of 'views' are event_id,"),
    ],
)
def test_encode_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(EncodeError) as info:
        encode("views", sample("views", **change))
    assert message in str(info.value)


def test_encode_missing_required_and_enum() -> None:
    rec = {k: v for k, v in SAMPLES["views"].items() if k != "item_id"}
    with pytest.raises(
        EncodeError, match="field 'item_id'.: missing required field of type string"
    ):
        encode("views", rec)
    with pytest.raises(EncodeError, match="expected one of click, like, share, save, hide"):
        encode("engagements", sample("engagements", action="poke"))
    with pytest.raises(UnknownTopicError):
        encode("clicks", {})


def test_deadletter_helper_round_trip() -> None:
    payload = b"\x07garbage"
    data = make_deadletter("views", 2, 99, payload, b"k", "bad magic byte 0x07", "decode", 1234)
    dl = DeadLetter.decode(data)
    assert dl == DeadLetter("views", 2, 99, payload, b"k", "bad magic byte 0x07", "decode", 1234)
    with pytest.raises(EncodeError, match="stage must be one of decode, validate, process"):
        make_deadletter("views", 2, 99, payload, None, "x", "parse", 1234)  # type: ignore[arg-type]
