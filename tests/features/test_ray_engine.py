"""The batch blocks job on Ray writes exactly what the local engine writes.

A generated world's raw events go into two warehouses; ``run_batch_blocks`` runs once with
the local engine and once on a local Ray cluster of 1 and of 2 worker processes (Ray Data
reads the raw table, shuffles by entity hash and aggregates each shard). Every block row of
the Iceberg blocks table (reps as bytes, sketches included) and every online store record must
be equal.
"""

from __future__ import annotations

import numpy as np
import pytest

from features.batch import run_batch_blocks
from features.offline.raw import RawTables
from features.ray_engine import RayBlocksEngine, ray_runtime, tag_shards
from features.spec_loader import load_features
from features.store import open_store
from features.timeutil import DAY, HOUR
from schemas.columnar import records_to_columns
from tessera.synth import WorldConfig, generate_records

pytest.importorskip("ray.data")

FEATURES = load_features("features.yaml")
WORLD = WorldConfig(seed=11, n_users=60, n_items=120, n_authors=10, n_topics=6,
                    duration_ms=2 * DAY, total_views=4_000, late_fraction=0.05)
#: every aggregation kind the shipped file has is a views feature (count, sum, mean, min,
#: max, KLL quantile, HLL distinct, last_n), over three entities
NAMES = [f.name for f in FEATURES.for_source("views")]
BLOCK_KEY = ["entity_type", "entity_id", "feature_key", "start_ms", "size_ms"]


def _world(path, records) -> RawTables:
    raw = RawTables.open(path)
    views = records["views"]
    # four commits (four data files: Ray reads them as separate blocks, so an entity's
    # events meet only through the shuffle); two Kafka partitions (the order's tie-breaks)
    for lo in range(0, len(views), len(views) // 4 + 1):
        hi = min(lo + len(views) // 4 + 1, len(views))
        cols = records_to_columns("views", views[lo:hi])
        at = np.arange(lo, hi, dtype=np.int64)
        raw.append("views", cols, at % 2, at, {0: hi, 1: hi})
    return raw


def _blocks(raw: RawTables):
    t = raw.offline.scan_blocks()
    return t.select([*BLOCK_KEY, "rep"]).sort_by([(c, "ascending") for c in BLOCK_KEY])


def _records(store, records) -> dict:
    out = {}
    for entity_type, field in (("item", "item_id"), ("user", "user_id"),
                               ("author", "author_id")):
        ids = sorted({r[field] for r in records["views"]})
        for e, table in zip(ids, store.get_block_tables(entity_type, "views", ids)):
            out[(entity_type, e)] = None if table is None else table.encode()
    return out


@pytest.mark.integration
def test_ray_engine_writes_the_local_engines_blocks_with_1_and_2_workers(tmp_path):
    records = generate_records(WORLD)
    start = WORLD.start_ts
    # a range that cuts the first and last hours: roll-ups it cannot complete are left out
    from_ts, to_ts = start + HOUR + 10 * 60_000, start + 2 * DAY - HOUR

    local = _world(tmp_path / "local", records)
    with open_store(f"lmdb://{tmp_path}/store-local") as store:
        want_report = run_batch_blocks(local, local.offline, store, FEATURES, from_ts, to_ts,
                                       names=NAMES, sealed_only=False)
        want_records = _records(store, records)
    want = _blocks(local)
    assert want.num_rows > 5_000 and sum(v is not None for v in want_records.values()) > 100

    for workers in (1, 2):
        raw = _world(tmp_path / f"ray{workers}", records)
        with ray_runtime(workers=workers) as cpus, \
                open_store(f"lmdb://{tmp_path}/store-ray{workers}") as store:
            assert cpus == workers
            report = run_batch_blocks(raw, raw.offline, store, FEATURES, from_ts, to_ts,
                                      names=NAMES, sealed_only=False,
                                      engine=RayBlocksEngine(raw))
            got_records = _records(store, records)
        got = _blocks(raw)
        assert (report.events, report.blocks) == (want_report.events, want_report.blocks)
        assert got.num_rows == want.num_rows
        assert got.equals(want), f"{workers} Ray workers wrote other block rows"
        assert got_records == want_records, f"{workers} Ray workers wrote other store records"


def test_shards_are_the_same_for_an_id_in_every_batch():
    import pyarrow as pa

    a = pa.table({"user_id": ["u1", "u2", None, "u3"]})
    b = pa.table({"user_id": ["u3", "u9", "u1"]})
    sa = tag_shards(a, ["user_id"], 7).column("_shard_user_id").to_pylist()
    sb = tag_shards(b, ["user_id"], 7).column("_shard_user_id").to_pylist()
    assert sa[0] == sb[2] and sa[3] == sb[0] and sa[2] == 0
    assert all(0 <= s < 7 for s in sa + sb)
