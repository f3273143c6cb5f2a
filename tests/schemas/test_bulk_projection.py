"""Projections (``decode_messages(..., fields=...)``) and map fields on the vectorized pass.

A projection must give the full decode's columns restricted to the fields asked for, and
reject the same messages with the same reasons, but for the documented exception: invalid
UTF-8 in a field left out goes unnoticed. The full decode is itself checked against the
scalar path (``_check``), so both are pinned to ``decode_message``.
"""

from __future__ import annotations

import io
import re
import struct
import time
from collections.abc import Collection, Sequence
from functools import cache
from typing import Any

import numpy as np
import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas.bulk as bulk
from schemas.bulk import MAX_FAST_MAP_ENTRIES, MAX_FAST_STRING, BulkDecoded, decode_messages
from schemas.codec import encode, frame
from schemas.columnar import (
    EventColumns,
    concat_columns,
    decode_message,
    encode_batch,
    records_to_columns,
)
from schemas.registry import SCHEMA_IDS, TOPICS, topic_schema
from tests.schemas.samples import SAMPLES, sample
from tests.schemas.test_bulk import _check, _corrupted, _records, _string, _varint

_UTF8_REASON = re.compile(r"invalid UTF-8 in string field '([^']+)'")
_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _names(topic: str) -> tuple[str, ...]:
    return topic_schema(topic).field_names


def _restrict(cols: EventColumns, fields: Collection[str]) -> EventColumns:
    """``cols`` with only the columns of ``fields``, in schema order."""
    keep = [name for name in _names(cols.topic) if name in fields]
    return EventColumns(cols.topic, cols.n, {name: cols.columns[name] for name in keep})


def _lenient(payload: bytes, topic: str) -> EventColumns:
    """Decode a message whose only fault is invalid UTF-8 (read as replacement characters)."""
    bio = io.BytesIO(payload)
    bio.seek(5)
    record = schemaless_reader(
        bio, topic_schema(topic).parsed, None, handle_unicode_errors="replace"
    )
    assert bio.tell() == len(payload), "the projection accepted a message with trailing bytes"
    return records_to_columns(topic, [record])


def _check_projection(
    payloads: Sequence[Any], topic: str, fields: Collection[str]
) -> BulkDecoded:
    """Assert that decoding only ``fields`` agrees with the full decode (itself checked
    against the scalar path), allowing only the documented exception."""
    full = _check(list(payloads), topic)
    got = decode_messages(payloads, topic, fields=fields)
    skipped = set(_names(topic)) - set(fields)
    parts, source = [], []
    for i, payload in enumerate(payloads):
        if i in got.errors:
            assert got.errors[i] == full.errors.get(i), i
            continue
        if i in full.errors:  # decoded after all: only for bad UTF-8 in a field left out
            bad_field = _UTF8_REASON.search(full.errors[i])
            assert bad_field is not None and bad_field[1] in skipped, full.errors[i]
            cols = _lenient(payload, topic)
        else:
            cols = decode_message(payload, topic)
        parts.append(cols)
        source += [i] * cols.n
    expected = _restrict(concat_columns(parts, topic=topic), fields)
    assert got.columns.equals(expected)
    assert got.source_index.tolist() == source
    return got


def _subsets(topic: str) -> st.SearchStrategy[frozenset[str]]:
    return st.frozensets(st.sampled_from(_names(topic)))


# ---------------------------------------------------------------- records of every topic

_FEATURES = [f"{k}_{w}" for k in ("item_ctr", "author_ctr", "é_affinité") for w in ("1h", "1d")]
# Mostly short, so most maps stay on the vectorized pass; a few one byte too long for it.
_SHORT = st.text(max_size=12) | st.sampled_from(
    ["", "l1", "l2", "\x00", "a\x00", "日本", "𝄞", "k" * MAX_FAST_STRING, "k" * (MAX_FAST_STRING + 1)]
)
_KEYS = st.sampled_from(_FEATURES) | _SHORT


