"""The vectorized many-entity merge equals decode + upsert + retention + encode per entity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.store.blockbatch import BlockBatch, merge_records
from features.store.blocktable import BlockTable
from features.store.errors import CorruptRecordError

M5, H1 = 300_000, 3_600_000
row_st = st.tuples(
    st.sampled_from(["e1", "e2", "e3"]),
    st.sampled_from(["a@1", "b@2", "c@3"]),
    # mostly near starts; sometimes one far away, so the packed sort key would overflow
    # and the five-key sort runs instead
    st.one_of(st.integers(0, 20).map(lambda k: k * M5), st.just(2**40 * M5)),
    st.sampled_from([M5, H1]),
    st.binary(min_size=0, max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(old_rows=st.lists(row_st, max_size=40), new_rows=st.lists(row_st, min_size=1, max_size=40),
       keep=st.one_of(st.none(), st.fixed_dictionaries({M5: st.integers(0, 25).map(lambda k: k * M5)})))
def test_merge_records_equals_per_entity_upsert(old_rows, new_rows, keep):
    batch = BlockBatch.from_rows(new_rows)
    old = []
    for e in batch.entity_ids:
        rows = [(f, s, z, r) for (x, f, s, z, r) in old_rows if x == e]
        old.append(BlockTable.from_rows(rows).encode() if rows else None)
    got = merge_records(old, batch, keep)
    for e, before, record in zip(batch.entity_ids, old, got):
        table = BlockTable.decode(before) if before is not None else BlockTable.empty()
        table = table.upsert([(f, s, z, r) for (x, f, s, z, r) in new_rows if x == e])
        if keep:
            table = table.drop_expired(keep, batch.feature_keys)
        if len(table) == 0:
            assert record is None
        else:
            assert record is not None
            decoded = BlockTable.decode(record, validate=True)
            assert decoded.to_rows() == table.to_rows()


def test_concat_remaps_entities_and_features():
    a = BlockBatch.from_rows([("e1", "f@1", 0, M5, b"x"), ("e2", "g@1", 0, M5, b"yy")])
    b = BlockBatch.from_rows([("e2", "f@1", M5, M5, b"z")])
    both = BlockBatch.concat([a, b])
    assert sorted(both.to_rows()) == sorted(a.to_rows() + b.to_rows())


@pytest.mark.parametrize("damage", ["truncated", "magic", "offsets"])
def test_merge_names_a_corrupt_old_record(damage):
    good = BlockTable.from_rows([("f@1", 0, M5, b"abc"), ("f@1", M5, M5, b"de")]).encode()
    bad = {"truncated": good[:-3], "magic": b"XXXX" + good[4:],
           "offsets": good[:-10] + b"\xff\xff\xff\x7f" + good[-6:]}[damage]
    batch = BlockBatch.from_rows([("e1", "f@1", 0, M5, b"x"), ("e2", "f@1", 0, M5, b"y")])
    with pytest.raises(CorruptRecordError):
        merge_records([good, bad], batch)


def test_chunks_are_in_entity_id_order_and_keep_every_row():
    rows = [(f"e{i % 7}", "f@1", (i // 7) * M5, M5, bytes([i])) for i in range(40)]
    batch = BlockBatch.from_rows(rows)
    chunks = list(batch.chunks(3))
    assert [c.entity_ids for c in chunks] == [["e0", "e1", "e2"], ["e3", "e4", "e5"], ["e6"]]
    assert sorted(r for c in chunks for r in c.to_rows()) == sorted(rows)
