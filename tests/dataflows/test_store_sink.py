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
    sink = StoreSink(f"lmdb://{tmp_path}/store", tmp_path / "warehouse",
                     commit_interval_s=3600).build("store_out", 0, 1)
    rep = np.int64(3).tobytes()
    batch = BlockBatch.from_rows([("i1", "f:count", 0, 300_000, rep),
                                  ("i2", "f:count", 0, 300_000, rep)])
    out = ShardOutput(entity_type="item", family="views",
                      flush=ShardFlush(batch, np.array([True, False])),
                      watermark_key="blocks/views/item_id/0", watermark=300_000)
    sink.write_batch([("k", out)])
    clock[0] += 30.0  # the commit happens later
    sink.close()
    blocks = OfflineTables.open(tmp_path / "warehouse").scan_blocks()
    assert blocks.column("entity_id").to_pylist() == ["i1"]  # only the sealed one
    assert blocks.column("written_ms").to_pylist() == [1_000_000_000]