def _sized_map(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Maps of 0 to 60 entries, spread evenly over the sizes."""
    return st.integers(0, 60).flatmap(
        lambda n: st.dictionaries(_KEYS, values, min_size=n, max_size=n)
    )


_MAP_VALUES = {"model_versions": _SHORT, "scores": st.floats(allow_nan=False),
               "features": st.floats(allow_nan=False)}


@st.composite
def _record(draw: st.DrawFn, topic: str) -> dict[str, Any]:
    record = draw(_records(topic))
    if topic == "impressions":
        for name, values in _MAP_VALUES.items():
            if draw(st.booleans()):
                record[name] = draw(_sized_map(values))
    return record


@pytest.mark.parametrize("topic", TOPICS)
@_SETTINGS
@given(data=st.data())
def test_projection_equals_the_full_decode(topic: str, data: st.DataObject) -> None:
    records = data.draw(st.lists(_record(topic), max_size=12))
    payloads = [encode(topic, r) for r in records]
    payloads += data.draw(st.lists(st.sampled_from(payloads), max_size=3)) if payloads else []
    got = _check_projection(payloads, topic, data.draw(_subsets(topic)))
    assert got.errors == {}


@pytest.mark.parametrize("topic", TOPICS)
@_SETTINGS
@given(data=st.data())
def test_projection_of_corrupt_messages(topic: str, data: st.DataObject) -> None:
    originals = [encode(topic, data.draw(_record(topic))) for _ in range(3)]
    payloads = [
        data.draw(_corrupted(p)) if data.draw(st.booleans()) else p for p in originals * 2
    ]
    _check_projection(payloads, topic, data.draw(_subsets(topic)))


def _big_impression(**changes: Any) -> bytes:
    features = {f"feature_{i}_é" if i % 7 == 0 else f"feature_{i}": i / 7 for i in range(40)}
    return encode("impressions", sample("impressions", features=features, **changes))


@pytest.mark.parametrize(
    "payload",
    [*(encode(t, SAMPLES[t]) for t in TOPICS), _big_impression()],
    ids=[*TOPICS, "impressions-40-features"],
)
def test_every_prefix_with_projections(payload: bytes) -> None:
    topic = next(t for t in TOPICS if SCHEMA_IDS[t] == payload[4])
    prefixes = [payload[:n] for n in range(len(payload))]
    names = _names(topic)
    for fields in [(), ("event_ts",), names[-1:], names[:3], names[1::2], names]:
        got = _check_projection([payload, *prefixes, payload], topic, fields)
        assert set(got.errors) == set(range(1, len(payload) + 1))
        _check_projection([payload, *prefixes[::-1]], topic, fields)


# ---------------------------------------------------------------- maps written block by block


@cache
def _field_schema(topic: str, name: str) -> Any:
    info = topic_schema(topic).field(name)
    return parse_schema({"type": "record", "name": f"one_{topic}_{name}", "fields": [info.raw]})


def _field_bytes(topic: str, name: str, value: Any) -> bytes:
    bio = io.BytesIO()
    schemaless_writer(bio, _field_schema(topic, name), {name: value})
    return bio.getvalue()


def _entry(key: str | bytes, value: Any, values: str) -> bytes:
    if values == "string":
        return _string(key) + _string(value)
    return _string(key) + struct.pack("<d", value)


Block = tuple[int, bool, int | None]  # entries, written with a negative count, stated size


def _map_bytes(entries: list[tuple[Any, Any]], values: str, blocks: list[Block]) -> bytes:
    """The map ``entries`` in ``blocks`` (whose entries sum to ``len(entries)``): a block
    with a negative count states its size in bytes, the true one where None."""
    out, at = [], 0
    for count, negative, size in blocks:
        body = b"".join(_entry(k, v, values) for k, v in entries[at : at + count])
        at += count
        header = _varint(-count) + _varint(len(body) if size is None else size) if negative \
            else _varint(count)
        out.append(header + body)
    assert at == len(entries)
    return b"".join(out) + _varint(0)


def _impression(maps: dict[str, bytes], **changes: Any) -> bytes:
    """An impression, framed, with the wire bytes of some map fields given by ``maps``."""
    record = sample("impressions", **changes)
    body = b"".join(
        maps[name] if name in maps else _field_bytes("impressions", name, record[name])
        for name in _names("impressions")
    )
    return frame(SCHEMA_IDS["impressions"], body)


def test_hand_built_impression_matches_the_encoder() -> None:
    blocks: list[Block] = [(2, False, None)]
    maps = {
        "model_versions": _map_bytes([("l1", "v3"), ("l2", "v8")], "string", blocks),
        "scores": _map_bytes([("l1", 0.25), ("l2", 0.75)], "double", blocks),
    }
    assert _impression(maps) == encode("impressions", SAMPLES["impressions"])


@st.composite
def _blocked_map(draw: st.DrawFn, values: str) -> bytes:
    """A map of 0 to 60 entries (keys may repeat), cut into blocks of both signs."""
    value = _SHORT if values == "string" else st.floats(allow_nan=False)
    entries = draw(st.lists(st.tuples(_KEYS, value), max_size=60))
    blocks: list[Block] = []
    left = len(entries)
    while left:
        count = draw(st.integers(1, left))
        size = draw(st.none() | st.integers(-(2**63), 2**63 - 1))
        blocks.append((count, draw(st.booleans()), size))
        left -= count
    return _map_bytes(entries, values, blocks)


@_SETTINGS
@given(data=st.data())
def test_maps_in_blocks_of_both_signs(data: st.DataObject) -> None:
    payloads = []
    for _ in range(data.draw(st.integers(1, 8))):
        maps = {
            name: data.draw(_blocked_map("string" if name == "model_versions" else "double"))
            for name in _MAP_VALUES
            if data.draw(st.booleans())
        }
        payloads.append(_impression(maps, event_id=data.draw(_SHORT)))
    got = _check_projection(payloads, "impressions", data.draw(_subsets("impressions")))
    assert got.errors == {}


def _features(*blocks: bytes) -> bytes:
    return _impression({"features": b"".join(blocks)})


_ONE = _string("a") + struct.pack("<d", 1.5)
_ODD_MAPS = {
    "empty": _features(_varint(0)),
    "one entry per block": _features(*(_varint(1) + _ONE for _ in range(5)), _varint(0)),
    "negative, true size": _features(_varint(-1) + _varint(len(_ONE)) + _ONE, _varint(0)),
    "negative, size 0": _features(_varint(-1) + _varint(0) + _ONE, _varint(0)),
    "negative, negative size": _features(_varint(-1) + _varint(-7) + _ONE, _varint(0)),
    "negative, size 10 bytes": _features(_varint(-1) + _varint(-(2**63)) + _ONE, _varint(0)),
    "negative, size 11 bytes": _features(_varint(-1) + b"\xff" * 10 + b"\x01" + _ONE, _varint(0)),
    "count -2**63": _features(_varint(-(2**63)) + _varint(9) + _ONE, _varint(0)),
    "count 2**62": _features(_varint(2**62) + _ONE, _varint(0)),
    "count 11 bytes": _features(b"\x82" + b"\x80" * 9 + b"\x00" + _ONE, _varint(0)),
    "count past the entries": _features(_varint(3) + _ONE * 2, _varint(0)),
    "count short of the entries": _features(_varint(1) + _ONE * 2, _varint(0)),
    "no end block": _features(_varint(1) + _ONE),
    "negative, size cut off": _features(_varint(-1) + b"\x80"),
    "key past the end": _features(_varint(1) + _varint(50) + b"ab"),
    "negative key length": _features(_varint(1) + _varint(-1) + b"\x00" * 8, _varint(0)),
    "value cut short": _features(_varint(1) + _string("a") + b"\x00" * 4),
    "duplicate keys": _features(_varint(2) + _ONE + _string("a") + struct.pack("<d", 2.5),
                                _varint(0)),
    "bad UTF-8 key": _features(_varint(1) + _string(b"\xff") + struct.pack("<d", 1), _varint(0)),
    "long key": _features(_varint(1) + _string("k" * 300) + struct.pack("<d", 1), _varint(0)),
    "long string value": _impression({"model_versions": _map_bytes(
        [("l1", "v" * 200)], "string", [(1, True, None)])}),
    "bad UTF-8 value": _impression({"model_versions": _map_bytes(
        [("l1", b"\xc0\x80")], "string", [(1, False, None)])}),
    f"{MAX_FAST_MAP_ENTRIES} entries": _features(
        _varint(MAX_FAST_MAP_ENTRIES) + _ONE * MAX_FAST_MAP_ENTRIES, _varint(0)),
    f"{MAX_FAST_MAP_ENTRIES + 1} entries": _features(
        *(_varint(-1) + _varint(0) + _ONE for _ in range(MAX_FAST_MAP_ENTRIES + 1)), _varint(0)),
}
_PROJECTIONS = [(), ("event_ts", "item_id"), ("features",), ("model_versions", "position"),
                _names("impressions")]


@pytest.mark.parametrize("name", list(_ODD_MAPS))
@pytest.mark.parametrize("fields", _PROJECTIONS, ids=str)
def test_odd_maps_are_judged_like_the_scalar_path(name: str, fields: tuple[str, ...]) -> None:
    good = encode("impressions", SAMPLES["impressions"])
    _check_projection([good, _ODD_MAPS[name], good], "impressions", fields)


def test_odd_map_reasons() -> None:
    names = list(_ODD_MAPS)
    full = decode_messages(list(_ODD_MAPS.values()), "impressions")
    reason = {names[i]: text for i, text in full.errors.items()}
    assert set(reason) == {
        "count 2**62", "count past the entries", "count short of the entries", "no end block",
        "negative, size cut off", "key past the end", "negative key length", "value cut short",
        "bad UTF-8 key", "bad UTF-8 value", "count -2**63",
    }
    assert "invalid UTF-8 in string field 'features'" in reason["bad UTF-8 key"]
    # the documented exception: left out, a map's bad UTF-8 goes unnoticed
    skipped = decode_messages(list(_ODD_MAPS.values()), "impressions", fields=("item_id",))
    assert {names[i] for i in skipped.errors} == set(reason) - {"bad UTF-8 key", "bad UTF-8 value"}


# ---------------------------------------------------------------- the API


def test_fields_in_schema_order_once_each() -> None:
    payloads = [encode("views", sample("views", event_id=f"e{i}", position=i)) for i in range(3)]
    got = decode_messages(payloads, "views", fields=["position", "event_id", "position"])
    assert list(got.columns.columns) == ["event_id", "position"]
    assert got.columns.values("position").tolist() == [0, 1, 2]
    assert got.columns.values("event_id").tolist() == ["e0", "e1", "e2"]
    nothing = decode_messages(payloads, "views", fields=())
    assert nothing.columns.n == 3 and nothing.columns.columns == {}
    assert nothing.source_index.tolist() == [0, 1, 2]


def test_unknown_field_names_the_topic_fields() -> None:
    payloads = [encode("views", SAMPLES["views"])]
    with pytest.raises(ValueError) as info:
        decode_messages(payloads, "views", fields=("event_ts", "evnt_id"))
    assert str(info.value) == (
        "topic 'views' has no field 'evnt_id': its fields are event_id, event_ts, user_id, "
        "item_id, author_id, topic, surface, dwell_ms, position, request_id"
    )
    with pytest.raises(TypeError, match=r"got the str 'event_ts'; write fields=\('event_ts',\)"):
        decode_messages(payloads, "views", fields="event_ts")


@pytest.mark.parametrize("topic", TOPICS)
def test_envelopes_with_a_projection(topic: str) -> None:
    def envelope(ids: list[str]) -> bytes:
        return encode_batch(records_to_columns(topic, [sample(topic, event_id=i) for i in ids]))

    payloads = [encode(topic, sample(topic, event_id="a")), envelope(["b", "c"]), b"\x00bad",
                envelope([]), encode(topic, sample(topic, event_id="d"))]
    for fields in [("event_id",), ("event_ts", "event_id"), _names(topic)[-2:]]:
        got = _check_projection(payloads, topic, fields)
        assert got.source_index.tolist() == [0, 1, 1, 4]
    only = _check_projection([envelope(["x", "y"])], topic, ("event_id",))
    assert only.columns.values("event_id").tolist() == ["x", "y"]
    empty = decode_messages([], topic, fields=("event_ts",))
    assert list(empty.columns.columns) == ["event_ts"] and empty.columns.n == 0


# ---------------------------------------------------------------- what stays on the fast path


def _scalar_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every message that goes to the scalar path; forbid the fastavro record path."""
    calls: list[bytes] = []
    one = bulk._decode_one

    def counted(payload: bytes, topic: str) -> Any:
        calls.append(payload)
        return one(payload, topic)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the record path ran")

    monkeypatch.setattr(bulk, "_decode_one", counted)
    monkeypatch.setattr(bulk, "read_body", forbidden)
    return calls


def test_projected_impressions_stay_vectorized(monkeypatch: pytest.MonkeyPatch) -> None:
    payloads = [_big_impression(event_id=f"e{i}", user_id="é" * (i % 33)) for i in range(300)]
    payloads.append(_big_impression(author_id="a" * 500))  # long, but left out
    calls = _scalar_calls(monkeypatch)
    monkeypatch.setattr(bulk, "_map_column", lambda *a: pytest.fail("built a map column"))
    got = decode_messages(payloads, "impressions", fields=("event_ts", "item_id", "user_id"))
    assert calls == [] and got.errors == {} and got.columns.n == 301


def test_full_impressions_stay_vectorized(monkeypatch: pytest.MonkeyPatch) -> None:
    payloads = [_big_impression(event_id=f"e{i}") for i in range(50)]
    calls = _scalar_calls(monkeypatch)
    got = decode_messages(payloads, "impressions")
    assert calls == [] and got.columns.n == 50
    assert got.columns.values("features")[7]["feature_7_é"] == 1.0


def test_a_few_long_maps_go_to_the_scalar_path(monkeypatch: pytest.MonkeyPatch) -> None:
    long_features = {f"f{i}": float(i) for i in range(100)}
    payloads = [encode("impressions", sample("impressions", event_id=f"e{i}",
                                             features=long_features if i in (7, 300) else {}))
                for i in range(600)]
    for fields in [("event_id",), ("features",)]:
        assert _check_projection(payloads, "impressions", fields).columns.n == 600
    calls = _scalar_calls(monkeypatch)
    decode_messages(payloads, "impressions", fields=("event_id",))
    assert calls == [payloads[7], payloads[300]]  # rather than 98 more steps for two maps


def test_long_strings_in_a_kept_map_go_to_the_scalar_path(monkeypatch: pytest.MonkeyPatch) -> None:
    long_key = {"k" * (MAX_FAST_STRING + 1): 1.0}
    payloads = [_big_impression(event_id=f"e{i}", scores=long_key if i == 3 else {})
                for i in range(10)]
    calls = _scalar_calls(monkeypatch)
    decode_messages(payloads, "impressions", fields=("event_id",))
    assert calls == []
    got = decode_messages(payloads, "impressions", fields=("scores",))
    assert calls == [payloads[3]] and got.columns.values("scores")[3] == long_key


@pytest.mark.parametrize("fields", [None, ("event_ts", "scores")])
def test_record_path_for_schemas_the_pass_cannot_read(
    monkeypatch: pytest.MonkeyPatch, fields: tuple[str, ...] | None
) -> None:
    # No topic needs it today; pretend impressions does.
    monkeypatch.setattr(bulk, "_plan", lambda topic: None)
    good = [_big_impression(event_id=f"e{i}") for i in range(4)]
    payloads = [good[0], _ODD_MAPS["no end block"], good[1], *good[2:]]
    if fields is None:
        _check(payloads, "impressions")
    else:
        _check_projection(payloads, "impressions", fields)


# ---------------------------------------------------------------- the reading primitives

_MAPS = parse_schema({
    "type": "record", "name": "Maps", "fields": [
        {"name": "d", "type": {"type": "map", "values": "double"}},
        {"name": "f", "type": {"type": "map", "values": "float"}},
        {"name": "s", "type": {"type": "map", "values": "string"}},
        {"name": "x", "type": "long"},
    ],
})
_MAP_PLAN = (
    bulk._Field("d", "map", None, (), "double"),
    bulk._Field("f", "map", None, (), "float"),
    bulk._Field("s", "map", None, (), "string"),
    bulk._Field("x", "long", None, ()),
)
_SMALL_KEYS = st.text(max_size=8)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries({
            "d": st.dictionaries(_SMALL_KEYS, st.floats(allow_nan=False), max_size=12),
            "f": st.dictionaries(_SMALL_KEYS, st.floats(width=32, allow_nan=False), max_size=12),
            "s": st.dictionaries(_SMALL_KEYS, _SMALL_KEYS, max_size=12),
            "x": st.integers(-(2**63), 2**63 - 1),
        }),
        min_size=1, max_size=20,
    ),
    keep=st.frozensets(st.sampled_from("dfsx")),
)
def test_maps_of_doubles_floats_strings_read_like_fastavro(
    rows: list[dict[str, Any]], keep: frozenset[str]
) -> None:
    bodies = []
    for row in rows:
        bio = io.BytesIO()
        schemaless_writer(bio, _MAPS, row)
        bodies.append(frame(1, bio.getvalue()))
    buf, starts, lengths = bulk._join(bodies)
    cur = bulk._Cursor(
        buf, bulk._words_at(buf), starts + 5, starts + lengths, np.ones(len(bodies), bool)
    )
    raws = bulk._scan(cur, _MAP_PLAN, keep)
    assert cur.ok.all()
    cols, kept_rows = bulk._fast_columns("maps", _MAP_PLAN, cur.words, raws, cur.ok)
    assert kept_rows.tolist() == list(range(len(rows)))
    assert list(cols.columns) == [name for name in "dfsx" if name in keep]
    for name in keep:
        assert cols.values(name).tolist() == [row[name] for row in rows], name


# ---------------------------------------------------------------- timing (printed, not asserted)


def test_print_impressions_decode_rates(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(7)
    names = [f"{k}_{w}" for k in ("item_views", "item_ctr", "author_ctr", "user_affinity",
                                  "item_likes") for w in ("1h", "6h", "1d", "7d", "30d", "90d")]
    payloads = [
        encode("impressions", sample(
            "impressions", event_id=f"imp-{i:012d}", user_id=f"u{rng.integers(5000)}",
            item_id=f"i{rng.integers(10**5)}", event_ts=1_700_000_000_000 + i,
            scores={"l1": float(rng.random()), "l2": float(rng.random())},
            features={n: float(rng.random()) for n in names[: rng.integers(20, 31)]},
        ))
        for i in range(5000)
    ]

    def rate(fields: tuple[str, ...] | None) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            decode_messages(payloads, "impressions", fields=fields)
            best = min(best, time.perf_counter() - start)
        return len(payloads) / best

    full, projected = rate(None), rate(("event_ts", "item_id"))
    with capsys.disabled():
        print(f"\nimpressions, 5,000-message polls, 20-30 features: full {full:,.0f} events/s, "
              f"fields=('event_ts', 'item_id') {projected:,.0f} events/s")

