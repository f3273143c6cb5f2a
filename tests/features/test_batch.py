"""Batch correction and roll-ups: blocks from raw events equal the reference, idempotently."""

from __future__ import annotations

import numpy as np
import pytest

from features.aggregations import build_aggregation
from features.batch import compute_blocks, run_batch_blocks
from features.offline.raw import RawTables
from features.reference import reference_blocks
from features.spec_loader import load_features
from features.store import open_store
from features.timeutil import DAY, HOUR
from schemas.columnar import records_to_columns
from tessera.synth import WorldConfig, generate_records

FEATURES = load_features("features.yaml")
WORLD = WorldConfig(seed=4, n_users=40, n_items=80, n_authors=8, n_topics=5,
                    duration_ms=2 * DAY, total_views=3_000, late_fraction=0.05)


def _same(agg, a, b) -> bool:
    if agg.kind == "approx_quantile":
        return a.n == b.n
    return agg.finalize(a) == agg.finalize(b)


def test_blocks_and_rollups_equal_the_reference_inside_the_range():
    records = generate_records(WORLD)
    start = WORLD.start_ts
    from_ts, to_ts = start + 3 * HOUR, start + DAY + 5 * HOUR
    # the reference with no lateness: every event counts (the raw archive has them all)
    oracle = reference_blocks(FEATURES.features,
                              {f"{t}:0": records[t] for t in FEATURES.sources}, 10**15)
    specs = {f.key: f for f in FEATURES.features}
    checked = 0
    for spec in FEATURES.features:
        cols = records_to_columns(spec.source, records[spec.source])
        res = compute_blocks(spec, cols, from_ts, to_ts)
        agg = build_aggregation(spec)
        got = {}
        for size in res.by_size:
            ids, starts, reps = res.rows(size)
            for e, s, r in zip(ids, starts, reps):
                got[(spec.key, e, s, size)] = agg.from_bytes(r)
        want = {k: v for k, v in oracle.items() if k[0] == spec.key
                and k[2] >= from_ts and k[2] + k[3] <= to_ts}
        assert set(got) == set(want), spec.name
        for k, v in want.items():
            assert _same(agg, got[k], v), (spec.name, k)
            checked += 1
    assert checked > 1000 and specs


@pytest.mark.integration
def test_batch_job_is_idempotent_and_writes_coarse_blocks_online(tmp_path):
    records = generate_records(WORLD)
    raw = RawTables.open(tmp_path / "warehouse")
    for topic in ("views", "engagements", "impressions"):
        cols = records_to_columns(topic, records[topic])
        n = len(cols)
        raw.append(topic, cols, np.zeros(n, np.int64), np.arange(n, dtype=np.int64), {0: n})
    store = open_store(f"lmdb://{tmp_path}/store")
    start = WORLD.start_ts
    first = run_batch_blocks(raw, raw.offline, store, FEATURES, start, start + 2 * DAY,
                             names=["item_views", "user_clicks"])
    blocks1 = raw.offline.scan_blocks(feature_keys=[FEATURES.get("item_views").key])
    second = run_batch_blocks(raw, raw.offline, store, FEATURES, start, start + 2 * DAY,
                              names=["item_views", "user_clicks"])
    blocks2 = raw.offline.scan_blocks(feature_keys=[FEATURES.get("item_views").key])
    assert first.blocks == second.blocks and first.blocks[DAY] > 0
    key = ["entity_id", "start_ms", "size_ms", "rep"]
    assert blocks1.select(key).sort_by([(c, "ascending") for c in key[:3]]).equals(
        blocks2.select(key).sort_by([(c, "ascending") for c in key[:3]]))
    # 1h and 1d blocks reached the online store; a day's count equals its raw views
    item = records["views"][0]["item_id"]
    (table,) = store.get_block_tables("item", "views", [item])
    spec = FEATURES.get("item_views")
    day_rows = [r for r in table.to_rows() if r[0] == spec.key and r[2] == DAY]
    assert day_rows
    for _, s, _, rep in day_rows:
        want = sum(1 for r in records["views"] if r["item_id"] == item and s <= r["event_ts"] < s + DAY)
        assert build_aggregation(spec).from_bytes(rep) == want
    store.close()


@pytest.mark.integration
def test_sealed_only_stops_at_the_live_flows_watermark_and_keeps_its_later_blocks(tmp_path):
    """A correction never rewrites a block the live flow has not sealed: the flow would
    write it again when it seals it, undoing the correction offline but not online."""
    records = generate_records(WORLD)
    raw = RawTables.open(tmp_path / "warehouse")
    for topic in ("views", "engagements"):
        cols = records_to_columns(topic, records[topic])
        n = len(cols)
        raw.append(topic, cols, np.zeros(n, np.int64), np.arange(n, dtype=np.int64), {0: n})
    store = open_store(f"lmdb://{tmp_path}/store")
    start = WORLD.start_ts
    views, clicks = FEATURES.get("item_views"), FEATURES.get("user_clicks")
    wm = start + DAY + 7 * 60_000  # the live item flow's watermark (two shards)
    store.set_watermarks({"blocks/views/item_id/0": wm + HOUR, "blocks/views/item_id/1": wm})
    # a block the live flow sealed after the watermark: the correction must leave it alone
    late_block = ("item", "i-live", views.key, start + DAY + HOUR, HOUR, b"\x05" + b"\x00" * 7)
    raw.offline.append_blocks([late_block])
    rep = run_batch_blocks(raw, raw.offline, store, FEATURES, start, start + 2 * DAY,
                           names=["item_views", "user_clicks"], sealed_only=True)
    assert rep.held_back == {"item_views": start + DAY + 5 * 60_000}
    blocks = raw.offline.scan_blocks(feature_keys=[views.key])
    ends = np.asarray(blocks.column("start_ms")) + np.asarray(blocks.column("size_ms"))
    ids = blocks.column("entity_id").to_pylist()
    assert ends[[e != "i-live" for e in ids]].max() == start + DAY + 5 * 60_000
    assert "i-live" in ids  # kept
    # a feature with no live flow in the store is corrected over the whole range
    cblocks = raw.offline.scan_blocks(feature_keys=[clicks.key])
    cends = np.asarray(cblocks.column("start_ms")) + np.asarray(cblocks.column("size_ms"))
    assert cends.max() > start + DAY + HOUR
    # without sealed_only the whole range is replaced, the live flow's block with it
    whole = run_batch_blocks(raw, raw.offline, store, FEATURES, start, start + 2 * DAY,
                             names=["item_views"])
    assert whole.held_back == {}
    after = raw.offline.scan_blocks(feature_keys=[views.key]).column("entity_id").to_pylist()
    assert "i-live" not in after
    store.close()
