"""Replay Kafka history through the blocks flow to compute blocks of new or changed features.

``run_replay`` runs the same blocks flow as the live worker (same lateness decisions, same
algebra), restricted to the chosen features and to events in ``[from, to)``, reading each
partition from its beginning (or given offsets) and stopping once the partition's watermark
passes ``to``. For a range Kafka no longer holds (its oldest retained event is after
``from``), the missing head is computed from the raw Iceberg tables by the batch job first.
Progress (event time reached, ETA) is reported while it runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
from dataflows.runner import run_flow
from features.spec import FeatureSet
from features.timeutil import align_down
from tessera.logs import get_logger

log = get_logger("dataflows.replay")


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did."""

    features: tuple[str, ...]
    topics: tuple[str, ...]
    from_ts: int
    to_ts: int
    kafka_from_ts: int | None
    raw_fallback: bool
    seconds: float


def truncated_since(bootstrap: str, topic: str) -> int | None:
    """If retention deleted the head of ``topic``, the earliest event time still held.

    None when every partition still starts at offset 0 (nothing was ever deleted).
    """
    from confluent_kafka import Consumer, TopicPartition

    from tessera.topics import consumer_config, list_topics

    parts = list_topics(bootstrap).get(topic, 0)
    c = Consumer(consumer_config(bootstrap, fast=False))
    try:
        lows = [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0]
                for p in range(parts)]
    finally:
        c.close()
    if not any(low > 0 for low in lows):
        return None
    return earliest_event_ts(bootstrap, topic)


def earliest_event_ts(bootstrap: str, topic: str) -> int | None:
    """The smallest event time among the first message of each partition (None if empty)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    from schemas.columnar import decode_message
    from tessera.topics import consumer_config, list_topics

    parts = list_topics(bootstrap).get(topic, 0)
    best = None
    for p in range(parts):
        c = Consumer(consumer_config(bootstrap, partition_eof=True, fast=False))
        try:
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING)])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is None:
                    continue
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        break
                    continue
                try:
                    ts = decode_message(m.value(), topic).columns["event_ts"]
                except Exception:  # a dead letter: look at the next message
                    continue
                if len(ts):
                    first = int(min(ts))
                    best = first if best is None else min(best, first)
                    break
        finally:
            c.close()
    return best


def run_replay(
    bootstrap: str,
    store_url: str,
    features: FeatureSet,
    names: Sequence[str],
    from_ts: int,
    to_ts: int,
    *,
    topics: Sequence[str] | None = None,
    warehouse: Path | None = None,
    lateness_ms: int = 60_000,
    progress: Callable[[float, float | None], None] | None = None,
) -> ReplayReport:
    """Compute blocks of ``names`` for events in ``[from_ts, to_ts)`` by replaying Kafka.

    Args:
        progress: called about once a second with (fraction of the event-time range done,
            estimated seconds left or None).
    """
    t0 = time.perf_counter()
    specs = tuple(f for f in features.features if f.name in set(names))
    missing = sorted(set(names) - {f.name for f in specs})
    if missing:
        raise KeyError(f"unknown features {missing}; known: {[f.name for f in features.features]}")
    subset = FeatureSet(features=specs, derived=(), source_file=features.source_file)
    read_topics = tuple(t for t in (topics or subset.sources) if subset.for_source(t))
    if not read_topics:
        raise ValueError(f"none of the topics {list(topics or [])} feed features {list(names)}")
    kafka_from = max((t for t in (truncated_since(bootstrap, t) for t in read_topics)
                      if t is not None), default=None)
    fallback = kafka_from is not None and kafka_from > from_ts
    if fallback:
        if warehouse is None:
            raise ValueError(
                f"Kafka holds events only from {kafka_from}, after --from {from_ts}; pass "
                "--warehouse so the missing range is computed from the raw Iceberg tables")
        from features.batch import run_batch_blocks
        from features.offline.raw import RawTables
        from features.store import open_store

        raw = RawTables.open(warehouse)
        cut = align_down(kafka_from, max(f.block_sizes[-1] for f in specs))
        with open_store(store_url) as store:
            run_batch_blocks(raw, raw.offline, store, subset, from_ts, cut, online_sizes="all")
        log.info("replay_raw_fallback", from_ts=from_ts, to_ts=cut)
        from_ts = max(from_ts, cut)

    config = BlocksFlowConfig(bootstrap=bootstrap, store_url=store_url, features=subset,
                              topics=read_topics, bounded=True, lateness_ms=lateness_ms,
                              warehouse=warehouse, event_range=(from_ts, to_ts))
    done = threading.Event()

    def watch() -> None:
        from features.store import open_store

        start = time.monotonic()
        while not done.wait(1.0):
            try:
                with open_store(store_url, readonly=True) as store:
                    marks = list(store.get_watermarks("blocks/").values())
            except Exception:
                continue
            if not marks or progress is None:
                continue
            frac = min(1.0, max(0.0, (min(marks) - from_ts) / max(1, to_ts - from_ts)))
            elapsed = time.monotonic() - start
            eta = elapsed * (1 - frac) / frac if frac > 0.01 else None
            progress(frac, eta)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_flow(build_blocks_flow(config))
    finally:
        done.set()
        watcher.join(timeout=5)
    if progress is not None:
        progress(1.0, 0.0)
    return ReplayReport(tuple(f.name for f in specs), read_topics, from_ts, to_ts, kafka_from,
                        fallback, time.perf_counter() - t0)
