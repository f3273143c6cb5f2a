"""BlockTable: upsert/retention against a dict reference, and the zero-copy TBT1 codec."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.store import BlockTable, CorruptRecordError, StoreError

FEATURES = ["views@aaaa1111", "clicks@bbbb2222", "dwell@cccc3333", "ünïcode@dddd4444"]
SIZES = [300_000, 3_600_000, 86_400_000]

rows_st = st.lists(
    st.tuples(
        st.sampled_from(FEATURES),
        st.integers(-(2**40), 2**42),
        st.sampled_from(SIZES),
        st.binary(max_size=24),
    ),
    max_size=40,
)


def reference(batches) -> list[tuple[str, int, int, bytes]]:
    """The slow, obviously correct model: a dict keyed by (feature, size, start), last wins."""
    model: dict[tuple[str, int, int], bytes] = {}
    for batch in batches:
        for feature, start, size, rep in batch:
            model[(feature, size, start)] = rep
    return [(f, start, size, rep) for (f, size, start), rep in sorted(model.items())]


@settings(max_examples=150, deadline=None)
@given(st.lists(rows_st, max_size=4))
def test_upsert_matches_reference(batches):
    table = BlockTable.empty()
    for batch in batches:
        table = table.upsert(batch)
    assert table.to_rows() == reference(batches)
    table.check()


@settings(max_examples=150, deadline=None)
@given(rows_st, st.integers(-(2**40), 2**42))
def test_drop_before_matches_reference(rows, ts):
    table = BlockTable.from_rows(rows)
    kept = table.drop_before(ts)
    assert kept.to_rows() == [r for r in reference([rows]) if r[1] + r[2] > ts]
    kept.check()
    # Features left without rows are pruned.
    assert set(kept.features) == {r[0] for r in kept.to_rows()}


@settings(max_examples=150, deadline=None)
@given(rows_st, st.sampled_from([bytes, bytearray, memoryview]))
def test_encode_decode_round_trip_is_zero_copy(rows, wrap):
    table = BlockTable.from_rows(rows)
    raw = table.encode()
    buf = wrap(bytearray(raw)) if wrap is not bytes else raw
    decoded = BlockTable.decode(buf, validate=True)
    assert decoded.equals(table)
    assert decoded.to_rows() == table.to_rows()
    assert decoded.features == table.features
    base = np.frombuffer(buf, np.uint8)
    for arr in (decoded.feature_idx, decoded.starts, decoded.sizes, decoded.offsets):
        # Mapped onto the buffer, not copied, and 8-byte aligned relative to its start.
        assert np.shares_memory(arr, base) or arr.size == 0
        assert (arr.ctypes.data - base.ctypes.data) % 8 == 0
    for feature in FEATURES:
        lo, hi = decoded.slice_for(feature)
        assert [r[0] for r in decoded.to_rows()[lo:hi]] == [feature] * (hi - lo)
        assert sum(1 for r in table.to_rows() if r[0] == feature) == hi - lo


def test_layout_header_fields():
    table = BlockTable.from_rows([("a@1", 0, 5, b"xyz")])
    raw = table.encode()
    assert raw[:4] == b"TBT1"
    assert struct.unpack_from("<II", raw, 4) == (1, 1)
    assert struct.unpack_from("<H", raw, 12) == (3,) and raw[14:17] == b"a@1"
    assert raw.endswith(b"xyz")


def test_every_truncation_is_a_clear_error():
    raw = BlockTable.from_rows([("a@1", 0, 5, b"xyz"), ("b@1", 5, 5, b"q")]).encode()
    for cut in range(len(raw)):
        with pytest.raises(CorruptRecordError, match="truncated|malformed"):
            BlockTable.decode(raw[:cut])


def test_bad_magic_and_version_messages():
    raw = BlockTable.from_rows([("a@1", 0, 5, b"x")]).encode()
    with pytest.raises(CorruptRecordError) as err:
        BlockTable.decode(b"NOPE" + raw[4:])
    assert str(err.value) == "not a BlockTable: magic is b'NOPE', expected b'TBT1'"
    with pytest.raises(CorruptRecordError, match="version 9 is not supported"):
        BlockTable.decode(raw[:4] + struct.pack("<I", 9) + raw[8:])


def test_feature_views_and_rep():
    table = BlockTable.from_rows(
        [("f@1", 600, 300, b"\x02"), ("f@1", 300, 300, b"\x01"), ("g@1", 0, 3600, b"gg")]
    )
    blocks = table.feature_blocks("f@1")
    assert blocks.starts.tolist() == [300, 600]
    assert bytes(blocks.blob[blocks.offsets[0] : blocks.offsets[-1]]) == b"\x01\x02"
    assert table.rep(2) == b"gg" and table.rep(-1) == b"gg"
    assert table.slice_for("missing") == (0, 0)
    assert table.ends.tolist() == [600, 900, 3600]
    with pytest.raises(IndexError):
        table.rep(3)


def test_bad_rows_are_refused():
    with pytest.raises(StoreError, match="block size must be a positive number of ms, got 0"):
        BlockTable.from_rows([("f@1", 0, 0, b"")])
    with pytest.raises(StoreError, match="feature key must be a non-empty str"):
        BlockTable.from_rows([("", 0, 5, b"")])
