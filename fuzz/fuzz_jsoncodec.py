"""Fuzz the JSON side of the events: ``schemas.jsoncodec`` and the ``/v1/events`` body parser.

Input: one byte choosing the target and the mode, then either the JSON text of an HTTP body
(text mode: libFuzzer mutates the bytes, with ``fuzz/dicts/json.dict``) or bytes that steer a
structured mutation of a valid body (fields replaced by edge values: integers at and past the
32/64-bit limits, huge and non-finite floats, odd strings, wrong types, unknown fields).

* targets 0-4, ``schemas.jsoncodec.from_json`` for views, engagements, impressions, items
  and deadletter: only ``DecodeError`` may escape (as documented); an accepted record must
  survive ``to_json`` -> ``from_json`` unchanged and must encode as Avro for its topic
  (what the JSON codec accepts, the Kafka side must accept too);
* target 5, ``POST /v1/events`` as ``serving/app.py`` runs it: ``orjson.loads`` (a bad body is
  a 400), ``serving.requests.parse_engagements`` (only ``BadRequest``), then
  ``schemas.codec.encode("engagements", rec)`` for every accepted record, which must succeed:
  the handler catches ``ServingError`` only, so anything else there is an HTTP 500;
* target 6, ``POST /v1/feed``'s ``parse_feed``: only ``BadRequest``.

Usage: python fuzz/fuzz_jsoncodec.py [-atheris_runs=N] [libFuzzer flags] [corpus or crash files]
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from fuzz._harness import Violation, main
from fuzz._samples import RECORDS

JSON_TOPICS = ("views", "engagements", "impressions", "items", "deadletter")
EVENTS, FEED = len(JSON_TOPICS), len(JSON_TOPICS) + 1

from_json = to_json = encode = DecodeError = SchemaError = None
parse_engagements = parse_feed = BadRequest = None


def load() -> None:
    global from_json, to_json, encode, DecodeError, SchemaError
    global parse_engagements, parse_feed, BadRequest
    from schemas.codec import encode
    from schemas.errors import DecodeError, SchemaError
    from schemas.jsoncodec import from_json, to_json
    from serving.errors import BadRequest
    from serving.requests import parse_engagements, parse_feed


def _json_default(value):
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(type(value).__name__)


def seeds() -> list[bytes]:
    out = []
    for i, topic in enumerate(JSON_TOPICS):
        for rec in RECORDS[topic]:
            out.append(bytes([i]) + orjson.dumps(rec, default=_json_default))
    engagement = {"impression_id": "imp-1", "user_id": "u1", "item_id": "i9", "action": "click",
                  "event_ts": 1_700_000_000_000, "dwell_ms": 1500, "event_id": "e-1"}
    out.append(bytes([EVENTS]) + orjson.dumps(engagement))
    out.append(bytes([EVENTS]) + orjson.dumps([engagement, {**engagement, "action": "like"}]))
    out.append(bytes([FEED]) + orjson.dumps({"user_id": "u7", "feed_type": "FOLLOW",
                                             "limit": 10}))
    # structured mode: the first byte + FEED + 1, then steering bytes
    out += [bytes([target + FEED + 1]) + bytes(range(k, k + 24))
            for target in range(FEED + 1) for k in (0, 100)]
    return out


class _Steer:
    """Reads small decisions from the input bytes (zeros once they run out)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1] if self.pos <= len(self.data) else 0

    def pick(self, options):
        return options[self.byte() % len(options)]

    def text(self) -> str:
        n = self.byte() % 24
        raw = bytes(self.byte() for _ in range(n))
        return raw.decode("utf-8", "replace") if self.byte() % 2 else raw.decode("latin-1")


EDGE_INTS = (0, -1, 1, 2**31 - 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, 2**63, -(2**63),
             -(2**63) - 1, 2**64 - 1, 2**64, 10**30, 1_700_000_000_000, 4_102_444_800_000)
EDGE_FLOATS = (0.0, -0.0, 0.5, 1e308, -1e308, 1e-320, 1.5e300 * 1e10, float("nan"), 2.0**63)
EDGE_STRS = ("", "\x00", "a" * 129, "é", "\u2028", "====", "dTE=", "click", "EXPLORE",
             "explore", "created", "null", "0", "1e400")
