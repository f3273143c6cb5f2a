"""The blocks dataflow: Kafka events -> event-time blocks in the online store (and Iceberg).

    kafka (KafkaBatchSource: decode, late mask, partition watermark)
      ├─ dead letters ───────────────────────────────▶ deadletter topic
      ├─ late events ────────────────────────────────▶ Iceberg late_events
      └─ route: per (topic, entity field) × shard ───▶ stateful BlockShard
                                                         └─▶ StoreSink: store blocks +
                                                             watermarks, sealed -> Iceberg

The flow is thin: aggregation, lateness and sealing live in ``features.blockstate``.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulLogic

from dataflows.kafka_source import (
    NO_TIME,
    KafkaBatchSource,
    SourceBatch,
    aligned_after,
    utc_now,
)
from dataflows.progress import FlowProgress
from dataflows.sinks import DeadLetterSink, ShardOutput, StoreSink, output_late_events
from features.blockstate import BlockShard, BlockShardConfig, BlockShardState
from features.spec import FeatureSet
from features.tiling import retention
from schemas.columnar import EventColumns
from tessera.logs import get_logger

log = get_logger("dataflows.blocks")
_PROGRESS = FlowProgress("blocks")


@dataclass(frozen=True, kw_only=True)
class BlocksFlowConfig:
    """Everything a blocks worker needs; frozen and validated at definition."""

    bootstrap: str
    store_url: str
    features: FeatureSet
    topics: tuple[str, ...] = ()
    shards: int = 4
    lateness_ms: int = 60_000
    flush_interval_ms: int = 1_000
    #: flush interval while replaying a backlog (see ``BlockShardLogic``); None: 30x
    #: ``flush_interval_ms``
    catchup_flush_interval_ms: int | None = None
    bounded: bool = False
    warehouse: Path | None = None
    #: where late events are kept (the ``late_events`` table); None: ``warehouse``
    late_warehouse: Path | None = None
    #: the name this flow's late-event commits are marked with (exactly once per writer:
    #: ``LateEventSink``); a replay uses its own, so it never skips what the live flow has
    #: not written yet
    late_writer: str = "blocks"
    deadletter_topic: str = "deadletter"
    #: most messages per Kafka poll: one event each from real producers, so polls are large
    batch_messages: int = 5_000
    #: events aimed for per poll (fewer messages when they are batch envelopes)
    batch_events: int = 20_000
    #: events further ahead of the wall clock are dead-lettered (None: no check)
    max_future_ms: int | None = 3_600_000
    #: a partition with no event for this long stops holding the watermark back (bounded:
    #: one that ends without an event); None: never (``KafkaBatchSource.idle_timeout_ms``)
    idle_timeout_ms: int | None = 300_000
    start_offsets: dict[str, int] = field(default_factory=dict)
    event_range: tuple[int, int] | None = None  # replay: only events in [from, to) count

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if self.lateness_ms < 0:
            raise ValueError(f"lateness_ms must be >= 0, got {self.lateness_ms}")
        if not self.topics:
            object.__setattr__(self, "topics", self.features.sources)
        short = {t: ms for t, ms in self.features.deduplicate.items()
                 if t in self.topics and ms < self.lateness_ms}
        if short:
            raise ValueError(f"deduplicate horizons {short} (ms) are shorter than the allowed "
                             f"lateness ({self.lateness_ms} ms): a late copy of an event "
                             "could be counted again; lengthen them in the features file")
        unknown = [t for t in self.topics if not self.features.for_source(t)]
        if unknown:
            raise ValueError(f"no feature reads topics {unknown}; features read "
                             f"{list(self.features.sources)}")

    def retention(self) -> dict[tuple[str, str], dict[int, int]]:
        """Per (entity type, family) and block size, how long blocks must be kept (ms)."""
        out: dict[tuple[str, str], dict[int, int]] = {}
        for topic in self.topics:
            by_type: dict[str, list] = {}
            for f in self.features.for_source(topic):
                by_type.setdefault(f.entity_type, []).append(f)
            for etype, feats in by_type.items():
                keep: dict[int, int] = {}
                for f in feats:
                    for size, ms in retention(f.windows, f.block_sizes).items():
                        keep[size] = max(keep.get(size, 0), ms + self.lateness_ms)
                out[(etype, topic)] = keep
        return out

    @cached_property
    def deduplicate(self) -> dict[str, int]:
        """Per topic this flow reads, the horizon its event ids are counted once within
        (``deduplicate:`` in the features file)."""
        return {t: ms for t, ms in self.features.deduplicate.items() if t in self.topics}

    @cached_property
    def entity_fields(self) -> dict[str, tuple[str, ...]]:
        """Per topic, the entity fields its features aggregate on (the routing, computed once)."""
        out: dict[str, tuple[str, ...]] = {}
        for topic in self.topics:
            out[topic] = tuple(dict.fromkeys(f.entity for f in self.features.for_source(topic)))
        return out

    @cached_property
    def fields(self) -> dict[str, tuple[str, ...]]:
        """Per topic, the event fields the flow reads: time, entities, values, filters.

        The source decodes only these (late and rejected events are decoded again in full).
        """
        from features.expressions import parse_filter

        out: dict[str, tuple[str, ...]] = {}
        for topic in self.topics:
            names = {"event_ts"}
            for f in self.features.for_source(topic):
                names.add(f.entity)
                if f.value:
                    names.add(f.value)
                if f.filter:
                    names |= set(parse_filter(f.filter).fields)
            out[topic] = tuple(sorted(names))
        return out

    def sealed_writer(self) -> str:
        """The name this flow's sealed-block commits are marked with (``StoreSink``).

        The live flow is ``late_writer`` (``blocks``); any other (a replay) adds a digest of
        its features and event range, whose blocks no other run writes: a replay re-run
        after a crash skips what it committed, and never what another replay did.
        """
        if self.late_writer == "blocks":
            return "blocks"
        what = json.dumps([sorted(f.key for f in self.features.features), self.event_range])
        return f"{self.late_writer}-{hashlib.sha256(what.encode()).hexdigest()[:10]}"

    def shard_configs(self) -> dict[tuple[str, str], BlockShardConfig]:
        """One shard config per (topic, entity field) that features aggregate on."""
        out: dict[tuple[str, str], BlockShardConfig] = {}
        for topic in self.topics:
            by_entity: dict[str, list] = {}
            for f in self.features.for_source(topic):
                by_entity.setdefault(f.entity, []).append(f)
            for entity, feats in by_entity.items():
                out[(topic, entity)] = BlockShardConfig(
                    topic=topic, entity_field=entity, features=tuple(feats))
        return out


@dataclass
class ShardInput:
    """The events of one source batch that belong to one shard, plus the partition watermark."""

    part: str
    columns: EventColumns
    watermark: int


def shard_of(values: np.ndarray, shards: int) -> np.ndarray:
    """Stable shard of each string (crc32), identical in every process."""
    return np.fromiter((zlib.crc32(v.encode()) % shards for v in values.tolist()),
                       dtype=np.int64, count=len(values))


def route(config: BlocksFlowConfig, batch: SourceBatch) -> list[tuple[str, tuple[str, ShardInput]]]:
    """Split a batch's on-time events by (entity field, shard); every shard gets the watermark."""
    keep = ~batch.late
    if config.event_range is not None:
        ts = np.asarray(batch.columns.columns["event_ts"])
        keep &= (ts >= config.event_range[0]) & (ts < config.event_range[1])
    on_time = batch.columns if keep.all() else batch.columns.filter(keep)
    out = []
    topic = batch.topic
    for entity in config.entity_fields.get(topic, ()):
        col = on_time.columns[entity]
        dict_shard = np.append(shard_of(col.dictionary, config.shards), -1)
        ev_shard = dict_shard[np.asarray(col.codes)]
        for s in range(config.shards):
            idx = np.flatnonzero(ev_shard == s)
            cols = on_time.take(idx)
            key = f"{topic}/{entity}/{s}"
            out.append((key, (key, ShardInput(batch.part, cols, batch.watermark))))
    return out


