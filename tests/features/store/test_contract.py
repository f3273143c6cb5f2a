"""The OnlineStore contract, run against every backend.

LMDB always runs (a real environment in tmp_path). Aerospike runs against a live server
when ``TESSERA_AEROSPIKE_HOSTS`` is set (namespace ``TESSERA_AEROSPIKE_NAMESPACE``, default
``test``); no server exists on the CI machine, so it is skipped there, never mocked.
Each test uses its own entity types and names so runs against a shared server do not
interfere.
"""

from __future__ import annotations

import multiprocessing
import os
import struct
import time
import uuid

import numpy as np
import pytest

from features.store import (
    NO_WATERMARK,
    BlockTable,
    OnlineStore,
    ReadOnlyStoreError,
    StoreError,
    StoreUnavailableError,
    open_store,
)

AEROSPIKE_SKIP = (
    "no Aerospike server on this machine; set TESSERA_AEROSPIKE_HOSTS=host:3000 to run the "
    "contract against a live server"
)
M5 = 300_000
H1 = 3_600_000


@pytest.fixture(params=["lmdb", "aerospike"])
def store(request, tmp_path) -> OnlineStore:
    if request.param == "lmdb":
        s = open_store(f"lmdb://{tmp_path}/store")
    else:
        hosts = os.environ.get("TESSERA_AEROSPIKE_HOSTS")
        if not hosts:
            pytest.skip(AEROSPIKE_SKIP)
        namespace = os.environ.get("TESSERA_AEROSPIKE_NAMESPACE", "test")
        s = open_store(f"aerospike://{hosts}/{namespace}")
    with s:
        yield s


@pytest.fixture
def et() -> str:
    """A fresh entity type per test."""
    return f"t{uuid.uuid4().hex[:10]}"


def rows_of(table: BlockTable | None) -> list[tuple[str, int, int, bytes]]:
    return [] if table is None else table.to_rows()


# ---------------------------------------------------------------------- blocks


def test_upsert_overwrites_not_adds(store, et):
    store.put_blocks(et, "views", [("u1", "views@v1", 0, M5, b"\x01")])
    store.put_blocks(et, "views", [("u1", "views@v1", 0, M5, b"\x02\x02")])
    store.put_blocks(et, "views", [("u1", "views@v1", M5, M5, b"\x03")])
    [table] = store.get_block_tables(et, "views", ["u1"])
    #   views@v1, 5m:  [0, 5m) = 02 02 (overwritten, not combined)   [5m, 10m) = 03
    assert rows_of(table) == [("views@v1", 0, M5, b"\x02\x02"), ("views@v1", M5, M5, b"\x03")]


def test_many_entities_one_call_and_read_order(store, et):
    rng = np.random.default_rng(7)
    expected: dict[str, dict[tuple[str, int, int], bytes]] = {}
    rows = []
    for i in range(300):
        eid = f"user-{i}"
        for _ in range(rng.integers(1, 8)):
            feature = ["views@v1", "clicks@v1", "dwell@v1"][rng.integers(0, 3)]
            size = [M5, H1][rng.integers(0, 2)]
            start = int(rng.integers(0, 50)) * size
            rep = rng.bytes(int(rng.integers(0, 16)))
            rows.append((eid, feature, start, size, rep))
            expected.setdefault(eid, {})[(feature, size, start)] = rep
    store.put_blocks(et, "views", rows)

    ids = ["user-299", "nobody", "user-0", "user-150", "also-nobody", "user-0"]
    tables = store.get_block_tables(et, "views", ids)
    assert len(tables) == len(ids)
    for eid, table in zip(ids, tables):
        if eid not in expected:
            assert table is None
            continue
        model = [(f, st, sz, rep) for (f, sz, st), rep in sorted(expected[eid].items())]
        assert rows_of(table) == model


