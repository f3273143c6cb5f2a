"""Replay Kafka history through the blocks flow to compute blocks of new or changed features.

``run_replay`` runs the same blocks flow as the live worker (same lateness decisions, same
algebra), restricted to the chosen features and to events in ``[from, to)``, reading each
partition from its beginning (or given offsets) and stopping once the partition's watermark
passes ``to``. For a range Kafka no longer holds (its oldest retained event is after
``from``), the missing head is computed from the raw Iceberg tables by the batch job first.
Progress (messages read against the messages to read, per topic, and an ETA) is reported
while it runs.

What a replay guarantees:

* it writes only the replayed features' blocks: the other features in the same records are
  never touched (retention in a write covers only the features it carries);
* a replay that ends before the store's watermark for its topics is refused (reads up to the
  watermark would see the new features only in part), and while a replay runs, or if it
  stops part way, reads flag the replayed features stale (``features.replaymarks``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
from dataflows.progress import FlowProgress
from dataflows.runner import run_flow
from features.spec import FeatureSet
from features.timeutil import align_up
from tessera.logs import get_logger

log = get_logger("dataflows.replay")

END = 2**62  # "no end": the range runs to the end of the topics


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did."""

    features: tuple[str, ...]
    topics: tuple[str, ...]
    from_ts: int
    to_ts: int | None  # None: to the end of the topics
    kafka_from_ts: int | None
    raw_fallback: bool
    seconds: float
    events: int = 0
    blocks_written: int = 0


@dataclass(frozen=True)
class ReplayProgress:
    """How far a replay is: messages read of the messages to read, overall and per topic."""

    done: int
    total: int
    by_topic: dict[str, tuple[int, int]]
    events: int
    elapsed_s: float
    finished: bool = False

    @property
    def fraction(self) -> float:
        """Share of the messages read (1.0 once the replay has finished)."""
        if self.finished:
            return 1.0
        return min(0.999, self.done / self.total) if self.total else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the mean rate so far (None before the first messages)."""
        if self.finished:
            return 0.0
        if self.done <= 0 or self.elapsed_s <= 0:
            return None
        return max(0.0, self.elapsed_s * (self.total - self.done) / self.done)


class ReplayRangeError(ValueError):
    """A replay range that would leave the replayed features short of the store's watermark."""