FIELDS = ("event_id", "event_ts", "user_id", "item_id", "impression_id", "action", "dwell_ms",
          "position", "request_id", "feed_type", "limit", "key", "payload", "partition",
          "offset", "scores", "features", "model_versions", "op", "created_ts", "surface",
          "feature_watermark", "unknown_field")


def _value(st: _Steer, depth: int = 0):
    kind = st.byte() % (9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return st.pick((True, False))
    if kind == 2:
        return st.pick(EDGE_INTS) + st.pick((0, 0, 1, -1))
    if kind == 3:
        return st.pick(EDGE_FLOATS)
    if kind == 4:
        return st.pick(EDGE_STRS)
    if kind == 5:
        return st.text()
    if kind == 6:
        return [_value(st, depth + 1) for _ in range(st.byte() % 4)]
    if kind == 7:
        return {st.pick(FIELDS[-6:] + ("",)): _value(st, depth + 1) for _ in range(st.byte() % 4)}
    return int.from_bytes(bytes(st.byte() for _ in range(9)), "big", signed=True)


def _structured_body(target: int, st: _Steer) -> bytes:
    """A valid body of ``target`` with a few fields replaced, removed or added."""
    if target < len(JSON_TOPICS):
        recs = RECORDS[JSON_TOPICS[target]]
        body = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
                for k, v in recs[st.byte() % len(recs)].items()}
    elif target == EVENTS:
        body = {"impression_id": "imp-1", "user_id": "u1", "item_id": "i9", "action": "click",
                "event_ts": 1_700_000_000_000, "dwell_ms": 1500, "event_id": "e-1"}
    else:
        body = {"user_id": "u7", "feed_type": "FOLLOW", "limit": 10}
    for _ in range(1 + st.byte() % 3):
        name = st.pick(tuple(body) + FIELDS)
        if st.byte() % 5 == 0:
            body.pop(name, None)
        else:
            body[name] = _value(st)
    doc = [body, dict(body)] if target == EVENTS and st.byte() % 3 == 0 else body
    # the stdlib writes what orjson cannot (ints past 64 bits, NaN): the server's parser
    # then decides, as it would for such a body on the wire
    return json.dumps(doc, allow_nan=True).encode()


def _topic_record(topic: str, text: bytes) -> None:
    try:
        rec = from_json(topic, text)
    except DecodeError:
        return
    try:
        again = from_json(topic, to_json(topic, rec))
    except SchemaError as exc:
        raise Violation(f"from_json accepted a {topic} record to_json rejects: {exc}") from exc
    if again != rec:
        raise Violation(f"to_json -> from_json changed the {topic} record")
    try:
        encode(topic, rec)
    except SchemaError as exc:
        raise Violation(f"JSON accepted a {topic} record the Avro codec rejects: {exc}") from exc


def _events_body(text: bytes) -> None:
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        return  # the app answers 400
    try:
        records = parse_engagements(body)
    except BadRequest:
        return
    for rec in records:
        try:
            encode("engagements", rec)
        except SchemaError as exc:
            raise Violation(f"/v1/events accepted an engagement Avro rejects (HTTP 500): "
                            f"{exc}") from exc


def _feed_body(text: bytes) -> None:
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        return
    try:
        parse_feed(body, default_limit=20, max_limit=100)
    except BadRequest:
        return


def test_one_input(data: bytes) -> None:
    if from_json is None:
        load()
    if not data:
        return
    target, text = data[0] % (FEED + 1), data[1:]
    if data[0] // (FEED + 1) % 2:
        text = _structured_body(target, _Steer(text))
    if target < len(JSON_TOPICS):
        _topic_record(JSON_TOPICS[target], text)
    elif target == EVENTS:
        _events_body(text)
    else:
        _feed_body(text)


KNOWN_BUGS: list = []  # open bugs tolerated by the fuzz runs (see fuzz/_harness.py)

if __name__ == "__main__":
    main(load, seeds, test_one_input, known_bugs=KNOWN_BUGS,
         defaults={"-max_len": "4096", "-dict": str(Path(__file__).parent / "dicts" / "json.dict")})