def test_families_are_separate_records(store, et):
    store.put_blocks(et, "views", [("u1", "views@v1", 0, M5, b"v")])
    store.put_blocks(et, "engagements", [("u1", "likes@v1", 0, M5, b"l")])
    assert rows_of(store.get_block_tables(et, "views", ["u1"])[0]) == [("views@v1", 0, M5, b"v")]
    assert rows_of(store.get_block_tables(et, "engagements", ["u1"])[0]) == [
        ("likes@v1", 0, M5, b"l")
    ]
    assert store.get_block_tables(et, "impressions", ["u1"]) == [None]


def test_retention_drops_blocks_that_ended(store, et):
    store.put_blocks(
        et,
        "views",
        [
            ("u1", "views@v1", 0, M5, b"a"),  # ends at 5m  -> dropped at ts=5m
            ("u1", "views@v1", M5, M5, b"b"),  # ends at 10m -> kept
            ("u1", "views@v1", 0, H1, b"c"),  # ends at 1h  -> kept
            ("u2", "views@v1", 0, M5, b"d"),  # u2 becomes empty
        ],
    )
    #  ts = 5m:  [0,5m) a ✗   [5m,10m) b ✓   [0,1h) c ✓   u2 [0,5m) d ✗
    assert store.delete_blocks_before(et, "views", M5) == 2
    u1, u2 = store.get_block_tables(et, "views", ["u1", "u2"])
    assert rows_of(u1) == [("views@v1", M5, M5, b"b"), ("views@v1", 0, H1, b"c")]
    assert u2 is None
    assert store.delete_blocks_before(et, "views", M5) == 0


def test_upsert_applies_per_size_retention(store, et):
    """
    keep_after = {5m: 10m, 1h: 0}: 5m blocks ending <= 10m go, 1h blocks ending <= 0 go.
      5m [0,5m) a ✗   [5m,10m) b ✗   [10m,15m) c ✓      1h [0,1h) d ✓
    """
    store.put_blocks(et, "views", [("u1", "views@v1", 0, M5, b"a"), ("u1", "views@v1", M5, M5, b"b")])
    store.put_blocks(
        et, "views",
        [("u1", "views@v1", 2 * M5, M5, b"c"), ("u1", "views@v1", 0, H1, b"d")],
        keep_after={M5: 2 * M5, H1: 0},
    )
    (u1,) = store.get_block_tables(et, "views", ["u1"])
    assert rows_of(u1) == [("views@v1", 2 * M5, M5, b"c"), ("views@v1", 0, H1, b"d")]


def test_a_sweep_drops_what_a_write_s_retention_would_and_nothing_else(store, et):
    """``drop_expired`` (stores that sweep instead of trimming on write) applies the same
    per-size rule to every record of the family, for the features named only."""
    if not store.sweeps_expired:
        pytest.skip(f"{type(store).__name__} drops expired blocks on write")
    store.put_blocks(et, "views", [("u1", "views@v1", 0, M5, b"a"),
                                   ("u1", "views@v1", M5, M5, b"b"),
                                   ("u1", "views@v1", 2 * M5, M5, b"c"),
                                   ("u1", "views@v1", 0, H1, b"d"),
                                   ("u1", "other@v1", 0, M5, b"e"),
                                   ("u2", "views@v1", 0, M5, b"f")])
    store.put_blocks(et, "clicks", [("u3", "views@v1", 0, M5, b"g")])  # another family
    store.drop_expired(et, "views", ["views@v1"], {M5: 2 * M5, H1: 0})
    u1, u2 = store.get_block_tables(et, "views", ["u1", "u2"])
    assert rows_of(u1) == [("other@v1", 0, M5, b"e"), ("views@v1", 2 * M5, M5, b"c"),
                           ("views@v1", 0, H1, b"d")]
    assert rows_of(u2) == []
    (u3,) = store.get_block_tables(et, "clicks", ["u3"])
    assert rows_of(u3) == [("views@v1", 0, M5, b"g")]


# ---------------------------------------------------------------------- sequences


