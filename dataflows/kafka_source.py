"""A Bytewax source that reads Kafka partitions as decoded columnar batches.

Each Kafka partition is one Bytewax source partition: its resume state is the next offset
plus the partition's running maximum event time, so after a crash both the position and the
late/on-time decision of every event replay exactly. Each ``next_batch`` returns at most one
``SourceBatch``: the decoded events of up to ``batch_size`` messages (batch envelopes
decode with numpy; single-event messages through fastavro), the late mask, the partition
watermark, and the dead letters of anything that failed to decode.

In bounded mode a partition ends at librdkafka's partition EOF (on the embedded broker this
fires only after every acknowledged record was delivered; its high watermark is not used).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from features.blockstate import classify_late
from schemas.codec import DeadLetter
from schemas.columnar import EventColumns, concat_columns, decode_message, empty_columns
from schemas.errors import SchemaError
from tessera.topics import consumer_config, list_topics

NO_TIME = -(2**62)


@dataclass(frozen=True)
class PartitionCursor:
    """Resume state of one source partition."""

    offset: int
    max_ts: int = NO_TIME


@dataclass
class SourceBatch:
    """Decoded events of consecutive messages of one partition."""

    topic: str
    partition: int
    columns: EventColumns
    late: np.ndarray
    watermark: int
    first_offset: int
    next_offset: int
    deadletters: list[DeadLetter] = field(default_factory=list)
    offsets: np.ndarray | None = None  # offset of each event's message

    @property
    def part(self) -> str:
        """``topic:partition``: the key partition watermarks are tracked by."""
        return f"{self.topic}:{self.partition}"


class _KafkaPartition(StatefulSourcePartition[SourceBatch, PartitionCursor]):
    def __init__(self, source: KafkaBatchSource, topic: str, partition: int,
                 cursor: PartitionCursor):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self._source = source
        self._topic = topic
        self._partition = partition
        self._cursor = cursor
        config = consumer_config(source.bootstrap, partition_eof=source.bounded,
                                 **source.consumer_overrides)
        self._consumer = Consumer(config)
        start = cursor.offset if cursor.offset >= 0 else OFFSET_BEGINNING
        self._consumer.assign([TopicPartition(topic, partition, start)])
        self._eof = False
        self._idle_since = time.monotonic()

    def next_batch(self) -> list[SourceBatch]:
        from confluent_kafka import KafkaError

        if self._eof:
            raise StopIteration()
        msgs = self._consumer.consume(self._source.batch_messages, timeout=self._source.poll_s)
        parts: list[EventColumns] = []
        part_offsets: list[np.ndarray] = []
        dead: list[DeadLetter] = []
        first = None
        next_offset = self._cursor.offset
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._eof = self._source.bounded
                    continue
                raise RuntimeError(f"kafka error on {self._topic}:{self._partition}: {err}")
            off = m.offset()
            first = off if first is None else first
            next_offset = off + 1
            payload = m.value() or b""
            try:
                cols = decode_message(payload, self._topic)
            except (SchemaError, ValueError) as exc:
                dead.append(DeadLetter(
                    topic=self._topic, partition=self._partition, offset=off,
                    payload=payload, key=m.key(), reason=str(exc), stage="decode",
                    failed_ts=int(time.time() * 1000)))
                continue
            parts.append(cols)
            part_offsets.append(np.full(len(cols), off, dtype=np.int64))
        if first is None:
            if self._eof:
                raise StopIteration()
            beat = self._source.idle_heartbeat_ms
            if beat is not None and (time.monotonic() - self._idle_since) * 1000 >= beat:
                # an empty batch: lets downstream timers (sink commits) run while idle
                self._idle_since = time.monotonic()
                wm = self._cursor.max_ts
                return [SourceBatch(
                    topic=self._topic, partition=self._partition,
                    columns=empty_columns(self._topic), late=np.zeros(0, dtype=bool),
                    watermark=wm - self._source.lateness if wm > NO_TIME else NO_TIME,
                    first_offset=self._cursor.offset, next_offset=self._cursor.offset,
                    offsets=np.zeros(0, np.int64))]
            return []
        self._idle_since = time.monotonic()
        cols = (concat_columns(parts, topic=self._topic, dedupe=False) if parts
                else empty_columns(self._topic))
        ts = np.asarray(cols.columns["event_ts"], dtype=np.int64)
        late, new_max = classify_late(self._cursor.max_ts, ts, self._source.lateness)
        self._cursor = PartitionCursor(offset=next_offset, max_ts=new_max)
        stop = self._source.stop_at_ts
        if stop is not None and new_max - self._source.lateness >= stop:
            self._eof = True  # every later on-time event is at or after stop_at_ts
        return [SourceBatch(
            topic=self._topic, partition=self._partition, columns=cols, late=late,
            watermark=new_max - self._source.lateness if new_max > NO_TIME else NO_TIME,
            first_offset=first, next_offset=next_offset, deadletters=dead,
            offsets=np.concatenate(part_offsets) if part_offsets else np.zeros(0, np.int64),
        )]

    def next_awake(self) -> datetime | None:
        return None

    def snapshot(self) -> PartitionCursor:
        return self._cursor

    def close(self) -> None:
        self._consumer.close()


class KafkaBatchSource(FixedPartitionedSource[SourceBatch, PartitionCursor]):
    """Read ``topics`` as columnar ``SourceBatch`` items, one Bytewax partition per Kafka one.

    Args:
        bootstrap: Kafka bootstrap servers.
        topics: topics to read.
        lateness: allowed lateness in ms (events further behind their partition's running
            maximum are marked late).
        bounded: stop each partition at its end instead of tailing.
        batch_messages: messages per consume call (each may be a batch envelope).
        start_offsets: optional ``{"topic:p": offset}`` for a first run (replay).
        stop_at_ts: end a partition once its watermark passes this event time (replay of a
            range): every on-time event after it is at or after ``stop_at_ts``.
        idle_heartbeat_ms: when a partition has had nothing to read for this long, emit an
            empty batch so timers downstream (sink commits) run while the topic is idle.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Sequence[str],
        lateness: int,
        bounded: bool = False,
        batch_messages: int = 500,
        poll_s: float = 0.05,
        start_offsets: dict[str, int] | None = None,
        consumer_overrides: dict[str, Any] | None = None,
        stop_at_ts: int | None = None,
        idle_heartbeat_ms: int | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = tuple(topics)
        self.lateness = int(lateness)
        self.bounded = bounded
        self.batch_messages = batch_messages
        self.poll_s = poll_s
        self.start_offsets = dict(start_offsets or {})
        self.consumer_overrides = dict(consumer_overrides or {})
        self.stop_at_ts = stop_at_ts
        self.idle_heartbeat_ms = idle_heartbeat_ms

    def partition_keys(self) -> list[str]:
        """Every ``topic:partition`` this source reads."""
        known = list_topics(self.bootstrap)
        missing = [t for t in self.topics if t not in known]
        if missing:
            raise RuntimeError(
                f"topics {missing} do not exist at {self.bootstrap}; create them with "
                "`tessera topics create`"
            )
        return [f"{t}:{p}" for t in self.topics for p in range(known[t])]

    def list_parts(self) -> list[str]:
        return self.partition_keys()

    def build_part(self, step_id: str, for_part: str,
                   resume_state: PartitionCursor | None) -> _KafkaPartition:
        topic, p = for_part.rsplit(":", 1)
        cursor = resume_state or PartitionCursor(offset=self.start_offsets.get(for_part, -1))
        return _KafkaPartition(self, topic, int(p), cursor)


def utc_now() -> datetime:
    """Current time, timezone-aware (Bytewax notifications need aware datetimes)."""
    return datetime.now(UTC)


def after(ms: int) -> datetime:
    """The aware datetime ``ms`` milliseconds from now."""
    return utc_now() + timedelta(milliseconds=ms)
