"""The blocks dataflow on the real broker and store, against the brute-force oracle."""

from __future__ import annotations

import pytest

from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
from dataflows.runner import run_flow
from features.spec_loader import load_features
from features.store import open_store
from schemas.codec import DeadLetter
from tessera.topics import read_to_end
from tests.dataflows.flowcheck import (
    LATENESS_MS,
    compare_to_oracle,
    entity_ids_of,
    expiry_for,
    oracle_for,
    produce_world,
    small_world,
    store_blocks,
)

pytestmark = pytest.mark.integration
FEATURES = load_features("features.yaml")


def test_blocks_flow_equals_oracle_and_dead_letters_malformed(fresh_broker, tmp_path):
    world = small_world()
    summary = produce_world(fresh_broker, world)
    store_url = f"lmdb://{tmp_path}/store"
    config = BlocksFlowConfig(bootstrap=fresh_broker, store_url=store_url, features=FEATURES,
                              bounded=True, shards=3, lateness_ms=LATENESS_MS,
                              warehouse=tmp_path / "warehouse")
    run_flow(build_blocks_flow(config))

    oracle = oracle_for(fresh_broker, world, FEATURES)
    got = store_blocks(store_url, FEATURES, entity_ids_of(oracle, FEATURES))
    expired = expiry_for(store_url, FEATURES)
    assert compare_to_oracle(got, oracle, FEATURES, expired) == []
    assert len(got) > 1000
    assert any(expired(k) for k in oracle), "the world should be long enough to exercise retention"

    # every malformed record is in the dead-letter topic, with its reason
    dead = [DeadLetter.decode(m.value()) for m in read_to_end(fresh_broker, "deadletter")]
    malformed_in_sources = sum(v for t, v in summary.malformed.items() if t in FEATURES.sources)
    assert len(dead) == malformed_in_sources > 0
    assert all(d.reason and d.payload is not None for d in dead)

    # the store knows up to where each shard's blocks are trusted
    with open_store(store_url, readonly=True) as store:
        wms = store.get_watermarks("blocks/")
    assert len(wms) == 3 * sum(len({f.entity for f in FEATURES.for_source(t)})
                               for t in FEATURES.sources)


def test_a_retrying_producer_s_copies_are_counted_once_with_deduplicate(fresh_broker, tmp_path,
                                                                        monkeypatch):
    """Every views and engagements message is produced twice in a row (a producer retrying
    after a lost acknowledgement: same event ids, new offsets). With ``deduplicate`` the
    blocks equal the oracle of the world produced once; without it they do not."""
    import dataclasses

    from dataflows.progress import FlowProgress
    from tessera.synth import sinks

    produce_once = sinks._Producer.produce

    def produce_twice(self, topic, value, *, partition, key):
        produce_once(self, topic, value, partition=partition, key=key)
        if topic in ("views", "engagements"):
            produce_once(self, topic, value, partition=partition, key=key)

    monkeypatch.setattr(sinks._Producer, "produce", produce_twice)
    world = small_world()
    produce_world(fresh_broker, world, batch_events=20)
    oracle = oracle_for(fresh_broker, world, FEATURES)
    ids = entity_ids_of(oracle, FEATURES)

    dedup = dataclasses.replace(FEATURES, deduplicate={"views": 600_000,
                                                       "engagements": 600_000})
    url = f"lmdb://{tmp_path}/dedup"
    progress = FlowProgress("blocks")
    run_flow(build_blocks_flow(BlocksFlowConfig(
        bootstrap=fresh_broker, store_url=url, features=dedup, bounded=True, shards=2,
        lateness_ms=LATENESS_MS, warehouse=tmp_path / "w1"), progress))
    assert compare_to_oracle(store_blocks(url, FEATURES, ids), oracle, FEATURES,
                             expiry_for(url, FEATURES)) == []
    views = sum(1 for k in oracle if k[0].startswith("item_views"))
    assert progress.duplicates > 0 and views > 0

    plain = f"lmdb://{tmp_path}/plain"
    counted = dataclasses.replace(FEATURES, deduplicate={})
    run_flow(build_blocks_flow(BlocksFlowConfig(
        bootstrap=fresh_broker, store_url=plain, features=counted, bounded=True, shards=2,
        lateness_ms=LATENESS_MS, warehouse=tmp_path / "w2")))
    assert compare_to_oracle(store_blocks(plain, FEATURES, ids), oracle, FEATURES,
                             expiry_for(plain, FEATURES)) != []


def test_a_deduplicate_horizon_shorter_than_the_lateness_is_refused():
    import dataclasses

    short = dataclasses.replace(FEATURES, deduplicate={"views": 30_000})
    with pytest.raises(ValueError, match="shorter than the allowed lateness"):
        BlocksFlowConfig(bootstrap="x:1", store_url="lmdb:///tmp/x", features=short,
                         lateness_ms=60_000)


def test_copies_produced_after_a_restart_are_dropped_by_the_resumed_flow(fresh_broker, tmp_path,
                                                                         monkeypatch):
    """The flow runs to the end with a recovery directory; a producer then retries every
    views message; the resumed flow rebuilds its event-id memory from the log (the ids are
    not in the snapshot) and drops every copy, and the blocks still equal the oracle."""
    import dataclasses

    from dataflows.progress import FlowProgress
    from tessera.synth import generate_records, sinks

    world = small_world()
    produce_world(fresh_broker, world, batch_events=20)
    oracle = oracle_for(fresh_broker, world, FEATURES)
    # a horizon longer than the world: every copy is a duplicate, however old
    dedup = dataclasses.replace(FEATURES, deduplicate={"views": 30 * 86_400_000})
    url = f"lmdb://{tmp_path}/store"

    def run(progress: FlowProgress) -> None:
        run_flow(build_blocks_flow(BlocksFlowConfig(
            bootstrap=fresh_broker, store_url=url, features=dedup, bounded=True, shards=2,
            lateness_ms=LATENESS_MS, warehouse=tmp_path / "w"), progress),
            recovery_dir=tmp_path / "recovery", epoch_interval_s=0.2)

    first = FlowProgress("blocks")
    run(first)
    assert first.duplicates == 0

    produce_once = sinks._Producer.produce

    def views_only(self, topic, value, *, partition, key):
        if topic == "views":
            produce_once(self, topic, value, partition=partition, key=key)

    monkeypatch.setattr(sinks._Producer, "produce", views_only)
    produce_world(fresh_broker, world, batch_events=20)
    monkeypatch.setattr(sinks._Producer, "produce", produce_once)

    resumed = FlowProgress("blocks")
    run(resumed)
    assert resumed.duplicates == len(generate_records(world)["views"])
    assert compare_to_oracle(store_blocks(url, FEATURES, entity_ids_of(oracle, FEATURES)),
                             oracle, FEATURES, expiry_for(url, FEATURES)) == []


def test_flush_timers_align_on_the_wall_clock():
    """Every shard's flush timer lands on a whole multiple of its interval, within one
    interval from now: shards that set theirs in the same interval flush together."""
    from datetime import timedelta

    from dataflows.kafka_source import aligned_after, utc_now

    for ms in (1, 250, 1000, 30_000):
        before = utc_now()
        at = aligned_after(ms)
        after = utc_now()
        assert round(at.timestamp() * 1000) % ms == 0
        assert before < at <= after + timedelta(milliseconds=ms)
