from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from fastavro import schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import decode, encode, frame
from schemas.columnar import (
    DictColumn,
    EventColumns,
    MapMatrix,
    columns_of,
    columns_to_records,
    concat_columns,
    decode_batch,
    decode_message,
    empty_columns,
    encode_batch,
    records_to_columns,
)
from schemas.errors import DecodeError, EncodeError, SchemaError
from schemas.registry import TOPICS, batch_schema, topic_fields
from tests.schemas.samples import SAMPLES, STRATEGIES, sample


def _variants(topic: str) -> list[dict[str, Any]]:
    """Three records of ``topic`` that differ in ids, times and optional fields."""
    base = SAMPLES[topic]
    out = [dict(base)]
    out.append({**base, "event_id": "x-2", "event_ts": base["event_ts"] + 1})
    third = {
        k: v for k, v in base.items() if k in ("event_id", "event_ts") or k not in _optional(topic)
    }
    out.append({**third, "event_id": "x-3"})
    return out


def _optional(topic: str) -> set[str]:
    from schemas.registry import topic_schema

    return {f.name for f in topic_schema(topic).fields if f.has_default}


def _canonical(topic: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The slow, obviously correct reference: each record through the single-event codec."""
    return [decode(encode(topic, r), topic=topic)[1] for r in records]


def _singles(topic: str, records: list[dict[str, Any]]) -> EventColumns:
    parts = [decode_message(encode(topic, r), topic) for r in records]
    return concat_columns(parts, topic=topic)


@pytest.mark.parametrize("topic", TOPICS)
def test_batch_round_trip_every_topic(topic: str) -> None:
    records = _variants(topic)
    cols = records_to_columns(topic, records)
    got = decode_batch(encode_batch(cols), topic=topic)
    assert got.equals(cols)
    assert list(got.columns) == list(topic_fields(topic))
    assert columns_to_records(got) == _canonical(topic, records)


@pytest.mark.parametrize("topic", TOPICS)
def test_single_and_batch_give_identical_columns(topic: str) -> None:
    records = _variants(topic)
    batched = decode_message(encode_batch(records_to_columns(topic, records)), topic)
    assert batched.equals(_singles(topic, records))


@pytest.mark.parametrize("topic", ["views", "engagements"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_generated_single_vs_batch(topic: str, data: st.DataObject) -> None:
    records = data.draw(st.lists(STRATEGIES[topic], max_size=20))
    batched = decode_message(encode_batch(records_to_columns(topic, records)), topic)
    assert batched.equals(_singles(topic, records))
    assert columns_to_records(batched) == records


def test_column_types() -> None:
    cols = decode_batch(encode_batch(records_to_columns("views", _variants("views"))))
    assert cols.columns["event_ts"].dtype == np.int64
    assert cols.columns["position"].dtype == np.int64
    user = cols.columns["user_id"]
    assert isinstance(user, DictColumn) and user.codes.dtype == np.int32
    assert cols.values("request_id").tolist() == ["req-7", "req-7", None]
    imp = decode_message(encode("impressions", SAMPLES["impressions"]), "impressions")
    assert imp.columns["scores"].dtype == object
    assert imp.values("features")[0] == {"item_view_count_6h": 12.0, "ctr_1d": 0.031}


def test_encode_batch_fills_defaults_and_rejects_unknown_columns() -> None:
    full = records_to_columns("views", _variants("views"))
    partial = EventColumns(
        "views",
        full.n,
        {k: v for k, v in full.columns.items() if k not in ("surface", "request_id")},
    )
    got = decode_batch(encode_batch(partial))
    assert got.values("surface").tolist() == ["explore"] * 3
    assert got.values("request_id").tolist() == [None] * 3
    with pytest.raises(EncodeError, match="field 'event_id'.: missing required column"):
        encode_batch(EventColumns("views", full.n, {"event_ts": full.columns["event_ts"]}))
    bad = EventColumns("views", full.n, {**full.columns, "clicks": np.zeros(3, np.int64)})
    with pytest.raises(EncodeError, match="field 'clicks'.: unknown column"):
        encode_batch(bad)


def test_records_to_columns_errors_name_the_field() -> None:
    with pytest.raises(EncodeError, match=r"field 'event_ts'.: record 1: expected long"):
        records_to_columns("views", [SAMPLES["views"], sample("views", event_ts="late")])
    with pytest.raises(EncodeError, match=r"field 'user_id'.: null \(code -1\) in non-nullable"):
        records_to_columns("views", [sample("views", user_id=None)])
    with pytest.raises(EncodeError, match=r"field 'action'.: unknown enum symbol\(s\) poke"):
        records_to_columns("engagements", [sample("engagements", action="poke")])
    with pytest.raises(EncodeError, match=r"field 'user_id'.: record 0 is missing required field"):
        records_to_columns("views", [{"event_id": "e", "event_ts": 1}])


def test_empty_batch() -> None:
    got = decode_batch(encode_batch(empty_columns("engagements")), topic="engagements")
    assert len(got) == 0 and columns_to_records(got) == []
    assert list(got.columns) == list(topic_fields("engagements"))


def test_take_filter_concat() -> None:
    cols = records_to_columns("views", _variants("views"))
    picked = cols.filter(cols.values("event_ts") > SAMPLES["views"]["event_ts"])
    assert [r["event_id"] for r in columns_to_records(picked)] == ["x-2"]
    assert [r["event_id"] for r in columns_to_records(cols.take([2, 0]))] == ["x-3", "v-1"]
    other = records_to_columns("views", [sample("views", user_id="zz", event_id="z")])
    both = concat_columns([cols, other])
    assert len(both) == 4
    assert both.values("user_id").tolist() == ["u1", "u1", "u1", "zz"]
    with pytest.raises(SchemaError, match="cannot concatenate topic 'items' with topic 'views'"):
        concat_columns([cols, records_to_columns("items", [SAMPLES["items"]])])


def test_dict_column() -> None:
    col = DictColumn.from_values(["a", None, "b", "a"])
    assert col.codes.tolist() == [0, -1, 1, 0]
    assert col.dictionary.tolist() == ["a", "b"]
    assert len(col) == 4
    assert col.values().tolist() == ["a", None, "b", "a"]
    assert col.take([3, 1]).values().tolist() == ["a", None]
    merged = DictColumn.concat([col, DictColumn.from_values(["c", "a", None])])
    assert merged.values().tolist() == ["a", None, "b", "a", "c", "a", None]


# --------------------------------------------------------------------- malformed batches


def _batch_bytes(topic: str, count: int, columns: list[dict[str, Any]]) -> bytes:
    bio = io.BytesIO()
    env = {"topic": topic, "count": count, "columns": columns}
    schemaless_writer(bio, batch_schema().parsed, env)
    return frame(100, bio.getvalue())


def _items_columns(**override: dict[str, Any]) -> list[dict[str, Any]]:
    """Wire columns of a valid 2-event items batch, with some columns replaced."""
    i64 = np.array([1, 2], "<i8").tobytes()
    codes = np.array([0, 0], "<i4").tobytes()
    cols = {
        "event_id": {
            "kind": "dict_str",
            "data": np.array([0, 1], "<i4").tobytes(),
            "dictionary": ["a", "b"],
        },
        "event_ts": {"kind": "i64", "data": i64, "dictionary": []},
        "item_id": {"kind": "dict_str", "data": codes, "dictionary": ["i"]},
        "author_id": {"kind": "dict_str", "data": codes, "dictionary": ["a"]},
        "topic": {"kind": "dict_str", "data": codes, "dictionary": ["t"]},
        "created_ts": {"kind": "i64", "data": i64, "dictionary": []},
    }
    cols.update(override)
    return [{"name": k, **v} for k, v in cols.items() if v]


def test_handmade_batch_fills_default_column() -> None:
    got = decode_batch(_batch_bytes("items", 2, _items_columns()), topic="items")
    assert got.values("op").tolist() == ["created", "created"]


@pytest.mark.parametrize(
    ("columns", "message", "field"),
    [
        (
            _items_columns(event_ts={"kind": "i64", "data": b"\x00" * 24, "dictionary": []}),
            "column length mismatch: 24 bytes hold 3 values of 8 bytes, expected count=2",
            "event_ts",
        ),
        (
            _items_columns(item_id={"kind": "dict_str", "data": b"\x00" * 4, "dictionary": ["i"]}),
            "column length mismatch: 4 bytes hold 1 values of 4 bytes, expected count=2",
            "item_id",
        ),
        (
            _items_columns(
                topic={
                    "kind": "dict_str",
                    "data": np.array([0, 5], "<i4").tobytes(),
                    "dictionary": ["t"],
                }
            ),
            "code out of dictionary range: codes span [0, 5], dictionary has 1",
            "topic",
        ),
        (
            _items_columns(
                topic={
                    "kind": "dict_str",
                    "data": np.array([0, -1], "<i4").tobytes(),
                    "dictionary": ["t"],
                }
            ),
            "null (code -1) in non-nullable string column",
            "topic",
        ),
        (
            _items_columns(
                op={
                    "kind": "dict_str",
                    "data": np.array([0, 0], "<i4").tobytes(),
                    "dictionary": ["moved"],
                }
            ),
            "unknown enum symbol(s) moved; allowed: created, updated, deleted",
            "op",
        ),
        (
            _items_columns(event_ts={"kind": "f64", "data": b"\x00" * 16, "dictionary": []}),
            "column kind f64 does not fit field type long; expected i64",
            "event_ts",
        ),
        (_items_columns(created_ts={}), "required column missing from batch", "created_ts"),
        (
            [*_items_columns(), {"name": "likes", "kind": "i64", "data": b"", "dictionary": []}],
            "unknown column; the fields of 'items' are event_id,",
            "likes",
        ),
        (
            [*_items_columns(), _items_columns()[0]],
            "duplicate column",
            "event_id",
        ),
    ],
)
def test_malformed_batch(columns: list[dict[str, Any]], message: str, field: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_batch(_batch_bytes("items", 2, columns), topic="items")
    assert message in str(info.value)
    assert info.value.field == field


def test_batch_topic_and_schema_checks() -> None:
    data = _batch_bytes("items", 2, _items_columns())
    with pytest.raises(
        DecodeError, match="batch carries topic 'items' but was read from topic 'views'"
    ):
        decode_message(data, "views")
    with pytest.raises(DecodeError, match=r"schema id 1 \(views\) is not a batch: expected 100"):
        decode_batch(encode("views", SAMPLES["views"]))
    with pytest.raises(DecodeError, match=r"schema id 4 \(items\) is not allowed on topic 'views'"):
        decode_message(encode("items", SAMPLES["items"]), "views")
    with pytest.raises(DecodeError, match="trailing bytes"):
        decode_message(data + b"\x00", "items")
    with pytest.raises(DecodeError, match="truncated body") as info:
        decode_message(data[:-3], "items")
    assert info.value.field == "columns"


# ---------------------------------------------------------------- MapMatrix, columns_of


def _impression_dicts(n: int, features: list[dict]) -> list[dict]:
    return [{"impression_id": f"imp-{i}", "event_id": f"imp-{i}", "event_ts": 1_700_000_000_000,
             "request_id": "r-1", "user_id": "u1", "item_id": f"i{i % 3}", "author_id": "a",
             "topic": "t", "position": i, "feed_type": "EXPLORE", "source": "ann",
             "model_versions": {"l1": "v1", "l2": "v2"},
             "scores": {"l1": 0.5 * i, "l2": -1.0 * i}, "features": features[i],
             "feature_watermark": 1_700_000_000_000} for i in range(n)]


@given(n=st.integers(0, 12), k=st.integers(0, 6), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_a_map_matrix_encodes_to_the_bytes_of_the_same_rows_as_dicts(n, k, seed):
    """Row by row, in key order, with a key absent where ``present`` is False (a key no row
    has is not in the dictionary, and codes come in first-seen order)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n, k))
    present = rng.random((n, k)) < 0.6
    keys = tuple(f"f{j}" for j in rng.permutation(k))
    matrix = MapMatrix(keys, values, present)
    dicts = _impression_dicts(n, matrix.to_dicts())
    assert [list(d) == [keys[j] for j in np.flatnonzero(p)]
            for d, p in zip(matrix.to_dicts(), present)] == [True] * n
    expected = encode_batch(records_to_columns("impressions", dicts))
    cols = columns_of("impressions", n, {
        "impression_id": [d["impression_id"] for d in dicts],
        "event_id": [d["event_id"] for d in dicts], "event_ts": 1_700_000_000_000,
        "request_id": "r-1", "user_id": "u1", "item_id": [d["item_id"] for d in dicts],
        "author_id": "a", "topic": "t", "position": np.arange(n), "feed_type": "EXPLORE",
        "source": "ann", "model_versions": {"l1": "v1", "l2": "v2"},
        "scores": MapMatrix(("l1", "l2"), np.column_stack([0.5 * np.arange(n), -1.0 * np.arange(n)]),
                            np.ones((n, 2), bool)),
        "features": matrix, "feature_watermark": 1_700_000_000_000})
    assert encode_batch(cols) == expected
    assert columns_to_records(cols) == dicts


