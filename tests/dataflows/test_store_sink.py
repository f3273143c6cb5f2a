"""The blocks flow's store sink: sealed blocks are stamped when they are written online."""

from __future__ import annotations

import numpy as np

import dataflows.sinks as sinks
from dataflows.sinks import ShardOutput, StoreSink
from features.blockstate import ShardFlush
from features.offline.tables import OfflineTables
from features.store.blockbatch import BlockBatch


def test_sealed_blocks_keep_the_time_they_were_written_online(tmp_path, monkeypatch):
    """A batch correction stamped between the online write and the Iceberg commit is the
    newer version offline, as it is online (the commit comes seconds later)."""
    clock = [1_000_000.0]
    monkeypatch.setattr(sinks.time, "time", lambda: clock[0])
    sink = StoreSink(f"lmdb://{tmp_path}/store", tmp_path / "warehouse").build("store_out", 0, 1)
    rep = np.int64(3).tobytes()
    batch = BlockBatch.from_rows([("i1", "f:count", 0, 300_000, rep),
                                  ("i2", "f:count", 0, 300_000, rep)])
    out = ShardOutput(entity_type="item", family="views",
                      flush=ShardFlush(batch, np.array([True, False])),
                      watermark_key="blocks/views/item_id/0", watermark=300_000,
                      shard="views/item_id/0")
    sink.write_batch([("k", out)])
    clock[0] += 30.0
    sink.close()
    blocks = OfflineTables.open(tmp_path / "warehouse").scan_blocks()
    assert blocks.column("entity_id").to_pylist() == ["i1"]  # only the sealed one
    assert blocks.column("written_ms").to_pylist() == [1_000_000_000]


def test_a_shard_s_blocks_sealed_again_after_a_crash_are_on_disk_once(tmp_path):
    """The replay after a crash between the Iceberg commit and the snapshot seals the same
    blocks again: the restarted sink leaves out those its shard's mark covers, and writes
    the ones past it (and a replay flow, another writer, is not held back by the mark)."""
    rep = np.int64(3).tobytes()

    def flush(rows, wm):
        batch = BlockBatch.from_rows(rows)
        return ShardOutput(entity_type="item", family="views",
                           flush=ShardFlush(batch, np.ones(len(rows), dtype=bool)),
                           watermark_key="blocks/views/item_id/0", watermark=wm,
                           shard="views/item_id/0")

    first = [("i1", "f:count", 0, 300_000, rep), ("i2", "f:count", 0, 300_000, rep)]
    again = first + [("i1", "f:count", 300_000, 300_000, rep)]
    url, wh = f"lmdb://{tmp_path}/store", tmp_path / "warehouse"
    sink = StoreSink(url, wh).build("store_out", 0, 1)
    sink.write_batch([("k", flush(first, 300_000))])
    sink.close()  # the crash: the flow's snapshot predates this write
    sink = StoreSink(url, wh).build("store_out", 0, 1)
    sink.write_batch([("k", flush(again, 600_000))])
    sink.close()
    raw = OfflineTables.open(wh).table("blocks").scan().to_arrow()
    assert sorted(zip(raw.column("entity_id").to_pylist(),
                      raw.column("start_ms").to_pylist())) == [
        ("i1", 0), ("i1", 300_000), ("i2", 0)]
    replay = StoreSink(url, wh, writer="replay-1").build("store_out", 0, 1)
    replay.write_batch([("k", flush(first, 300_000))])
    replay.close()
    assert OfflineTables.open(wh).table("blocks").scan().to_arrow().num_rows == 5


def test_sealed_table_gathers_the_kept_blocks_as_the_rows_say():
    """The sealed blocks' columns, gathered by Arrow, are each kept row's own id, key, start,
    size and rep bytes (reps of every length, empty ones included), in row order."""
    rng = np.random.default_rng(7)
    for n in (0, 1, 7, 500):
        rows = [(f"u{rng.integers(50)}", f"f{rng.integers(4)}:x", int(rng.integers(1e6)),
                 int(rng.choice([300_000, 3_600_000])), bytes(rng.integers(0, 256, rng.integers(0, 40),
                                                                          dtype=np.uint8)))
                for _ in range(n)]
        batch = BlockBatch.from_rows(rows)
        keep = rng.random(len(batch)) < 0.6
        got = sinks.sealed_table("user", batch, keep)
        want = [("user", batch.entity_ids[batch.entity_idx[i]],
                 batch.feature_keys[batch.feature_idx[i]], int(batch.starts[i]),
                 int(batch.sizes[i]), bytes(batch.blob[batch.offsets[i]:batch.offsets[i + 1]]))
                for i in np.flatnonzero(keep)]
        assert list(zip(*(got.column(c).to_pylist() for c in got.column_names))) == want
        assert want == [("user", *r) for r, k in zip(rows, keep) if k]  # the input's rows


def test_on_a_store_that_sweeps_writes_keep_expired_blocks_until_the_sweep(monkeypatch):
    """Aerospike: the sink's writes carry no retention (a range removal per feature and size
    on every record); expired blocks go in the sweep, every ``SWEEP_INTERVAL_S`` and at the
    end of the run, for the features the sink wrote."""
    import os
    import time
    import uuid

    import pytest

    from features.store import open_store

    hosts = os.environ.get("TESSERA_AEROSPIKE_HOSTS")
    if not hosts:
        pytest.skip("no Aerospike server (TESSERA_AEROSPIKE_HOSTS)")
    url = f"aerospike://{hosts}/{os.environ.get('TESSERA_AEROSPIKE_NAMESPACE', 'test')}"
    et, m5 = f"t{uuid.uuid4().hex[:10]}", 300_000
    rep = np.int64(1).tobytes()

    def out(start, wm):
        batch = BlockBatch.from_rows([("u1", "f:count", start, m5, rep)])
        return ShardOutput(entity_type=et, family="views",
                           flush=ShardFlush(batch, np.zeros(1, dtype=bool)),
                           watermark_key=f"blocks/views/{et}/0", watermark=wm)

    def stored():
        with open_store(url) as store:
            (table,) = store.get_block_tables(et, "views", ["u1"])
        return [row[1] for row in table.to_rows()]

    def swept(want):  # a sweep is a server-side job the sink does not wait for
        for _ in range(600):
            if stored() == want:
                return want
            time.sleep(0.05)
        return stored()

    sink = StoreSink(url, None, retention={(et, "views"): {m5: m5}}).build("store_out", 0, 1)
    sink.write_batch([("k", out(0, m5))])
    sink.write_batch([("k", out(2 * m5, 3 * m5))])  # [0, 5m) has expired: kept until a sweep
    assert stored() == [0, 2 * m5]
    monkeypatch.setattr(sinks, "SWEEP_INTERVAL_S", 0.0)
    sink.write_batch([("k", out(3 * m5, 4 * m5))])  # the sweep drops every block ending <= 3m
    assert swept([3 * m5]) == [3 * m5]
    monkeypatch.setattr(sinks, "SWEEP_INTERVAL_S", 3600.0)
    sink.write_batch([("k", out(5 * m5, 6 * m5))])
    assert stored() == [3 * m5, 5 * m5]
    sink.close()  # the end of a run sweeps what is left
    assert swept([5 * m5]) == [5 * m5]
