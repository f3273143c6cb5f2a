"""Fuzzing the event decoders: arbitrary, truncated, oversized and wrong-schema bytes only
ever raise the codec's own errors (which the flows turn into dead letters), never crash."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import encode
from schemas.columnar import decode_message, encode_batch, records_to_columns
from schemas.errors import SchemaError

TOPICS = ["views", "engagements", "impressions", "items"]

VIEW = {"event_id": "v1", "event_ts": 1_790_000_000_000, "user_id": "u1", "item_id": "i1",
        "author_id": "a1", "topic": "t1", "surface": "explore", "dwell_ms": 10, "position": 0,
        "request_id": None}


def _decode_or_schema_error(payload: bytes, topic: str) -> None:
    try:
        cols = decode_message(payload, topic)
    except (SchemaError, ValueError):
        return
    assert len(cols) >= 0


@pytest.mark.parametrize("topic", TOPICS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(topic, payload):
    _decode_or_schema_error(payload, topic)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 400), flip=st.integers(0, 400), value=st.integers(0, 255))
def test_truncated_and_corrupted_valid_messages(cut, flip, value):
    single = encode("views", VIEW)
    batch = encode_batch(records_to_columns("views", [VIEW, {**VIEW, "event_id": "v2"}]))
    for payload in (single, batch):
        _decode_or_schema_error(payload[:cut], "views")
        corrupted = bytearray(payload)
        if corrupted:
            corrupted[flip % len(corrupted)] = value
        _decode_or_schema_error(bytes(corrupted), "views")


def test_wrong_schema_and_oversized_messages_are_rejected_with_a_reason():
    with pytest.raises(SchemaError, match=r"schema id 2 \(engagements\) is not allowed on topic 'views'"):
        decode_message(encode("engagements", {
            "event_id": "e", "event_ts": 1, "impression_id": "i", "user_id": "u",
            "item_id": "x", "action": "click"}), "views")
    huge = encode("views", {**VIEW, "user_id": "u" * 2_000_000})
    assert len(decode_message(huge, "views")) == 1  # big but valid: decoded, not a crash
    with pytest.raises(SchemaError):
        decode_message(huge[: len(huge) // 2], "views")