def seq_rows(entity: str, events: list[tuple[int, str]]):
    return [
        (entity, ts, f"item-{eid}", "click" if ts % 2 else "like", ts // 10, eid)
        for ts, eid in events
    ]


def test_sequence_keeps_newest_most_recent_first(store, et):
    store.append_sequence(et, seq_rows("u1", [(100, "e1"), (300, "e3"), (200, "e2")]), max_len=3)
    store.append_sequence(et, seq_rows("u1", [(400, "e4"), (50, "e0")]), max_len=3)
    [seq] = store.get_sequences(et, ["u1"])
    assert seq.ts.tolist() == [400, 300, 200]
    assert list(seq.event_ids) == ["e4", "e3", "e2"]
    assert list(seq.item_ids) == ["item-e4", "item-e3", "item-e2"]
    assert list(seq.actions) == ["like", "like", "like"]
    assert seq.dwell_ms.tolist() == [40, 30, 20]
    assert seq.ts.dtype == np.int64 and seq.dwell_ms.dtype == np.int64
    assert store.get_sequences(et, ["u1"], max_len=2)[0].ts.tolist() == [400, 300]


def test_sequence_append_is_idempotent_on_event_id(store, et):
    batch = seq_rows("u1", [(100, "e1"), (200, "e2")]) + seq_rows("u2", [(5, "x")])
    store.append_sequence(et, batch, max_len=10)
    before = [s.to_rows(e) for s, e in zip(store.get_sequences(et, ["u1", "u2"]), ["u1", "u2"])]
    store.append_sequence(et, batch, max_len=10)  # crash replay
    store.append_sequence(et, [("u1", 100, "other-item", "hide", 0, "e1")], max_len=10)
    after = [s.to_rows(e) for s, e in zip(store.get_sequences(et, ["u1", "u2"]), ["u1", "u2"])]
    assert after == before
    assert [len(s) for s in store.get_sequences(et, ["u1", "u2", "none"])] == [2, 1, 0]


def test_sequence_replay_of_trimmed_event_stays_trimmed(store, et):
    store.append_sequence(et, seq_rows("u1", [(1, "a"), (2, "b"), (3, "c")]), max_len=2)
    store.append_sequence(et, seq_rows("u1", [(1, "a")]), max_len=2)
    assert list(store.get_sequences(et, ["u1"])[0].event_ids) == ["c", "b"]


# ---------------------------------------------------------------------- values


def test_values_round_trip_with_nan_for_missing(store, et):
    cols = ["ctr_1d", "views_1h", "likes_7d"]
    store.put_values(
        et,
        "item_hot",
        [
            ("i1", np.array([0.5, 10, 3], np.float32), 1000),
            ("i2", np.array([0.1, 2, np.nan]), 2000),
        ],
        cols,
    )
    matrix, wms, columns = store.get_values(et, "item_hot", ["i2", "missing", "i1"])
    assert columns == tuple(cols)
    assert matrix.dtype == np.float32 and matrix.shape == (3, 3)
    np.testing.assert_array_equal(matrix[0], np.array([0.1, 2, np.nan], np.float32))
    assert np.isnan(matrix[1]).all()
    np.testing.assert_array_equal(matrix[2], [0.5, 10, 3])
    assert wms.tolist() == [2000, NO_WATERMARK, 1000]

    # A refresh with a new column list: old rows are read by column name.
    store.put_values(
        et, "item_hot", [("i1", np.array([7.0, 0.7], np.float32), 3000)], ["new", "ctr_1d"]
    )
    matrix, wms, columns = store.get_values(et, "item_hot", ["i1", "i2"])
    assert columns == ("new", "ctr_1d")
    np.testing.assert_array_equal(matrix, np.array([[7.0, 0.7], [np.nan, 0.1]], np.float32))
    assert wms.tolist() == [3000, 2000]


def test_values_errors_and_unknown_table(store, et):
    with pytest.raises(StoreError, match="a value row has 2 entries but 3 columns were given"):
        store.put_values(et, "t", [("i1", np.zeros(2, np.float32), 0)], ["a", "b", "c"])
    result = store.get_values(et, "never_written", ["i1"])
    assert result.columns == () and result.matrix.shape == (1, 0)
    assert result.watermarks.tolist() == [NO_WATERMARK]


@pytest.mark.parametrize("lazy", [False, True], ids=["list", "generator"])
def test_grouped_batch_writes_then_watermarks(store, et, monkeypatch, lazy):
    from features.store.base import BlockBatchWrite
    from features.store.blockbatch import BlockBatch

    if hasattr(type(store), "TXN_ENTITIES"):
        monkeypatch.setattr(type(store), "TXN_ENTITIES", 3)  # several transactions
    first = BlockBatch.from_rows([(f"u{i}", "views@v1", 0, M5, bytes([i])) for i in range(5)])
    later = BlockBatch.from_rows([("u1", "views@v1", 0, M5, b"\xff"),
                                  ("u9", "clicks@v1", M5, M5, b"\x09")])
    writes = [BlockBatchWrite(et, "views", first),
              BlockBatchWrite(et, "views", BlockBatch.from_rows([])),
              BlockBatchWrite(et, "views", later)]
    # the blocks sink hands over a generator: each chunk is made as it is written
    store.put_block_batches((w for w in writes) if lazy else writes, {f"{et}/wm": 42})
    tables = store.get_block_tables(et, "views", ["u0", "u1", "u4", "u9"])
    assert [rows_of(t) for t in tables] == [
        [("views@v1", 0, M5, b"\x00")],
        [("views@v1", 0, M5, b"\xff")],  # the later write of the same block wins
        [("views@v1", 0, M5, b"\x04")],
        [("clicks@v1", M5, M5, b"\x09")],
    ]
    assert store.get_watermarks(prefix=f"{et}/") == {f"{et}/wm": 42}
    # watermarks alone, never backwards
    store.put_block_batches(iter([]) if lazy else [], {f"{et}/wm": 7})
    assert store.get_watermarks(prefix=f"{et}/") == {f"{et}/wm": 42}
    store.put_block_batches(iter([]) if lazy else [], {f"{et}/wm": 50})
    assert store.get_watermarks(prefix=f"{et}/") == {f"{et}/wm": 50}


# ---------------------------------------------------------------------- watermarks, meta


def test_watermarks_never_go_back(store, et):
    a, b = f"{et}/views/p0", f"{et}/views/p1"
    assert store.set_watermark(a, 1000) == 1000
    assert store.set_watermark(a, 500) == 1000  # older: ignored
    assert store.set_watermark(a, 1500) == 1500
    store.set_watermarks({b: 10, a: 1200})
    store.set_watermark("other/x", 1)
    assert store.get_watermarks(prefix=f"{et}/") == {a: 1500, b: 10}


def test_meta_round_trip(store, et):
    assert store.get_meta(f"{et}/spec") is None
    store.put_meta(f"{et}/spec", b"\x00hash")
    store.put_meta(f"{et}/spec", b"hash2")
    assert store.get_meta(f"{et}/spec") == b"hash2"


# ---------------------------------------------------------------------- LMDB specifics


def test_readonly_store_rejects_writes(tmp_path):
    url = f"lmdb://{tmp_path}/s"
    with open_store(url) as writer:
        writer.put_blocks("item", "views", [("i1", "views@v1", 0, M5, b"x")])
        with open_store(url, readonly=True) as reader:
            assert rows_of(reader.get_block_tables("item", "views", ["i1"])[0]) == [
                ("views@v1", 0, M5, b"x")
            ]
            with pytest.raises(ReadOnlyStoreError) as err:
                reader.put_blocks("item", "views", [("i1", "views@v1", 0, M5, b"y")])
            assert str(err.value) == (
                "put_blocks: this store was opened with readonly=True; open it with "
                "open_store(url) (readonly=False) in the one writer process"
            )


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError) as err:
        open_store("redis://localhost/0")
    assert str(err.value) == (
        "store URL 'redis://localhost/0': unsupported scheme 'redis'; supported schemes: lmdb, "
        "aerospike; use lmdb:///absolute/path, lmdb://relative/path or "
        "aerospike://host:3000[,host2:3000]/namespace"
    )
    with pytest.raises(StoreUnavailableError, match="open it once without readonly=True"):
        open_store(f"lmdb://{tmp_path}/absent", readonly=True)
    with pytest.raises(StoreError, match="unknown option 'mapsize'; allowed: map_size, sync"):
        open_store(f"lmdb://{tmp_path}/s?mapsize=1")


