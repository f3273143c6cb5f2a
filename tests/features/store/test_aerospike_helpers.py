"""Pure helpers of the Aerospike backend, tested without a server (none exists on CI).

The backend itself runs the shared contract in test_contract.py when
TESSERA_AEROSPIKE_HOSTS names a live server.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.spec import FeatureSpec
from features.store import ActionSequence, BlockTable, StoreError
from features.store.aerospike_store import (
    MAX_BIN_NAME,
    SEQUENCE_BIN,
    blocks_to_drop,
    blocktable_from_map,
    decode_block_key,
    encode_block_key,
    family_bin,
    parse_hosts,
    sequence_from_map,
    sequence_items,
    ttl_for_specs,
    values_bin,
)
from features.store.base import merge_sequence
from features.timeutil import DAY, HOUR, MINUTE

feature_st = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
)
start_st = st.integers(-(2**62), 2**62)
size_st = st.integers(1, 2**40)


@given(st.text(max_size=300))
def test_bin_names_fit_aerospike_limit(name):
    for bin_name in (family_bin(name), values_bin(name), SEQUENCE_BIN):
        assert len(bin_name.encode("utf-8")) <= MAX_BIN_NAME
    assert family_bin(name) == family_bin(name) != values_bin(name)


def test_bin_names_are_stable():
    # Stored data depends on these names: changing the hash orphans every record.
    assert family_bin("views") == "b_81f33187"
    assert family_bin("views") != family_bin("engagements")


@given(feature_st, size_st, start_st)
def test_block_key_round_trip(feature, size, start):
    assert decode_block_key(encode_block_key(feature, size, start)) == (feature, size, start)


@given(st.lists(st.tuples(feature_st, size_st, start_st), min_size=2, max_size=20, unique=True))
def test_block_key_byte_order_is_blocktable_order(keys):
    # A KEY_ORDERED map sorts keys bytewise; that must equal (feature, size, start) order.
    by_bytes = sorted(keys, key=lambda k: encode_block_key(*k))
    assert by_bytes == sorted(keys)


def test_block_key_refuses_nul():
    with pytest.raises(StoreError, match="must not contain NUL"):
        encode_block_key("a\x00b", 1, 0)
    with pytest.raises(StoreError, match="not a block map key"):
        decode_block_key(b"short")


rows_st = st.lists(
    st.tuples(
        st.sampled_from(["a@1", "views@2", "zz@3", "a_b@1", "é@1"]),
        st.integers(-(10**12), 10**12),
        st.sampled_from([300_000, 3_600_000]),
        st.binary(max_size=10),
    ),
    max_size=30,
)


@settings(deadline=None)
@given(rows_st)
def test_map_to_blocktable_matches_from_rows(rows):
    blocks = {}
    for feature, start, size, rep in rows:
        blocks[encode_block_key(feature, size, start)] = rep
    table = blocktable_from_map(blocks)
    assert table.to_rows() == BlockTable.from_rows(rows).to_rows()
    assert isinstance(table, BlockTable)


@settings(deadline=None)
@given(rows_st)
def test_key_ordered_map_to_blocktable_is_the_sorted_table(rows):
    """The server returns a KEY_ORDERED map sorted by key: the fast path builds the table
    without sorting, byte-identical to the sorted one."""
    blocks = {}
    for feature, start, size, rep in rows:
        blocks[encode_block_key(feature, size, start)] = rep
    ordered = dict(sorted(blocks.items()))
    table = blocktable_from_map(ordered)
    want = BlockTable.from_rows(rows)
    assert table.to_rows() == want.to_rows()
    assert table.encode() == want.encode()


@settings(deadline=None)
@given(rows_st, st.integers(-(10**12), 10**12))
def test_blocks_to_drop_matches_blocktable_retention(rows, ts):
    blocks = {encode_block_key(f, size, start): rep for f, start, size, rep in rows}
    drop = set(blocks_to_drop(blocks, ts))
    kept = {k: v for k, v in blocks.items() if k not in drop}
    assert (
        blocktable_from_map(kept).to_rows() == BlockTable.from_rows(rows).drop_before(ts).to_rows()
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["u1", "u2"]),
            st.integers(0, 50),
            st.sampled_from(["e1", "e2", "e3", "e4", "e5"]),
        ),
        max_size=20,
    ),
    st.integers(1, 4),
)
def test_sequence_map_matches_lmdb_merge(events, max_len):
    # What the server does in one operate (CREATE_ONLY put, keep the top max_len ranks),
    # simulated on a dict, must equal merge_sequence used by LMDB.
    rows = [(e, ts, f"i{ev}", "click", ts * 10, ev) for e, ts, ev in events]
    for entity, items in sequence_items(rows).items():
        server: dict[str, list] = {}
        for ev, value in items.items():
            server.setdefault(ev, value)
        top = sorted(server.items(), key=lambda kv: kv[1])[-max_len:]
        got = sequence_from_map(dict(top))
        want = merge_sequence(ActionSequence.empty(), [r for r in rows if r[0] == entity], max_len)
        assert got.to_rows(entity) == want.to_rows(entity)


def test_sequence_from_map_empty_and_head():
    assert len(sequence_from_map(None)) == 0
    seq = sequence_from_map(
        {"a": [1, "i", "a", "click", 0], "b": [2, "j", "b", "like", 5]}, max_len=1
    )
    assert seq.ts.tolist() == [2] and list(seq.event_ids) == ["b"]


def test_parse_hosts():
    assert parse_hosts("10.0.0.1:3000,db2:3100,db3") == [
        ("10.0.0.1", 3000),
        ("db2", 3100),
        ("db3", 3000),
    ]
    with pytest.raises(StoreError, match="bad Aerospike host 'db:x': expected host:port"):
        parse_hosts("db:x")


def test_ttl_for_specs_is_longest_window_plus_slack():
    spec = FeatureSpec(
        name="v", source="views", entity="item_id", aggregation="count", windows=(HOUR, 30 * DAY)
    )
    assert ttl_for_specs([spec], slack_ms=DAY) == (30 * DAY + DAY + DAY) // 1000
    assert ttl_for_specs([spec], slack_ms=10 * MINUTE) > 30 * DAY // 1000


def test_store_error_maps_unreachable_codes_to_unavailable():
    from features.store.aerospike_store import store_error
    from features.store.errors import StoreError, StoreUnavailableError

    for code in (-15, -12, -10, -8, 9, 11):
        assert isinstance(store_error("get_values", code, "x"), StoreUnavailableError)
    whole = store_error("put_blocks", 1, "the batch failed", whole_batch=True)
    assert isinstance(whole, StoreUnavailableError)
    big = store_error("put_blocks", 13, "record too big")
    assert type(big) is StoreError and "max-record-size" in str(big)
    other = store_error("put_blocks", 4, "parameter error")
    assert type(other) is StoreError and "result code 4" in str(other)