def partition_ranges(bootstrap: str, topics: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Per partition (``topic:partition``), its (low, high) offsets: what a replay reads."""
    from confluent_kafka import Consumer, TopicPartition

    from tessera.topics import consumer_config, list_topics

    counts = list_topics(bootstrap)
    c = Consumer(consumer_config(bootstrap, fast=False))
    try:
        return {f"{t}:{p}": tuple(c.get_watermark_offsets(TopicPartition(t, p), timeout=10))
                for t in topics for p in range(counts.get(t, 0))}
    finally:
        c.close()


def store_watermark(store_url: str, topics: Sequence[str]) -> int | None:
    """The lowest blocks watermark the store holds for ``topics`` (None: none yet)."""
    from features.store import open_store
    from features.store.errors import StoreUnavailableError

    try:
        with open_store(store_url, readonly=True) as store:
            marks = store.get_watermarks("blocks/")
    except StoreUnavailableError:
        return None
    vals = [v for k, v in marks.items() if k.split("/")[1] in topics]  # blocks/{topic}/...
    return min(vals) if vals else None


def kafka_holds_from(bootstrap: str, topics: Sequence[str], from_ts: int,
                     warehouse: Path | None) -> int | None:
    """The event time from which Kafka holds the ``topics`` whole, if it lost their head.

    Kafka lost the head of a topic when a partition's first offset is past 0 (retention
    deleted records), or, with a ``warehouse``, when the raw archive holds events of the
    topic from before the earliest one Kafka still has (a broker that came back with an
    emptied log). None when Kafka holds everything from ``from_ts`` on.
    """
    raw = None
    if warehouse is not None:
        from features.offline.raw import RawTables

        raw = RawTables.open(warehouse)
    found = []
    for topic in topics:
        truncated = any(low > 0 for low, _ in partition_ranges(bootstrap, [topic]).values())
        if not truncated and raw is None:
            continue
        held = earliest_event_ts(bootstrap, topic)
        if held is None:
            continue
        if truncated or (held > from_ts and
                         raw.scan(topic, from_ts, held, columns=["event_ts"]).num_rows):
            found.append(held)
    return max(found, default=None)


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
    to_ts: int | None = None,
    *,
    topics: Sequence[str] | None = None,
    warehouse: Path | None = None,
    lateness_ms: int = 60_000,
    progress: Callable[[ReplayProgress], None] | None = None,
) -> ReplayReport:
    """Compute blocks of ``names`` for events in ``[from_ts, to_ts)`` by replaying Kafka.

    Args:
        to_ts: end of the range, exclusive; None reads to the end of the topics.
        progress: called about once a second, and once at the end, with a ``ReplayProgress``.

    Raises:
        ReplayRangeError: ``to_ts`` is before the store's watermark for the topics read.
    """
    from features import replaymarks
    from features.store import open_store
    from features.timeutil import to_iso

    t0 = time.perf_counter()
    specs = tuple(f for f in features.features if f.name in set(names))
    missing = sorted(set(names) - {f.name for f in specs})
    if missing:
        raise KeyError(f"unknown features {missing}; known: {[f.name for f in features.features]}")
    subset = FeatureSet(features=specs, derived=(), source_file=features.source_file)
    read_topics = tuple(t for t in (topics or subset.sources) if subset.for_source(t))
    if not read_topics:
        raise ValueError(f"none of the topics {list(topics or [])} feed features {list(names)}")
    wm = store_watermark(store_url, read_topics)
    if to_ts is not None and wm is not None and to_ts < wm:
        raise ReplayRangeError(
            f"--to {to_iso(to_ts)} is before the store's watermark {to_iso(wm)} for "
            f"{', '.join(read_topics)}: reads up to the watermark would see "
            f"{', '.join(names)} only in part; pass --to {to_iso(wm)} or later, or leave "
            "--to out to replay to the end of the topics")
    kafka_from = kafka_holds_from(bootstrap, read_topics, from_ts, warehouse)
    fallback = kafka_from is not None and kafka_from > from_ts
    if fallback and warehouse is None:
        raise ValueError(
            f"Kafka holds events only from {to_iso(kafka_from)}, after --from "
            f"{to_iso(from_ts)}; pass --warehouse so the missing range is computed from the "
            "raw Iceberg tables")

    run_id = int(time.time() * 1000)
    with open_store(store_url) as store:  # reads flag the features stale until done
        store.set_watermarks({replaymarks.started_key(f.key): run_id for f in specs})
    if fallback:
        from features.batch import run_batch_blocks
        from features.offline.raw import RawTables

        raw = RawTables.open(warehouse)
        # Up to a boundary of the largest block at or after Kafka's first event: no block
        # straddles it, the raw tables hold everything before it, Kafka everything after.
        cut = align_up(kafka_from, max(f.block_sizes[-1] for f in specs))
        if to_ts is not None:
            cut = min(cut, align_up(to_ts, max(f.block_sizes[-1] for f in specs)))
        with open_store(store_url) as store:
            run_batch_blocks(raw, raw.offline, store, subset, from_ts, cut, online_sizes="all")
        log.info("replay_raw_fallback", from_ts=to_iso(from_ts), to_ts=to_iso(cut))
        from_ts = max(from_ts, cut)

    ranges = partition_ranges(bootstrap, read_topics)
    counter = FlowProgress("replay", interval_s=30.0)
    config = BlocksFlowConfig(bootstrap=bootstrap, store_url=store_url, features=subset,
                              topics=read_topics, bounded=True, lateness_ms=lateness_ms,
                              warehouse=warehouse, late_writer="replay",
                              event_range=(from_ts, to_ts if to_ts is not None else END))
    done = threading.Event()
    start = time.monotonic()

    def snapshot(finished: bool = False) -> ReplayProgress:
        read = counter.offsets()
        by_topic: dict[str, tuple[int, int]] = {}
        for part, (low, high) in ranges.items():
            topic = part.rsplit(":", 1)[0]
            got = min(max(read.get(part, low) - low, 0), high - low)
            d, t = by_topic.get(topic, (0, 0))
            by_topic[topic] = (d + got, t + high - low)
        return ReplayProgress(
            done=sum(d for d, _ in by_topic.values()), total=sum(t for _, t in by_topic.values()),
            by_topic=by_topic, events=counter.events, elapsed_s=time.monotonic() - start,
            finished=finished)

    def watch() -> None:
        while not done.wait(1.0):
            if progress is not None:
                progress(snapshot())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_flow(build_blocks_flow(config, progress=counter))
    finally:
        done.set()
        watcher.join(timeout=5)
    with open_store(store_url) as store:
        store.set_watermarks({replaymarks.done_key(f.key): run_id for f in specs})
    if progress is not None:
        progress(snapshot(finished=True))
    return ReplayReport(tuple(f.name for f in specs), read_topics, from_ts, to_ts, kafka_from,
                        fallback, time.perf_counter() - t0, events=counter.events,
                        blocks_written=counter.blocks_written)