#: catching up, a shard writes this many times less often than live: each flush rewrites
#: the record of every entity it touched, so on a uniform high-cardinality backlog (500k
#: users) 30x cut the writes of a 2M-event replay by about half against 10x
CATCHUP_FLUSH_FACTOR = 30


class BlockShardLogic(StatefulLogic[ShardInput, ShardOutput, BlockShardState]):
    """Bytewax glue around ``BlockShard``: fold items, flush on a timer and at EOF.

    The timer is ``flush_ms`` while the shard is live, and ``catchup_flush_ms`` while it is
    catching up (replaying a backlog: its newest event is more than ``CATCHUP_LAG_MS`` older
    than the wall clock), and aligned to the wall clock (``aligned_after``): the shards of a
    worker flush in the same instant, so the sink writes them in one pass over each family's
    key range. Freshness only means something near the present; in a backlog,
    rewriting every touched entity's record each second is the dominant cost and buys
    nothing, so writes are batched further apart. The blocks written are the same.
    """

    CATCHUP_LAG_MS = 30_000
    #: flush early once this many blocks wait to be written: a flush's batch (and the
    #: store merge it feeds) stays bounded in memory however long the interval
    MAX_DIRTY_BLOCKS = 2_000_000

    def __init__(self, shard: BlockShard, key: str, parts: list[str], flush_ms: int,
                 catchup_flush_ms: int | None = None, lateness_ms: int = 0,
                 resend_sealed: bool = True, retention: Mapping[int, int] | None = None):
        self.shard = shard
        self.resend_sealed = resend_sealed  # sealed blocks feed the offline table
        #: {block size: ms} the store keeps behind the watermark (the sink's retention);
        #: without an offline table, older blocks are never serialized or written
        self.retention = dict(retention or {})
        self.key = key
        self.parts = parts
        self.flush_ms = flush_ms
        self.catchup_flush_ms = max(flush_ms, catchup_flush_ms or flush_ms)
        self.lateness_ms = lateness_ms
        self.next_flush = aligned_after(flush_ms)

    def _interval(self) -> int:
        newest = max((self.shard.state.partition_watermarks.get(p, NO_TIME) for p in self.parts),
                     default=NO_TIME)
        if newest <= NO_TIME:
            return self.flush_ms
        behind = utc_now().timestamp() * 1000 - (newest + self.lateness_ms)
        return self.catchup_flush_ms if behind > self.CATCHUP_LAG_MS else self.flush_ms

    def _flush(self) -> list[ShardOutput]:
        wm = self.shard.watermark(self.parts)
        expire = ({size: wm - ms for size, ms in self.retention.items()}
                  if self.retention and wm > NO_TIME // 2 else None)
        flushed = self.shard.flush(wm, resend_sealed=self.resend_sealed, expire=expire)
        self.next_flush = aligned_after(self._interval())
        cfg = self.shard.config
        return [ShardOutput(entity_type=cfg.entity_type, family=cfg.topic, flush=flushed,
                            watermark_key=f"blocks/{self.key}", watermark=wm, shard=self.key)]

    def on_item(self, value: ShardInput):
        self.shard.add_batch(value.columns)
        self.shard.advance(value.part, value.watermark)
        if datetime.now(self.next_flush.tzinfo) >= self.next_flush or \
                self.shard.dirty_blocks() >= self.MAX_DIRTY_BLOCKS:
            return self._flush(), StatefulLogic.RETAIN
        return [], StatefulLogic.RETAIN

    def on_notify(self):
        return self._flush(), StatefulLogic.RETAIN

    def on_eof(self):
        return self._flush(), StatefulLogic.RETAIN

    def notify_at(self) -> datetime:
        return self.next_flush

    def snapshot(self) -> BlockShardState:
        return self.shard.snapshot()


def build_blocks_flow(config: BlocksFlowConfig, progress: FlowProgress | None = None
                      ) -> Dataflow:
    """Return the Bytewax dataflow for ``config`` (run it with ``bytewax.run.cli_main``).

    ``progress`` (default: one shared by the flows of this process) counts every source batch
    and logs a ``blocks.progress`` line every few seconds.
    """
    source = KafkaBatchSource(
        bootstrap=config.bootstrap, topics=config.topics, lateness=config.lateness_ms,
        bounded=config.bounded, batch_messages=config.batch_messages,
        batch_events=config.batch_events, fields=config.fields,
        start_offsets=config.start_offsets,
        stop_at_ts=config.event_range[1] if config.event_range else None,
        max_future_ms=config.max_future_ms, validate=True,
        idle_timeout_ms=config.idle_timeout_ms, deduplicate=config.deduplicate,
    )
    parts_by_topic: dict[str, list[str]] = {}
    for p in source.partition_keys():
        parts_by_topic.setdefault(p.split(":")[0], []).append(p)
    shard_cfgs = config.shard_configs()
    catchup_ms = config.catchup_flush_interval_ms or CATCHUP_FLUSH_FACTOR * config.flush_interval_ms
    retention_ms = config.retention()

    def builder_for(key: str):
        topic, entity, _ = key.split("/")
        cfg = shard_cfgs[(topic, entity)]

        def build(state: BlockShardState | None) -> BlockShardLogic:
            return BlockShardLogic(cfg.build(state), key, parts_by_topic[topic],
                                   config.flush_interval_ms, catchup_ms, config.lateness_ms,
                                   resend_sealed=config.warehouse is not None,
                                   retention=retention_ms.get((cfg.entity_type, topic)))
        return build

    counter = progress or _PROGRESS
    flow = Dataflow("tessera_blocks")
    batches = op.input("kafka", flow, source)
    op.inspect("progress", batches, lambda _step, b: counter.observe(b))
    dead = op.flat_map("deadletters", batches, lambda b: b.deadletters)
    op.output("deadletter_out", dead, DeadLetterSink(config.bootstrap, config.deadletter_topic))
    late_warehouse = config.late_warehouse or config.warehouse
    if late_warehouse is not None:
        # batches with late events, and a reset log's first batch (its offsets restart)
        late = op.filter_map("late", batches,
                             lambda b: b if b.late.any() or b.log_reset else None)
        output_late_events("late_out", late, late_warehouse, config.late_writer)
    keyed = op.flat_map("route", batches, lambda b: route(config, b))
    blocks = op.stateful("blocks", keyed, _KeyedBuilder(builder_for))
    op.output("store_out", blocks, StoreSink(config.store_url, config.warehouse,
                                             writer=config.sealed_writer(),
                                             retention=config.retention(), progress=counter))
    return flow


class _KeyedBuilder:
    """Bytewax calls the builder with state only; the key rides in the state or the item.

    ``op.stateful`` builds logic lazily per key but does not pass the key, so each state
    carries its shard key and fresh logic is built on its first item (``_LazyShardLogic``).
    """

    def __init__(self, builder_for):
        self.builder_for = builder_for

    def __call__(self, state):
        return _LazyShardLogic(self.builder_for, state)


class _LazyShardLogic(StatefulLogic):
    def __init__(self, builder_for, state):
        self.builder_for = builder_for
        self.inner: BlockShardLogic | None = None
        if state is not None:
            key, inner_state = state
            self.inner = builder_for(key)(inner_state)

    def on_item(self, value):
        key, item = value
        if self.inner is None:
            self.inner = self.builder_for(key)(None)
        return self.inner.on_item(item)

    def on_notify(self):
        return self.inner.on_notify() if self.inner else ([], StatefulLogic.RETAIN)

    def on_eof(self):
        return self.inner.on_eof() if self.inner else ([], StatefulLogic.RETAIN)

    def notify_at(self):
        return self.inner.notify_at() if self.inner else None

    def snapshot(self):
        return (self.inner.key, self.inner.shard.snapshot()) if self.inner else None
