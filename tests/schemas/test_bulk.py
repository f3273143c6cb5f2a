"""The bulk decoder against its reference: ``decode_message`` on each message, concatenated."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas.bulk as bulk
from schemas.bulk import MAX_FAST_STRING, decode_messages
from schemas.codec import encode, frame
from schemas.columnar import (
    DictColumn,
    EventColumns,
    concat_columns,
    decode_message,
    encode_batch,
    records_to_columns,
)
from schemas.errors import SchemaError, UnknownTopicError
from schemas.registry import BATCH_SCHEMA_ID, SCHEMA_IDS, TOPICS, FieldInfo, topic_schema
from tests.schemas.samples import SAMPLES, sample

# ---------------------------------------------------------------- the reference


def _reference(payloads: list[bytes], topic: str) -> tuple[EventColumns, list[int], dict[int, str]]:
    """The slow, obviously correct path: each message through ``decode_message``."""
    parts, source, errors = [], [], {}
    for i, payload in enumerate(payloads):
        try:
            cols = decode_message(payload, topic)
        except (SchemaError, ValueError) as exc:
            errors[i] = str(exc)
            continue
        parts.append(cols)
        source += [i] * cols.n
    return concat_columns(parts, topic=topic), source, errors


def _check(payloads: list[bytes], topic: str) -> bulk.BulkDecoded:
    """Assert that the bulk decoder agrees with the reference on ``payloads``."""
    got = decode_messages(payloads, topic)
    cols, source, errors = _reference(payloads, topic)
    assert got.errors == errors
    assert got.columns.equals(cols)
    assert got.source_index.dtype == np.int64
    assert got.source_index.tolist() == source
    for name, col in got.columns.columns.items():
        if isinstance(col, DictColumn):
            assert col.codes.dtype == np.int32, name
            assert col.dictionary.dtype == object, name
            values = col.dictionary.tolist()
            assert all(isinstance(v, str) for v in values), name
            assert len(set(values)) == len(values), f"{name}: dictionary holds duplicates"
    return got


# ---------------------------------------------------------------- records of every topic

# Values that stress the decoder: empty, NUL (numpy strips trailing NULs), non-ASCII,
# exactly the longest vectorized string and one byte more.
_AWKWARD = ["", "a", "\x00", "a\x00", "\x00a", "é", "日本語", "𝄞", "x" * MAX_FAST_STRING,
            "y" * (MAX_FAST_STRING + 1), "é" * (MAX_FAST_STRING // 2)]
_TEXT = (
    st.sampled_from(["u1", "u2", "cats", *_AWKWARD])
    | st.text(max_size=20)
    | st.text(min_size=MAX_FAST_STRING - 4, max_size=MAX_FAST_STRING + 20)
)
_INT64 = st.sampled_from([-(2**63), 2**63 - 1, 0, -1, 2**55, -(2**56), 2**62]) | st.integers(
    -(2**63), 2**63 - 1
)
_INT32 = st.sampled_from([-(2**31), 2**31 - 1, 0, -1, 63, 64]) | st.integers(
    -(2**31), 2**31 - 1
)
_DOUBLE = st.floats(allow_nan=False)  # NaN != NaN inside a map, in either path


def _value_strategy(info: FieldInfo, max_entries: int = 3) -> st.SearchStrategy[Any]:
    kinds: dict[str, st.SearchStrategy[Any]] = {
        "string": _TEXT,
        "long": _INT64,
        "int": _INT32,
        "double": st.floats(),
        "enum": st.sampled_from(info.symbols or ("",)),
    }
    if info.kind == "map":
        values = _TEXT if info.map_values == "string" else _DOUBLE
        strategy = st.dictionaries(_TEXT, values, max_size=max_entries)
    else:
        strategy = kinds[info.kind]
    return st.none() | strategy if info.nullable else strategy


def _records(topic: str, max_entries: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    """Records of ``topic`` drawn from its schema, maps of up to ``max_entries`` entries;
    fields with a default may be left out."""
    fields = topic_schema(topic).fields
    return st.fixed_dictionaries(
        {f.name: _value_strategy(f, max_entries) for f in fields if not f.has_default},
        optional={f.name: _value_strategy(f, max_entries) for f in fields if f.has_default},
    )


@pytest.mark.parametrize("topic", TOPICS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_records_equal_the_scalar_path(topic: str, data: st.DataObject) -> None:
    records = data.draw(st.lists(_records(topic), max_size=25))
    # Repeat some messages so dictionaries see the same value many times.
    payloads = [encode(topic, r) for r in records]
    payloads += data.draw(st.lists(st.sampled_from(payloads), max_size=5)) if payloads else []
    got = _check(payloads, topic)
    assert got.errors == {}


@pytest.mark.parametrize("topic", TOPICS)
def test_samples_decode_every_field(topic: str) -> None:
    payloads = [encode(topic, sample(topic, event_id=f"e-{i}")) for i in range(3)]
    got = _check(payloads, topic)
    assert got.columns.n == 3 and got.source_index.tolist() == [0, 1, 2]
    assert got.columns.values("event_id").tolist() == ["e-0", "e-1", "e-2"]


def test_column_types_and_null_codes() -> None:
    payloads = [encode("views", SAMPLES["views"]), encode("views", sample("views", request_id=None))]
    cols = decode_messages(payloads, "views").columns
    assert cols.columns["event_ts"].dtype == np.int64
    assert cols.columns["position"].dtype == np.int64
    request = cols.columns["request_id"]
    assert isinstance(request, DictColumn)
    assert request.codes.tolist() == [0, -1]
    assert cols.values("request_id").tolist() == ["req-7", None]


def test_dictionary_holds_each_value_once() -> None:
    users = ["u1", "u2", "u1", "é", "u2", "é", "u1"]
    payloads = [encode("views", sample("views", user_id=u)) for u in users]
    user = decode_messages(payloads, "views").columns.columns["user_id"]
    assert isinstance(user, DictColumn)
    assert sorted(user.dictionary.tolist()) == ["u1", "u2", "é"]
    assert user.values().tolist() == users


def test_empty_poll_and_unknown_topic() -> None:
    got = decode_messages([], "engagements")
    assert got.columns.n == 0 and got.errors == {} and got.source_index.dtype == np.int64
    assert list(got.columns.columns) == list(topic_schema("engagements").field_names)
    with pytest.raises(UnknownTopicError, match="unknown topic 'clicks'"):
        decode_messages([encode("views", SAMPLES["views"])], "clicks")


def test_hash_collisions_settle_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    # With a zero multiplier every string lands in slot 0: each round of the hash table
    # settles one value, and the values left after the last round are sorted instead.
    monkeypatch.setattr(bulk, "_HASH_MUL", np.uint64(0))
    ids = [f"long-id-{i % 13}" for i in range(40)] + ["x", "", "x", "é"]
    payloads = [encode("views", sample("views", event_id=e)) for e in ids]
    got = _check(payloads, "views")
    assert got.columns.values("event_id").tolist() == ids


# ---------------------------------------------------------------- malformed messages


def _varint(n: int) -> bytes:
    """Zigzag varint of any Python int (so it can write what no Avro writer would)."""
    z = 2 * n if n >= 0 else -2 * n - 1
    out = bytearray()
    while z > 0x7F:
        out.append(z & 0x7F | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _string(raw: bytes | str) -> bytes:
    data = raw.encode() if isinstance(raw, str) else raw
    return _varint(len(data)) + data


def _views(**raw: bytes) -> bytes:
    """The sample view, framed, with the wire bytes of some fields replaced by ``raw``."""
    r = SAMPLES["views"]
    fields = {
        name: _string(r[name])
        for name in ("event_id", "user_id", "item_id", "author_id", "topic", "surface")
    }
    fields |= {name: _varint(r[name]) for name in ("event_ts", "dwell_ms", "position")}
    fields["request_id"] = _varint(1) + _string(r["request_id"])
    fields |= raw
    order = topic_schema("views").field_names
    return frame(SCHEMA_IDS["views"], b"".join(fields[name] for name in order))


def test_hand_built_view_matches_the_encoder() -> None:
    assert _views() == encode("views", SAMPLES["views"])


_GOOD = _views()
_MALFORMED = {
    "empty": b"",
    "short header": b"\x00\x00\x00",
    "bad magic": b"\x01" + _GOOD[1:],
    "json": b'{"event_id": "v-1"}',
    "other topic's id": frame(SCHEMA_IDS["items"], _GOOD[5:]),
    "dead-letter id": frame(SCHEMA_IDS["deadletter"], _GOOD[5:]),
    "unknown id": frame(77, _GOOD[5:]),
    "batch id, single body": frame(BATCH_SCHEMA_ID, _GOOD[5:]),
    "header only": _GOOD[:5],
    "trailing byte": _GOOD + b"\x00",
    "trailing bytes": _GOOD + b"junk",
    "int past 32 bits": _views(position=_varint(2**31)),
    "int below 32 bits": _views(position=_varint(-(2**31) - 1)),
    "int as 10-byte varint": _views(position=_varint(-(2**63))),
    "int overlong but in range": _views(position=b"\x88\x80\x80\x00"),
    "long 9 bytes": _views(dwell_ms=_varint(2**56)),
    "long 10 bytes": _views(dwell_ms=_varint(-(2**63))),
    "long 10 bytes, bits past 64": _views(dwell_ms=b"\xff" * 9 + b"\x7f"),
    "long 11 bytes": _views(dwell_ms=b"\x80" * 10 + b"\x00"),
    # read as 10 bytes, the rest would still parse: position 0, request_id "\x00"
    "long 11 bytes, tail parses": _views(
        dwell_ms=b"\x80" * 10 + b"\x00", position=_varint(1), request_id=_varint(1) + _string("")
    ),
    "long endless": _views(dwell_ms=b"\xff" * 40),
    "negative string length": _views(user_id=_varint(-2) + b"u1"),
    "negative length, last field": _views(request_id=_varint(1) + _varint(-1) + b"x"),
    "string past the end": _views(request_id=_varint(1) + _varint(50) + b"abc"),
    "union branch 2": _views(request_id=_varint(2) + _string("x")),
    "union branch -1": _views(request_id=_varint(-1) + _string("x")),
    "union branch -2": _views(request_id=_varint(-2)),
    "null request": _views(request_id=_varint(0)),
    "invalid UTF-8": _views(user_id=_string(b"\xff")),
    "UTF-8 surrogate": _views(item_id=_string(b"\xed\xa0\x80")),
    "UTF-8 overlong": _views(author_id=_string(b"\xc0\x80")),
    "UTF-8 cut short": _views(topic=_string("é".encode()[:1])),
    "valid UTF-8": _views(topic=_string("chats-é")),
    "long string": _views(event_id=_string("e" * 300)),
}


def _engagement(action_index: int) -> bytes:
    good = encode("engagements", SAMPLES["engagements"])
    action = SAMPLES["engagements"]["action"]
    index = topic_schema("engagements").field("action").symbols.index(action)  # type: ignore[union-attr]
    tail = _varint(index) + _varint(SAMPLES["engagements"]["dwell_ms"])
    assert good.endswith(tail)
    return good[: -len(tail)] + _varint(action_index) + tail[len(_varint(index)) :]


@pytest.mark.parametrize("name", list(_MALFORMED))
def test_each_malformed_view_is_judged_like_the_scalar_path(name: str) -> None:
    payloads = [_GOOD, _MALFORMED[name], encode("views", sample("views", event_id="after"))]
    got = _check(payloads, "views")
    assert got.columns.values("event_id").tolist()[-1] == "after"


def test_malformed_reasons_are_the_scalar_wording() -> None:
    payloads = list(_MALFORMED.values())
    got = _check(payloads, "views")
    names = list(_MALFORMED)
    reason = {names[i]: text for i, text in got.errors.items()}
    assert "bad magic byte 0x01" in reason["bad magic"]
    assert "it looks like JSON" in reason["json"]
    assert "is not allowed on topic 'views'" in reason["other topic's id"]
    assert "trailing bytes: 4 bytes" in reason["trailing bytes"]
    assert "outside the 32-bit range" in reason["int past 32 bits"]
    assert "invalid UTF-8 in string field 'user_id'" in reason["invalid UTF-8"]
    assert "union branch index in field 'request_id'" in reason["union branch 2"]
    # fastavro reads these after all; the bulk decoder sends them to it and keeps its verdict
    for accepted in ("union branch -1", "long 11 bytes", "long 11 bytes, tail parses",
                     "int overlong but in range",
                     "long string", "valid UTF-8", "null request"):
        assert accepted not in reason


@pytest.mark.parametrize("index", [-6, -1, 5, 6, 2**40])
def test_enum_index_out_of_range(index: int) -> None:
    payloads = [_engagement(1), _engagement(index), _engagement(4)]
    got = _check(payloads, "engagements")
    assert got.columns.values("action").tolist()[-1] == "hide"


def _long_view() -> bytes:
    return encode("views", sample("views", event_id="é" * 40, dwell_ms=-(2**63), request_id=None))


@pytest.mark.parametrize(
    "payload",
    [_GOOD, _long_view(), *(encode(t, SAMPLES[t]) for t in TOPICS if t != "views")],
    ids=["views", "views-long", *(t for t in TOPICS if t != "views")],
)
def test_every_prefix_is_judged_like_the_scalar_path(payload: bytes) -> None:
    topic = next(t for t in TOPICS if SCHEMA_IDS[t] == payload[4])
    prefixes = [payload[:n] for n in range(len(payload))]
    got = _check([payload, *prefixes, payload], topic)
    assert set(got.errors) == set(range(1, len(payload) + 1))
    # a cut message last in the poll: reads run into the end of the joined buffer
    _check([payload, *prefixes], topic)
    _check([payload, *prefixes[::-1]], topic)


@st.composite
def _corrupted(draw: st.DrawFn, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw(st.integers(0, 255) | st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0xC0, 0xED]))
        if action == "insert":
            data.insert(where, byte)
        elif where < len(data):
            if action == "set":
                data[where] = byte
            else:
                del data[where]
    return bytes(data)


@pytest.mark.parametrize("topic", TOPICS)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruption_is_judged_like_the_scalar_path(topic: str, data: st.DataObject) -> None:
    originals = [encode(topic, data.draw(_records(topic))) for _ in range(3)]
    payloads = [
        data.draw(_corrupted(p)) if data.draw(st.booleans()) else p for p in originals * 2
    ]
    _check(payloads, topic)


def test_a_large_poll_with_duplicates_and_damage() -> None:
    rng = np.random.default_rng(5)
    payloads = []
    for i in range(3000):
        record = sample(
            "views",
            event_id=f"ev-{rng.integers(10**12):012d}" if i % 7 else "dup",
            user_id=f"u{rng.integers(300)}",
            item_id="é" * int(rng.integers(0, 5)) + str(rng.integers(100)),
            dwell_ms=int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64)),
            request_id=None if i % 3 == 0 else f"r{i}",
        )
        payload = bytearray(encode("views", record))
        if i % 97 == 0:
            payload[int(rng.integers(len(payload)))] = int(rng.integers(256))
        payloads.append(bytes(payload))
    got = _check(payloads, "views")
    assert got.columns.n > 2900


# ---------------------------------------------------------------- envelopes and order


def _envelope(topic: str, ids: list[str]) -> bytes:
    records = [sample(topic, event_id=i) for i in ids]
    return encode_batch(records_to_columns(topic, records))


@pytest.mark.parametrize("topic", TOPICS)
def test_envelopes_and_single_events_keep_their_order(topic: str) -> None:
    payloads = [
        encode(topic, sample(topic, event_id="a")),
        _envelope(topic, ["b", "c", "d"]),
        b"\x00garbage",
        encode(topic, sample(topic, event_id="e")),
        _envelope(topic, []),
        _envelope(topic, ["f"]),
        encode(topic, sample(topic, event_id="g")),
    ]
    got = _check(payloads, topic)
    assert got.columns.values("event_id").tolist() == list("abcdefg")
    assert got.source_index.tolist() == [0, 1, 1, 1, 3, 5, 6]
    assert list(got.errors) == [2]


def test_only_envelopes() -> None:
    payloads = [_envelope("views", [f"{k}-{i}" for i in range(50)]) for k in range(4)]
    got = _check(payloads, "views")
    assert got.columns.n == 200
    assert got.source_index.tolist() == [k for k in range(4) for _ in range(50)]


def test_tombstones_and_other_values_are_judged_like_the_scalar_path() -> None:
    good = encode("views", SAMPLES["views"])
    payloads: list[Any] = [good, None, bytearray(good), memoryview(good), good]
    got = _check(payloads, "views")
    assert list(got.errors) == [1]
    assert "empty message" in got.errors[1]
    # where the scalar path raises something else, the poll still decodes
    odd = decode_messages([good, "text", good], "views")  # type: ignore[list-item]
    assert odd.source_index.tolist() == [0, 2]
    assert odd.errors[1].startswith("TypeError: a bytes-like object is required")


def test_envelope_of_another_topic_is_an_error() -> None:
    payloads = [_envelope("items", ["x"]), encode("views", SAMPLES["views"])]
    got = _check(payloads, "views")
    assert "batch carries topic 'items'" in got.errors[0]


# ---------------------------------------------------------------- the reading primitives


def test_nullable_field_with_null_as_second_branch() -> None:
    info = FieldInfo(
        name="x", kind="string", nullable=True, has_default=False, default=None,
        raw={"name": "x", "type": ["string", "null"]},
    )
    plan = bulk._field_plan(info)
    assert plan is not None and plan.null_branch == 1


_PRIMITIVES = parse_schema({
    "type": "record", "name": "Primitives", "fields": [
        {"name": "a", "type": "long"},
        {"name": "b", "type": "double"},
        {"name": "c", "type": "float"},
        {"name": "d", "type": "int"},
    ],
})
_PRIMITIVE_PLAN = (
    bulk._Field("a", "long", None, ()),
    bulk._Field("b", "double", None, ()),
    bulk._Field("c", "float", None, ()),
    bulk._Field("d", "int", None, ()),
)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.tuples(_INT64, st.floats(), st.floats(width=32), _INT32), min_size=1, max_size=30
    )
)
def test_longs_doubles_floats_ints_read_like_fastavro(rows: list[tuple[Any, ...]]) -> None:
    bodies = []
    for a, b, c, d in rows:
        bio = io.BytesIO()
        schemaless_writer(bio, _PRIMITIVES, {"a": a, "b": b, "c": c, "d": d})
        bodies.append(frame(1, bio.getvalue()))
    buf, starts, lengths = bulk._join(bodies)
    cur = bulk._Cursor(
        buf, bulk._words_at(buf), starts + 5, starts + lengths, np.ones(len(bodies), bool)
    )
    raws = bulk._scan(cur, _PRIMITIVE_PLAN)
    assert cur.ok.all()
    assert raws[0].values.tolist() == [r[0] for r in rows]
    np.testing.assert_array_equal(raws[1].values, np.array([r[1] for r in rows]))
    np.testing.assert_array_equal(raws[2].values, np.array([r[2] for r in rows]))
    assert raws[3].values.tolist() == [r[3] for r in rows]
