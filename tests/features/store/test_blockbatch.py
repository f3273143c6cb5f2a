"""The vectorized many-entity merge equals decode + upsert + retention + encode per entity."""

from __future__ import annotations

import numpy as np
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
    # mostly near starts; sometimes one far away: counted in 5-minute steps it still packs
    # with the priority into one sort key (2**40 * M5); unaligned, only the block key
    # packs and a two-key sort runs (2**55 + 1); or nothing packs and the five-key sort
    # runs (2**61 + 3)
    st.integers(0, 23).map(lambda k: k * M5 if k <= 20 else (2**40 * M5, 2**55 + 1,
                                                            2**61 + 3)[k - 21]),
    st.sampled_from([M5, H1]),
    st.binary(min_size=0, max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(old_rows=st.lists(row_st, max_size=40), new_rows=st.lists(row_st, min_size=1, max_size=40),
       keep=st.one_of(st.none(), st.fixed_dictionaries({M5: st.integers(0, 25).map(lambda k: k * M5)})))
def test_merge_records_equals_per_entity_upsert(old_rows, new_rows, keep):
    _check_merge(old_rows, new_rows, keep)


@pytest.mark.parametrize("far", [2**40 * M5, 2**55 + 1, 2**61 + 3])
def test_merge_records_each_sort_path(far):
    """One packed sort, a two-key sort, a five-key sort: the same records, last new row wins."""
    old_rows = [("e1", "a@1", 0, M5, b"o1"), ("e1", "a@1", far, M5, b"o2"),
                ("e2", "b@2", M5, H1, b"o3")]
    new_rows = [("e1", "a@1", 0, M5, b"n1"), ("e2", "b@2", M5, H1, b"n2"),
                ("e1", "a@1", 0, M5, b"n3"), ("e3", "c@3", far, M5, b"n4"),
                ("e2", "a@1", 2 * M5, M5, b"n5")]
    _check_merge(old_rows, new_rows, None)


def _check_merge(old_rows, new_rows, keep):
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
            assert record == table.encode()  # byte for byte what the per-entity path writes


def test_merge_with_more_features_than_a_bit_set_holds():
    """63+ features in one batch: records are cut one by one, byte-identical."""
    rows = [(f"e{i % 5}", f"f{i % 70:02d}@1", (i // 70) * M5, M5, bytes([i % 256]) * (i % 4))
            for i in range(400)]
    batch = BlockBatch.from_rows(rows)
    old = [BlockTable.from_rows([("f00@1", 99 * M5, M5, b"old")]).encode(), None, None, None,
           None]
    got = merge_records(old, batch)
    for e, before, record in zip(batch.entity_ids, old, got):
        table = BlockTable.decode(before) if before is not None else BlockTable.empty()
        table = table.upsert([(f, s, z, r) for (x, f, s, z, r) in rows if x == e])
        assert record == table.encode()


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


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(row_st, min_size=1, max_size=60), size=st.integers(1, 4))
def test_chunks_of_an_id_sorted_batch_slice_the_same_rows(rows, size):
    """A batch in runs of entity order (as a flush writes it) is sliced, not copied; the
    chunks hold the same entities and rows as the general path's."""
    base = BlockBatch.from_rows(sorted(rows, key=lambda r: (r[1], r[0])))
    ids = sorted(base.entity_ids)
    rank = {e: i for i, e in enumerate(ids)}
    by_feature = sorted(rows, key=lambda r: (r[1], rank[r[0]]))
    batch = BlockBatch.from_rows(by_feature)
    sorted_batch = BlockBatch(ids, np.array([rank[r[0]] for r in by_feature], np.int64),
                              batch.feature_keys, batch.feature_idx, batch.starts, batch.sizes,
                              batch.offsets, batch.blob, ids_sorted=True)
    fast = list(sorted_batch.chunks(size))
    slow = list(batch.chunks(size))
    # (a batch that fits one chunk is returned as it is, in its own entity order)
    assert [sorted(c.entity_ids) for c in fast] == [sorted(c.entity_ids) for c in slow]
    for f, s in zip(fast, slow):
        assert sorted(f.to_rows()) == sorted(s.to_rows())


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(row_st, min_size=1, max_size=60), size=st.integers(1, 4),
       shards=st.integers(1, 3))
def test_chunks_by_key_cover_every_shard_in_key_ranges(rows, size, shards):
    """Shards' batches (disjoint entities, id-sorted runs) cut into key ranges across all of
    them: every row once, each chunk's ids in order and above the previous chunk's."""
    from features.store.blockbatch import chunks_by_key

    batches = []
    for k in range(shards):
        mine = [r for r in rows if int(r[0][1:]) % shards == k]
        if not mine:
            continue
        ids = sorted({r[0] for r in mine})
        rank = {e: i for i, e in enumerate(ids)}
        mine.sort(key=lambda r: (r[1], rank[r[0]]))
        plain = BlockBatch.from_rows(mine)
        batches.append(BlockBatch(ids, np.array([rank[r[0]] for r in mine], np.int64),
                                  plain.feature_keys, plain.feature_idx, plain.starts,
                                  plain.sizes, plain.offsets, plain.blob, ids_sorted=True))
    chunks = list(chunks_by_key(batches, size))
    assert sorted(r for c in chunks for r in c.to_rows()) == sorted(rows)
    flat = [e for c in chunks for e in c.entity_ids]
    assert flat == sorted({r[0] for r in rows})
    assert all(len(c.entity_ids) <= size for c in chunks)


def test_chunks_by_key_keeps_two_flushes_of_one_shard_apart():
    """The same entity in two batches (one shard flushed twice in one write): each batch is
    chunked on its own, in order, so the later flush's rows are merged last."""
    from features.store.blockbatch import chunks_by_key

    first = BlockBatch(["e1", "e2"], np.array([0, 1]), ["f@1"], np.array([0, 0]),
                       np.array([0, 0]), np.array([M5, M5]), np.array([0, 1, 2]), b"ab",
                       ids_sorted=True)
    second = BlockBatch(["e2"], np.array([0]), ["f@1"], np.array([0]), np.array([0]),
                        np.array([M5]), np.array([0, 1]), b"c", ids_sorted=True)
    chunks = list(chunks_by_key([first, second], 5))
    assert [c.to_rows() for c in chunks] == [first.to_rows(), second.to_rows()]