def test_relative_lmdb_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_store("lmdb://rel/store?sync=0") as s:
        s.put_meta("k", b"v")
    assert (tmp_path / "rel" / "store" / "data.mdb").exists()


N_ROUNDS = 40


def _reader_process(url: str, started, out) -> None:
    """Child: read the counter block until it reaches the last round; report what it saw."""
    seen = []
    with open_store(url, readonly=True) as store:
        started.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            table = store.get_block_tables("item", "views", ["i1"])[0]
            reps = {r[1]: struct.unpack("<q", r[3])[0] for r in table.to_rows()}
            # Both blocks are written in one transaction: a reader never sees them differ.
            seen.append((reps[0], reps[M5]))
            if reps[0] == N_ROUNDS - 1:
                break
            time.sleep(0.002)
    out.put(seen)


def test_second_process_reads_while_writer_writes(tmp_path):
    url = f"lmdb://{tmp_path}/mp"
    ctx = multiprocessing.get_context("spawn")
    with open_store(url) as writer:

        def write(i: int) -> None:
            rep = struct.pack("<q", i)
            writer.put_blocks(
                "item", "views", [("i1", "views@v1", 0, M5, rep), ("i1", "views@v1", M5, M5, rep)]
            )

        write(0)
        started, out = ctx.Event(), ctx.Queue()
        child = ctx.Process(target=_reader_process, args=(url, started, out))
        child.start()
        try:
            assert started.wait(30), "reader process did not start"
            for i in range(1, N_ROUNDS):
                write(i)
                time.sleep(0.005)
            seen = out.get(timeout=30)
        finally:
            child.join(30)
            if child.is_alive():
                child.kill()
    assert child.exitcode == 0
    assert all(a == b for a, b in seen), "a reader saw a half-applied write"
    values = [a for a, _ in seen]
    assert values == sorted(values), "a reader saw the store go back in time"
    assert values[-1] == N_ROUNDS - 1


