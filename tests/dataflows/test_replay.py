"""Replay: blocks of chosen features computed from Kafka history equal the live flow's."""

from __future__ import annotations

import pytest

from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
from dataflows.replay import ReplayRangeError, run_replay
from dataflows.runner import run_flow
from features import replaymarks
from features.client import FeatureClient
from features.spec_loader import load_features
from features.store import open_store
from tests.dataflows.flowcheck import (
    LATENESS_MS,
    entity_ids_of,
    expiry_for,
    oracle_for,
    produce_world,
    small_world,
    store_blocks,
)

pytestmark = pytest.mark.integration
FEATURES = load_features("features.yaml")
NEW = ["item_views", "item_unique_viewers", "user_clicks"]


def _live_store(broker: str, path, *, views: int, seed: int):
    """Produce a small world and build a store from it with the live (bounded) flow."""
    world = small_world(total_views=views, seed=seed)
    produce_world(broker, world)
    url = f"lmdb://{path}"
    run_flow(build_blocks_flow(BlocksFlowConfig(
        bootstrap=broker, store_url=url, features=FEATURES, bounded=True,
        lateness_ms=LATENESS_MS)))
    return world, url


def test_replay_blocks_equal_live_blocks(fresh_broker, tmp_path):
    world, live = _live_store(fresh_broker, tmp_path / "live", views=4_000, seed=13)

    replayed = f"lmdb://{tmp_path}/replay"
    seen = []
    rep = run_replay(fresh_broker, replayed, FEATURES, NEW, world.start_ts,
                     world.end_ts + 4 * 86_400_000, lateness_ms=LATENESS_MS,
                     progress=seen.append)
    assert set(rep.features) == set(NEW) and not rep.raw_fallback
    assert rep.events > 0 and rep.blocks_written > 0
    last = seen[-1]
    assert last.finished and last.fraction == 1.0 and last.eta_s == 0.0
    # every message of the topics read was counted against the total to read
    assert last.total > 0 and last.done == last.total
    assert set(last.by_topic) == set(rep.topics)
    assert all(p.done <= p.total for p in seen)

    keys = {FEATURES.get(n).key for n in NEW}
    ids = entity_ids_of(oracle_for(fresh_broker, world, FEATURES), FEATURES)
    expired = expiry_for(live, FEATURES)
    a = {k: v for k, v in store_blocks(live, FEATURES, ids).items()
         if k[0] in keys and not expired(k)}
    b = {k: v for k, v in store_blocks(replayed, FEATURES, ids).items()
         if k[0] in keys and not expired(k)}
    assert a and set(a) == set(b)
    from features.aggregations import build_aggregation

    specs = {f.key: f for f in FEATURES.features}
    for k in a:
        agg = build_aggregation(specs[k[0]])
        assert agg.finalize(agg.from_bytes(a[k])) == agg.finalize(agg.from_bytes(b[k])), k


LONG_VIEWS = '''
  - name: item_long_views
    source: views
    entity: item_id
    aggregation: count
    filter: "dwell_ms > 3000"
    windows: [1h]
'''


def test_replaying_a_new_feature_leaves_every_other_feature_byte_identical(fresh_broker,
                                                                            tmp_path):
    """A replay writes the replayed feature's blocks and never drops another feature's.

    The new feature keeps 5-minute blocks for about an hour; the others keep them for a day.
    A replay that applied its own retention to whole records would delete the older blocks
    every other feature still reads.
    """
    world, store = _live_store(fresh_broker, tmp_path / "store", views=4_000, seed=17)
    ids = entity_ids_of(oracle_for(fresh_broker, world, FEATURES), FEATURES)
    before = store_blocks(store, FEATURES, ids)

    text = open(FEATURES.source_file).read().replace("\nderived:", LONG_VIEWS + "\nderived:")
    path = tmp_path / "features.yaml"
    path.write_text(text)
    extended = load_features(path)
    run_replay(fresh_broker, store, extended, ["item_long_views"], world.start_ts,
               world.end_ts + 4 * 86_400_000, lateness_ms=LATENESS_MS)

    after = store_blocks(store, extended, ids)
    new_key = extended.get("item_long_views").key
    assert any(k[0] == new_key for k in after)  # the replay did write the new feature
    others = {k: v for k, v in after.items() if k[0] != new_key}
    assert before and others == before  # every other feature's blocks, byte for byte


