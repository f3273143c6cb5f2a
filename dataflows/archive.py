"""The raw archive dataflow: every Kafka event -> Iceberg ``raw_<topic>``, exactly once.

    kafka (KafkaBatchSource from the committed offsets; lateness ignored: late events kept)
      │   + a tick when a partition is idle, so a quiet stream still commits on time
      └─ ArchiveSink (per worker, per topic):
           dead letters ──────────────▶ deadletter topic (produced + flushed on arrival)
           events ─ accumulate ─ every commit_interval_ms or max_batch_events, and at the end:
                 RawTables.append(events, offsets of every partition)   ◀ ONE Iceberg commit

Exactly once, without Bytewax recovery: the Iceberg commit IS the checkpoint. A commit holds
the events and, in its snapshot summary, the next offset of every partition, so both become
visible together. At start the source reads from the committed offsets. A crash between
commits loses only in-memory work, which the restarted worker reads again from Kafka. Dead
letters are produced and flushed before the commit that moves past them, so they are at least
once (a crash between the two repeats them), never lost.

Workers: ``op.output`` with a ``DynamicSink`` runs on the worker that produced the item (no
exchange step between source and sink: Bytewax connects them with a pipeline channel), so
each Kafka partition's batches reach one sink partition, in order. Each sink commits the
partitions its worker reads, merged with the offsets other workers committed; it also passes
the offsets it believes committed, so if a partition were ever written by two writers (a
zombie process) the commit is refused (``OffsetConflictError``) rather than duplicating or
skipping events. ``-w N`` and ``-i/-a`` clusters are therefore safe; commits of workers to the
same table serialize (process lock, then Iceberg's optimistic commit with retry).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflows.kafka_source import KafkaBatchSource, PartitionCursor, SourceBatch
from dataflows.progress import FlowProgress
from dataflows.sinks import DeadLetterSink
from features.offline.raw import OffsetConflictError
from features.offline.tables import OfflineTableError
from schemas.columnar import EventColumns, concat_columns
from schemas.registry import TOPICS, event_topics, is_event_topic
from tessera.logs import get_logger

log = get_logger("dataflows.archive")

__all__ = ["ArchiveFlowConfig", "ArchiveSink", "ArchiveTick", "build_archive_flow",
           "committed_start_offsets"]


@dataclass(frozen=True, kw_only=True)
class ArchiveFlowConfig:
    """Everything an archive worker needs; frozen and validated at definition.

    Args:
        bootstrap: Kafka bootstrap servers.
        warehouse: directory of the Iceberg warehouse (SQLite catalog inside).
        topics: event topics to archive (any of views, engagements, impressions, items).
        bounded: stop at the end of the topics (committing what is left) instead of tailing.
        commit_interval_ms: longest time events wait in memory before their commit.
        max_batch_events: events of one topic that trigger a commit before the interval.
        batch_messages: Kafka messages per consume call (each may be a batch envelope).
        deadletter_topic: where undecodable messages go.
    """

    bootstrap: str
    warehouse: Path
    topics: tuple[str, ...] = TOPICS
    bounded: bool = False
    commit_interval_ms: int = 5000
    max_batch_events: int = 200_000
    batch_messages: int = 500
    deadletter_topic: str = "deadletter"

    def __post_init__(self) -> None:
        object.__setattr__(self, "topics", tuple(self.topics))
        object.__setattr__(self, "warehouse", Path(self.warehouse))
        if not self.topics:
            raise ValueError(f"topics must name at least one of {list(event_topics())}, got ()")
        unknown = [t for t in self.topics if not is_event_topic(t)]
        if unknown:
            raise ValueError(f"topics {unknown} have no raw table; archive any of "
                             f"{list(event_topics())} (declare other sources in the features "
                             "file and pass it with --features)")
        if len(set(self.topics)) != len(self.topics):
            raise ValueError(f"topics must not repeat, got {list(self.topics)}")
        for name in ("commit_interval_ms", "max_batch_events", "batch_messages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @property
    def tick_ms(self) -> int:
        """How often an idle source partition emits a tick (so pending work gets committed)."""
        return max(20, min(self.commit_interval_ms, 1000))


@dataclass(frozen=True)
class ArchiveTick:
    """Emitted by an idle source partition: lets the sink check its commit deadline."""


_TICK = ArchiveTick()


def committed_start_offsets(
    warehouse: Path, topics: tuple[str, ...]
) -> dict[str, dict[int, int]]:
    """Return ``{topic: {partition: next offset}}`` committed in the raw tables."""
    from features.offline.raw import RawTables

    tables = RawTables.open(warehouse)
    return {t: tables.committed_offsets(t) for t in topics}


# ---------------------------------------------------------------- source with idle ticks


class _TickingPartition(StatefulSourcePartition[Any, PartitionCursor]):
    def __init__(self, inner: StatefulSourcePartition[SourceBatch, PartitionCursor],
                 tick_ms: int):
        self._inner = inner
        self._tick_s = tick_ms / 1000
        self._last = time.monotonic()

    def next_batch(self) -> list[Any]:
        batches = self._inner.next_batch()  # StopIteration ends the partition
        now = time.monotonic()
        if batches:
            self._last = now
            return batches
        if now - self._last >= self._tick_s:
            self._last = now
            return [_TICK]
        return []

    def next_awake(self) -> datetime | None:
        return self._inner.next_awake()

    def snapshot(self) -> PartitionCursor:
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class _TickingSource(FixedPartitionedSource[Any, PartitionCursor]):
    """``KafkaBatchSource`` whose idle partitions emit an :class:`ArchiveTick` every tick_ms."""

    def __init__(self, inner: KafkaBatchSource, tick_ms: int):
        self.inner = inner
        self.tick_ms = tick_ms

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str,
                   resume_state: PartitionCursor | None) -> _TickingPartition:
        return _TickingPartition(self.inner.build_part(step_id, for_part, resume_state),
                                 self.tick_ms)


# ---------------------------------------------------------------- sink


@dataclass
class _Pending:
    """Events of one topic read but not yet committed, and the offsets they advance to."""

    parts: list[EventColumns] = field(default_factory=list)
    partition_ids: list[np.ndarray] = field(default_factory=list)
    offsets: list[np.ndarray] = field(default_factory=list)
    next_offsets: dict[int, int] = field(default_factory=dict)
    resets: set[int] = field(default_factory=set)  # partitions whose log was reset
    events: int = 0
    since: float = 0.0  # monotonic time the first uncommitted batch arrived


class _ArchivePartition(StatelessSinkPartition[Any]):
    def __init__(self, config: ArchiveFlowConfig, start: dict[str, dict[int, int]],
                 deadletters: StatelessSinkPartition[Any], worker_index: int):
        from features.offline.raw import RawTables

        self.config = config
        self.tables = RawTables.open(config.warehouse)
        # What this writer believes committed, per topic and partition (None: never).
        self.committed: dict[str, dict[int, int | None]] = {
            t: dict(start.get(t, {})) for t in config.topics
        }
        self.pending: dict[str, _Pending] = {}
        self.deadletters = deadletters
        self.worker = worker_index
        self.rows_written = 0
        self.commits = 0
        self.failed = False

    def write_batch(self, items: list[Any]) -> None:
        dead = []
        now = time.monotonic()
        for item in items:
            if not isinstance(item, SourceBatch):
                continue  # a tick: only the deadline check below
            dead.extend(item.deadletters)
            pend = self.pending.get(item.topic)
            if pend is None:
                pend = self.pending[item.topic] = _Pending(since=now)
            if item.columns.n:
                pend.parts.append(item.columns)
                pend.partition_ids.append(np.full(item.columns.n, item.partition, np.int32))
                offsets = item.offsets
                if offsets is None:
                    raise ValueError(f"batch of {item.part} carries no per-event offsets")
                pend.offsets.append(offsets)
                pend.events += item.columns.n
            pend.next_offsets[item.partition] = item.next_offset
            if item.log_reset:
                # the broker's log restarted (an empty embedded broker): offsets go back
                pend.resets.add(item.partition)
                log.warning("archive_log_reset", topic=item.topic, partition=item.partition,
                            committed=self.committed[item.topic].get(item.partition),
                            new_offset=item.first_offset)
        if dead:
            # Flushed before any commit that moves past them: never lost.
            self.deadletters.write_batch(dead)
        for topic, pend in list(self.pending.items()):
            due = now - pend.since >= self.config.commit_interval_ms / 1000
            if due or pend.events >= self.config.max_batch_events:
                self._commit_or_fail(topic)

    def _commit_or_fail(self, topic: str) -> None:
        """Commit, or stop this writer for good with one clear error (nothing is lost: the
        uncommitted events stay in Kafka and are read again after a restart)."""
        try:
            self._commit(topic)
        except Exception as exc:
            self.failed = True
            self.pending.clear()
            if isinstance(exc, OffsetConflictError):
                raise  # already names the other writer
            log.error("archive_commit_failed", topic=topic, error=str(exc)[:300])
            raise OfflineTableError(
                f"archive commit of {topic} failed: {exc}; nothing was committed for it, and "
                "its events are read again from Kafka when the worker restarts"
            ) from exc

    def _commit(self, topic: str) -> None:
        pend = self.pending.pop(topic, None)
        if pend is None:
            return
        committed = self.committed[topic]
        moved = {p: o for p, o in pend.next_offsets.items() if committed.get(p) != o}
        if not moved and not pend.events:
            return
        t0 = time.monotonic()
        cols = concat_columns(pend.parts, topic=topic)
        pids = np.concatenate(pend.partition_ids) if pend.parts else np.zeros(0, np.int32)
        offs = np.concatenate(pend.offsets) if pend.parts else np.zeros(0, np.int64)
        rows = self.tables.append(
            topic, cols, pids, offs, pend.next_offsets,
            expected_offsets={p: committed.get(p) for p in pend.next_offsets},
            reset_partitions=pend.resets,
        )
        committed.update(pend.next_offsets)
        self.rows_written += rows
        self.commits += 1
        log.info("archive_commit", topic=topic, rows=rows, worker=self.worker,
                 offsets=dict(sorted(pend.next_offsets.items())),
                 ms=round((time.monotonic() - t0) * 1000))

    def close(self) -> None:
        try:
            if not self.failed:  # after a failed commit, a retry here would fail the same way
                for topic in list(self.pending):
                    self._commit_or_fail(topic)
        finally:
            self.deadletters.close()
        log.info("archive_closed", worker=self.worker, rows=self.rows_written,
                 commits=self.commits)


class ArchiveSink(DynamicSink[Any]):
    """Accumulate source batches per topic and commit them with their offsets to Iceberg.

    ``start``: ``{topic: {partition: offset}}`` the source started from (what each commit
    expects to find committed for the partitions it moves).
    """

    def __init__(self, config: ArchiveFlowConfig, start: dict[str, dict[int, int]]):
        self.config = config
        self.start = start

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ArchivePartition:
        dl = DeadLetterSink(self.config.bootstrap, self.config.deadletter_topic)
        return _ArchivePartition(self.config, self.start,
                                 dl.build(step_id, worker_index, worker_count), worker_index)


def build_archive_flow(config: ArchiveFlowConfig, progress: FlowProgress | None = None
                       ) -> Dataflow:
    """Build the archive dataflow, starting every partition at its committed offset.

    Reads the committed offsets once, here: the source starts from them and the sink expects
    them, so a restart resumes exactly where the last commit ended.
    """
    start = committed_start_offsets(config.warehouse, config.topics)
    log.info("archive_start", topics=list(config.topics),
             committed={t: dict(sorted(o.items())) for t, o in start.items()})
    source = KafkaBatchSource(
        bootstrap=config.bootstrap,
        topics=config.topics,
        lateness=0,  # unused: the archive keeps late events like any other
        bounded=config.bounded,
        batch_messages=config.batch_messages,
        start_offsets={f"{t}:{p}": o for t, offs in start.items() for p, o in offs.items()},
    )
    flow = Dataflow("archive")
    batches = op.input("kafka", flow, _TickingSource(source, config.tick_ms))
    counter = progress or FlowProgress("archive")
    op.inspect("progress", batches,
               lambda _step, b: counter.observe(b) if isinstance(b, SourceBatch) else None)
    op.output("raw", batches, ArchiveSink(config, start))
    return flow