def test_sequence_ties_order_like_last_n_blocks(store, et):
    """Equal times: larger item id first, as a last_n block orders equal times by value; the
    trim keeps the newest by that order in every backend."""
    rows = [("u1", 100, item, "view", 0, ev) for item, ev in
            [("i1", "e9"), ("i3", "e1"), ("i2", "e5")]] + [("u1", 50, "i9", "view", 0, "e0")]
    store.append_sequence(et, rows, max_len=2)
    [seq] = store.get_sequences(et, ["u1"])
    assert seq.item_ids.tolist() == ["i3", "i2"]


def test_lmdb_write_of_many_transactions_syncs_once(tmp_path, monkeypatch):
    """With ``sync`` each public write is on disk when it returns: a write split into
    several transactions flushes once, at its end; a one-transaction write once too."""
    from features.store.base import BlockBatchWrite
    from features.store.blockbatch import BlockBatch
    from features.store.lmdb_store import LmdbStore

    monkeypatch.setattr(LmdbStore, "TXN_ENTITIES", 2)
    flushes = []
    monkeypatch.setattr(LmdbStore, "_flush_to_disk", lambda self: flushes.append(self))
    with LmdbStore(tmp_path / "s") as store:
        writes = [BlockBatchWrite("user", "views", BlockBatch.from_rows(
            [(f"u{i}", "views@v1", 0, M5, b"x") for i in range(lo, min(lo + 2, 7))]))
            for lo in range(0, 7, 2)]
        store.put_block_batches(writes, {"user/wm": 1})
        assert len(flushes) == 1  # four transactions (two entities each), one sync
        assert store.get_watermarks(prefix="user/") == {"user/wm": 1}
        store.put_meta("k", b"v")
        assert len(flushes) == 2
    with LmdbStore(tmp_path / "n", sync=False) as store:
        store.put_meta("k", b"v")
    assert len(flushes) == 2