def test_a_range_short_of_the_store_watermark_is_refused_and_reads_flag_unfinished_replays(
        fresh_broker, tmp_path):
    world, store = _live_store(fresh_broker, tmp_path / "store", views=2_000, seed=19)
    with open_store(store, readonly=True) as s:
        wm = min(v for k, v in s.get_watermarks("blocks/").items() if "/views/" in k)

    with pytest.raises(ReplayRangeError, match="pass --to"):
        run_replay(fresh_broker, store, FEATURES, ["item_views"], world.start_ts, wm - 3_600_000,
                   lateness_ms=LATENESS_MS)

    spec = FEATURES.get("item_views")
    client_names = [spec.window_name(w) for w in spec.windows]
    # a replay that started and never finished (killed): the feature reads as stale
    with open_store(store) as s:
        s.set_watermarks({replaymarks.started_key(spec.key): 10})
        got = FeatureClient(s, FEATURES).get_features("item", ["i1"], client_names, at=wm)
        assert set(client_names) <= set(got.stale)
    # a finished replay clears the flag (to the end of the topics: no --to)
    rep = run_replay(fresh_broker, store, FEATURES, ["item_views"], world.start_ts,
                     lateness_ms=LATENESS_MS)
    assert rep.to_ts is None and rep.events > 0
    with open_store(store) as s:
        assert replaymarks.pending(s.get_watermarks(replaymarks.PREFIX)) == set()
        got = FeatureClient(s, FEATURES).get_features("item", ["i1"], client_names, at=wm)
        assert not set(client_names) & set(got.stale)


def test_pending_replays_are_those_started_after_their_last_finish():
    marks = {replaymarks.started_key("a@1"): 5, replaymarks.done_key("a@1"): 5,
             replaymarks.started_key("b@2"): 9, replaymarks.done_key("b@2"): 5,
             replaymarks.started_key("c@3"): 7, "blocks/views/item_id/0": 100}
    assert replaymarks.pending(marks) == {"b@2", "c@3"}


def test_raw_fallback_fills_the_head_kafka_lost_and_equals_a_batch_rebuild(fresh_broker,
                                                                           tmp_path):
    """Kafka came back with an emptied log and holds only the last day and a half; the raw
    archive holds all three days. The replay computes the head from the raw tables and the
    rest from Kafka: its blocks equal a batch rebuild of the whole range from the raw tables.
    """
    import numpy as np
    from confluent_kafka import Producer

    from features.batch import run_batch_blocks
    from features.offline.raw import RawTables
    from schemas.codec import encode
    from schemas.columnar import records_to_columns
    from tessera.synth.sinks import generate_records, partition_of
    from tessera.topics import producer_config

    day = 86_400_000
    world = small_world(duration_ms=3 * day, total_views=3_000, seed=23, late_fraction=0.0,
                        malformed_fraction=0.0)
    views = sorted(generate_records(world)["views"], key=lambda r: r["event_ts"])
    warehouse = tmp_path / "warehouse"
    raw = RawTables.open(warehouse)
    cols = records_to_columns("views", views)
    n = len(cols)
    raw.append("views", cols, np.zeros(n, np.int64), np.arange(n, dtype=np.int64), {0: n})

    lost = world.start_ts + 30 * 3_600_000  # Kafka's log starts here now
    producer = Producer(producer_config(fresh_broker))
    for r in views:
        if r["event_ts"] >= lost:
            producer.produce("views", encode("views", r), partition=partition_of(r["item_id"], 3))
    producer.flush(30)

    names = ["item_views", "user_views"]
    replayed = f"lmdb://{tmp_path}/replayed"
    rep = run_replay(fresh_broker, replayed, FEATURES, names, world.start_ts,
                     lateness_ms=LATENESS_MS, warehouse=warehouse)
    assert rep.raw_fallback and rep.kafka_from_ts >= lost
    assert rep.from_ts > lost and rep.events > 0  # the tail really came from Kafka

    rebuilt = f"lmdb://{tmp_path}/rebuilt"
    with open_store(rebuilt) as store:
        run_batch_blocks(raw, RawTables.open(tmp_path / "warehouse-2").offline, store, FEATURES,
                         world.start_ts, world.start_ts + 4 * day, names=names,
                         online_sizes="all")
    keys = {FEATURES.get(n).key for n in names}
    ids = {"item": {r["item_id"] for r in views}, "user": {r["user_id"] for r in views}}
    expired = expiry_for(replayed, FEATURES)
    a = {k: v for k, v in store_blocks(replayed, FEATURES, ids).items()
         if k[0] in keys and not expired(k)}
    b = {k: v for k, v in store_blocks(rebuilt, FEATURES, ids).items()
         if k[0] in keys and not expired(k)}
    assert a and a == b