def test_columns_of_names_the_field_it_cannot_take():
    base = {"impression_id": ["a", "b"], "event_id": ["a", "b"], "event_ts": 1, "request_id": "r",
            "user_id": "u", "item_id": ["i", "j"], "position": [0, 1], "feature_watermark": 1}
    assert columns_of("impressions", 2, base).n == 2  # defaults fill the rest
    with pytest.raises(EncodeError) as err:
        columns_of("impressions", 2, {**base, "position": ["x", "y"]})
    assert err.value.field == "position"
    with pytest.raises(EncodeError) as err:
        columns_of("impressions", 2, {k: v for k, v in base.items() if k != "user_id"})
    assert err.value.field == "user_id"
    with pytest.raises(EncodeError) as err:
        columns_of("impressions", 2, {**base, "colour": "red"})
    assert err.value.field == "colour"
    cols = columns_of("impressions", 2, {**base, "model_versions": MapMatrix(
        ("l1",), np.zeros((2, 1)), np.ones((2, 1), bool))})
    with pytest.raises(EncodeError) as err:  # a map of strings is not a matrix of doubles
        encode_batch(cols)
    assert err.value.field == "model_versions"
    with pytest.raises(ValueError, match="keys"):
        MapMatrix(("a", "b"), np.zeros((2, 1)), np.ones((2, 1), bool))
