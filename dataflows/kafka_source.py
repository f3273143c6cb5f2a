"""A Bytewax source that reads Kafka partitions as decoded columnar batches.

Each Kafka partition is one Bytewax source partition: its resume state is the next offset
plus the partition's running maximum event time, so after a crash both the position and the
late/on-time decision of every event replay exactly. Each ``next_batch`` returns at most one
``SourceBatch``: the decoded events of up to ``batch_size`` messages, decoded together
(``schemas.bulk``: single-event messages field by field across the whole poll with numpy,
batch envelopes with ``np.frombuffer``), the late mask, the partition watermark, and the dead
letters of anything that failed to decode.

In bounded mode a partition ends at librdkafka's partition EOF (on the embedded broker this
fires only after every acknowledged record was delivered; its high watermark is not used).

Broker restarts (tail mode)
---------------------------
The embedded broker keeps its log in memory: stopped and started again on the same port, with
the topics created anew, a partition's log starts over at offset 0. Two things then go wrong
for a consumer that was tailing it:

* librdkafka 2.12 segfaults when its fetcher talks to the recreated topic under the old
  topic id (seen on Tansu: a Fetch answered "unknown topic" for the stale id, then a crash in
  ``rd_kafka_metadata_update_op``). A consumer created after the restart is fine.
* the consumer's position is past the end of the new log, and Tansu answers such fetches
  with nothing rather than ``OFFSET_OUT_OF_RANGE``, so ``auto.offset.reset`` never fires and
  the new events are never read.

So in tail mode a partition watches its consumer's ``error_cb``: on a transport or
all-brokers-down error it closes the consumer at once (before the broker can come back) and
discards what that consume call returned (the cursor covers only what was emitted, so nothing
is lost). It then checks the log, retrying until the broker answers, with a short-lived probe
consumer: the message at ``offset - 1`` (the last one emitted) must still be there with the
same fingerprint (a CRC of key, value and timestamp, kept in the cursor). Tansu's high
watermark is the first offset of the last batch plus one, so ``high < offset`` is normal on an
intact log: the probe then reads on from the last batch to the message or to the partition's
EOF. Missing or different means the log was reset: the partition logs ``source.log_reset``
and resumes from the log's start, keeping its running maximum event time (the watermark never
goes back). Either way a new consumer takes over. As a fallback for a restart no error
reported, an idle partition re-checks every ``VERIFY_IDLE_S`` seconds (a watermark query; the
probe only when the watermarks are ambiguous, and again every ``REVERIFY_S`` even when they
look unchanged: a recreated log can show the same offsets). The hot path is unchanged but for a
CRC of each batch's last message.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from features.blockstate import classify_late
from features.dedup import SeenIds
from features.interning import hash_strings
from features.watermarks import IDLE_WATERMARK
from schemas.bulk import decode_messages
from schemas.codec import DeadLetter
from schemas.columnar import DictColumn, EventColumns, empty_columns
from tessera.logs import get_logger
from tessera.topics import consumer_config, list_topics

log = get_logger("dataflows.kafka_source")

NO_TIME = -(2**62)


@dataclass(frozen=True)
class PartitionCursor:
    """Resume state of one source partition."""

    offset: int
    max_ts: int = NO_TIME
    #: fingerprint of the message at ``offset - 1`` (see :func:`message_fingerprint`); None
    #: when unknown (nothing read yet, or a snapshot from before this field existed)
    last_fp: int | None = None
    #: a deduplicated topic: the lowest offset of the messages whose event ids are still
    #: remembered (``SeenIds.oldest_offset``); a resumed partition reads again from here
    #: up to ``offset``, admitting the ids without emitting the events. -1: nothing to read.
    dedup_from: int = -1


def message_fingerprint(msg: Any) -> int:
    """A 64-bit fingerprint of a Kafka message: CRC-32 of key and value, and its timestamp."""
    _, ts = msg.timestamp()
    crc = zlib.crc32(msg.value() or b"", zlib.crc32(msg.key() or b""))
    return (crc << 32) | (int(ts) & 0xFFFFFFFF)


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
    #: the partition's log was reset under the source (a broker restarted empty) and this is
    #: the first batch read from the new log: offsets went back to ``first_offset``
    log_reset: bool = False
    #: when ``columns`` hold only some fields (a projected read): the poll's raw messages,
    #: and for each event its message and its position in that message
    messages: MessageRows | None = None
    #: events of this poll dropped as repeats of an event id seen within the horizon
    duplicates: int = 0

    @property
    def part(self) -> str:
        """``topic:partition``: the key partition watermarks are tracked by."""
        return f"{self.topic}:{self.partition}"

    def full_columns(self, rows: np.ndarray) -> tuple[EventColumns, np.ndarray]:
        """Every field of the events at ``rows``, and which of ``rows`` they are (a mask).

        A projected read decodes those messages again (see ``MessageRows.full_columns``).
        """
        rows = np.asarray(rows, np.int64)
        if self.messages is None:
            return self.columns.take(rows), np.ones(len(rows), dtype=bool)
        return self.messages.full_columns(self.topic, rows)


@dataclass
class MessageRows:
    """The raw messages of a projected poll and where each decoded event came from."""

    payloads: list[bytes]
    message: np.ndarray  # int64 per event: index into ``payloads``
    position: np.ndarray  # int64 per event: its place among its message's events

    def take(self, rows: np.ndarray) -> MessageRows:
        """The same messages, for the events at ``rows``."""
        return MessageRows(self.payloads, self.message[rows], self.position[rows])

    def full_columns(self, topic: str, rows: np.ndarray) -> tuple[EventColumns, np.ndarray]:
        """Decode the messages of ``rows`` with every field: those events, and a mask of rows.

        A message that no longer decodes in full (a field the projection skipped is malformed,
        e.g. invalid UTF-8) loses its events here: they are logged and left out of the mask.
        """
        rows = np.asarray(rows, np.int64)
        msgs, inv = np.unique(self.message[rows], return_inverse=True)
        full = decode_messages([self.payloads[m] for m in msgs.tolist()], topic)
        first = np.searchsorted(full.source_index, np.arange(len(msgs)))
        pick = first[inv] + self.position[rows]
        ok = pick < len(full.columns)
        ok[ok] &= full.source_index[pick[ok]] == inv[ok]
        if not ok.all():
            log.warning("source.full_decode_failed", topic=topic,
                        events=int((~ok).sum()), reasons=sorted(set(full.errors.values()))[:3])
        return full.columns.take(pick[ok]), ok


_INTACT, _RESET = "intact", "reset"


MAX_ID_BYTES = 256
"""Longest entity id an event may carry: entity ids are store keys (LMDB's limit is 511 bytes
for a whole key) and no real id is longer; a longer one is dead-lettered."""

ENTITY_ID_FIELDS = ("user_id", "item_id", "author_id")
"""The id fields features and sequences are keyed by (the ones checked against the limit)."""


def invalid_events(cols: EventColumns, now_ms: int,
                   max_future_ms: int | None) -> tuple[np.ndarray, dict[int, str]]:
    """Events a flow must not count: ``(mask, {row: reason} of the masked events)``.

    An event is invalid when its time is more than ``max_future_ms`` ahead of ``now_ms``
    (counted, it would push its partition's watermark into the future and make every real
    event after it late), or when an entity id is longer than :data:`MAX_ID_BYTES`.
    """
    bad = np.zeros(cols.n, dtype=bool)
    why: dict[int, str] = {}  # only the rejected rows: nothing is built for a clean batch
    if max_future_ms is not None and cols.n:
        ts = np.asarray(cols.columns["event_ts"], dtype=np.int64)
        ahead = ts > now_ms + max_future_ms
        if ahead.any():
            for i in np.flatnonzero(ahead).tolist():
                why[i] = (f"event_ts {ts[i]} is {ts[i] - now_ms} ms ahead of the wall clock "
                          f"(at most {max_future_ms} ms allowed): future-dated")
            bad |= ahead
    for name in ENTITY_ID_FIELDS:
        col = cols.columns.get(name)
        if not isinstance(col, DictColumn) or not len(col):
            continue
        words = col.dictionary.tolist()
        chars = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        long = chars > MAX_ID_BYTES  # a UTF-8 character is 1 to 4 bytes
        for k in np.flatnonzero(~long & (chars * 4 > MAX_ID_BYTES)).tolist():
            long[k] = len(words[k].encode()) > MAX_ID_BYTES
        if not long.any():
            continue
        rows = np.append(long, False)[np.asarray(col.codes)] & ~bad
        if rows.any():
            reason = f"{name} is longer than {MAX_ID_BYTES} bytes: not a valid id"
            why.update(dict.fromkeys(np.flatnonzero(rows).tolist(), reason))
            bad |= rows
    return bad, why


def admit_event_ids(seen: SeenIds, cols: EventColumns, ts: np.ndarray,
                    offset: int | None = None) -> np.ndarray:
    """Mask of the events whose ``event_id`` ``seen`` admits (an event without an id always
    counts); the ids are hashed once per distinct value of the column's dictionary.
    ``offset``: the first message's offset of the batch (``SeenIds.admit``)."""
    col = cols.columns["event_id"]
    if isinstance(col, DictColumn):
        codes = np.asarray(col.codes)
        dict_hashes = hash_strings(col.dictionary)
    else:  # a plain object column
        values = np.asarray(col, dtype=object)
        codes = np.where(values == None, -1, np.arange(len(values)))  # noqa: E711
        dict_hashes = hash_strings(np.where(codes >= 0, values, ""))
    has_id = codes >= 0
    fresh = np.ones(len(codes), dtype=bool)
    rows = np.flatnonzero(has_id)
    if len(rows):
        fresh[rows] = seen.admit(dict_hashes[codes[rows]], ts[rows], offset)
    return fresh


def rejected_deadletters(topic: str, partition: int, bad_cols: EventColumns,
                         offsets: np.ndarray, reasons: list[str]) -> list[DeadLetter]:
    """Dead letters (stage ``validate``) for rejected events, each re-encoded on its own.

    ``bad_cols`` holds every field of the rejected events; ``offsets`` and ``reasons`` are theirs.
    """
    from schemas.codec import encode
    from schemas.columnar import columns_to_records

    now = int(time.time() * 1000)
    out = []
    for rec, off, reason in zip(columns_to_records(bad_cols), offsets.tolist(), reasons,
                                strict=True):
        try:
            payload = encode(topic, rec)
        except Exception:  # the payload is evidence only; the reason says what was wrong
            payload = repr(rec).encode()
        out.append(DeadLetter(
            topic=topic, partition=partition, offset=int(off), payload=payload,
            key=None, reason=reason, stage="validate", failed_ts=now))
    return out


class _KafkaPartition(StatefulSourcePartition[SourceBatch, PartitionCursor]):
    #: an idle tailing partition checks its log this often (fallback for unreported restarts)
    VERIFY_IDLE_S = 10.0
    #: wait between checks while the broker does not answer
    VERIFY_RETRY_S = 0.5
    #: timeout of each broker request of a check; the probe read gets ``PROBE_READ_S``
    VERIFY_TIMEOUT_S = 1.0
    PROBE_READ_S = 3.0
    #: a check still failing after this long is logged (again every as long)
    VERIFY_WARN_S = 30.0
    #: an ambiguous log found intact is probed again after this long even if its offsets
    #: look the same: a log recreated by a restart can show the very same (low, high)
    #: (on Tansu, a log written in one batch always reads (0, 1))
    REVERIFY_S = 30.0

    def __init__(self, source: KafkaBatchSource, topic: str, partition: int,
                 cursor: PartitionCursor):
        self._source = source
        self._topic = topic
        self._partition = partition
        self._cursor = cursor
        self._tail = not source.bounded
        self._eof = False
        self._idle_since = time.monotonic()
        #: when this partition last read an event (idle timeout), and whether it is idle now
        self._records_at = time.monotonic()
        self._idle = False
        #: an idle partition is polled again at this time (``next_awake``), never blocking
        #: the worker's other partitions in ``consume``
        self._awake_at: datetime | None = None
        # tail mode: the log is checked (and the consumer replaced) when this is set
        self._suspect = False
        self._retry_at = 0.0
        self._suspect_since = 0.0
        self._warned_at = 0.0
        self._quiet_since = time.monotonic()
        # (low, high, offset) found intact, and when
        self._verified: tuple[int, int, int] | None = None
        self._verified_at = 0.0
        self._reset_pending = False  # the next emitted batch carries ``log_reset``
        self._events_per_message = 1.0  # running mean: sizes the next poll (envelopes)
        horizon = source.deduplicate.get(topic)
        #: event ids admitted within the horizon (rebuilt from the log on resume: the
        #: messages from ``cursor.dedup_from`` to ``cursor.offset`` are read again first)
        self._seen = SeenIds(horizon) if horizon else None
        #: while rebuilding: the next offset to re-read (-1: done, or nothing to rebuild)
        self._rewarm_at = cursor.dedup_from if (
            self._seen is not None and 0 <= cursor.dedup_from < cursor.offset) else -1
        self._rewarm_from = self._rewarm_at
        self._rewarmed = 0
        self._rewarm_t0 = 0.0
        self._consumer: Any = self._new_consumer()

    # -- consumers -------------------------------------------------------------------

    def _new_consumer(self) -> Any:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        source = self._source
        config = consumer_config(source.bootstrap, partition_eof=source.bounded,
                                 **source.consumer_overrides)
        if self._tail:
            config["error_cb"] = self._error_cb_for(config.get("error_cb"))
        consumer = Consumer(config)
        at = self._rewarm_at if self._rewarm_at >= 0 else self._cursor.offset
        start = at if at >= 0 else OFFSET_BEGINNING
        consumer.assign([TopicPartition(self._topic, self._partition, start)])
        return consumer

    def _error_cb_for(self, inner: Any) -> Any:
        from confluent_kafka import KafkaError

        broken = (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN)

        def error_cb(err: Any) -> None:
            if inner is not None:
                inner(err)
            if err.code() in broken:
                self._set_suspect()

        return error_cb

    def _drop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()

    # -- log checks (tail mode) ------------------------------------------------------

    def _probe_log(self) -> tuple[str | None, int]:
        """Check that the last message read is still in the log: ``(verdict, low)``.

        The verdict is ``"intact"``, ``"reset"``, or None when the broker did not answer (or
        the topic or partition does not exist yet); ``low`` is the log's first offset.
        """
        from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

        source = self._source
        config = consumer_config(source.bootstrap, fast=False,
                                 **{**source.consumer_overrides, "enable.partition.eof": True})
        probe = Consumer(config)
        tp = TopicPartition(self._topic, self._partition)
        try:
            try:
                meta = probe.list_topics(self._topic, timeout=self.VERIFY_TIMEOUT_S)
                topic = meta.topics.get(self._topic)
                if topic is None or topic.error is not None or \
                        self._partition not in topic.partitions:
                    return None, 0
                marks = probe.get_watermark_offsets(tp, timeout=self.VERIFY_TIMEOUT_S,
                                                    cached=False)
            except KafkaException:
                return None, 0
            if marks is None:
                return None, 0
            low, high = marks
            offset = self._cursor.offset
            if offset <= low:
                return _INTACT, low  # nothing read past the log's start
            if high <= low:
                return _RESET, low  # an empty log, but messages up to offset - 1 were read
            want = offset - 1
            # below ``high`` the offset is in the log; above, read on from the last batch
            # (Tansu's high watermark is that batch's first offset plus one)
            start = want if high >= offset else max(low, high - 1)
            probe.assign([TopicPartition(self._topic, self._partition, start)])
            deadline = time.monotonic() + self.PROBE_READ_S
            while time.monotonic() < deadline:
                for m in probe.consume(1000, timeout=0.1):
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            return _RESET, low  # the log ends before offset - 1
                        return None, low
                    if m.offset() < want:
                        continue
                    if m.offset() > want:
                        return _INTACT, low  # offset - 1 is gone but the log goes on
                    fp = self._cursor.last_fp
                    same = fp is None or message_fingerprint(m) == fp
                    return (_INTACT if same else _RESET), low
            return None, low
        finally:
            probe.close()

    def _recover(self) -> bool:
        """Close the consumer, check the log, and resume; False while the broker is away."""
        self._drop_consumer()
        now = time.monotonic()
        if now < self._retry_at:
            time.sleep(min(self._source.poll_s, self._retry_at - now))
            return False
        verdict, low = self._probe_log()
        if verdict is None:
            now = time.monotonic()
            self._retry_at = now + self.VERIFY_RETRY_S
            if now - max(self._suspect_since, self._warned_at) >= self.VERIFY_WARN_S:
                self._warned_at = now
                log.warning("source.verify_pending", topic=self._topic,
                            partition=self._partition, offset=self._cursor.offset,
                            waiting_s=round(now - self._suspect_since, 1))
            return False
        if verdict == _RESET:
            log.warning("source.log_reset", topic=self._topic, partition=self._partition,
                        old_offset=self._cursor.offset, new_offset=low)
            self._cursor = replace(self._cursor, offset=low, last_fp=None)
            self._reset_pending = True
            if self._seen is not None:
                self._seen.rebase(low)  # the ids read before are in no log any more
                self._rewarm_at = -1
        else:
            log.info("source.position_verified", topic=self._topic, partition=self._partition,
                     offset=self._cursor.offset)
        self._consumer = self._new_consumer()
        self._suspect = False
        self._verified = None
        self._warned_at = 0.0
        self._quiet_since = time.monotonic()
        return True

    def _idle_check(self) -> None:
        """Fallback for what no error reported: a restarted log, or a stalled consumer.

        The partition has been idle for ``VERIFY_IDLE_S``. If the log holds a batch at or
        past our position (``high > offset``: on Tansu ``high`` is the start of the last batch
        plus one) the consumer should have delivered it: it is stalled (seen after a broker
        restart, fetching a recreated topic), so it is replaced. Otherwise, a log shorter than
        our position is checked for a reset.
        """
        from confluent_kafka import KafkaException, TopicPartition

        offset = self._cursor.offset
        try:
            marks = self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, self._partition),
                timeout=self.VERIFY_TIMEOUT_S, cached=False)
        except KafkaException:
            marks = None
        if marks is None:
            self._set_suspect()  # the broker does not answer: check once it does
            return
        low, high = marks
        if low < 0 or high < 0:  # the consumer's view of the partition is gone (stale topic)
            log.warning("source.consumer_stalled", topic=self._topic, partition=self._partition,
                        offset=offset, low=low, high=high)
            self._set_suspect()
            return
        if high > max(offset, low):
            log.warning("source.consumer_stalled", topic=self._topic, partition=self._partition,
                        offset=offset, high=high, idle_s=self.VERIFY_IDLE_S)
            self._set_suspect()  # checked, then a new consumer takes over
            return
        if offset <= 0:
            return  # nothing read: the consumer's position is valid in any log
        if high >= offset:
            return
        if (low, high, offset) == self._verified and \
                time.monotonic() - self._verified_at < self.REVERIFY_S:
            return
        verdict, _ = self._probe_log()
        if verdict == _INTACT:
            self._verified, self._verified_at = (low, high, offset), time.monotonic()
        else:
            self._set_suspect()

    def _set_suspect(self) -> None:
        if not self._suspect:
            self._suspect = True
            self._suspect_since = time.monotonic()

    # -- reading ---------------------------------------------------------------------

    def _heartbeat(self, watermark: int) -> SourceBatch:
        """An empty batch carrying ``watermark`` (no events, no offsets moved)."""
        return SourceBatch(
            topic=self._topic, partition=self._partition,
            columns=empty_columns(self._topic), late=np.zeros(0, dtype=bool),
            watermark=watermark, first_offset=self._cursor.offset,
            next_offset=self._cursor.offset, offsets=np.zeros(0, np.int64), log_reset=False)

    def next_batch(self) -> list[SourceBatch]:
        from confluent_kafka import KafkaError

        if self._eof:
            raise StopIteration()
        msgs: list[Any] = []  # stays empty while the broker is away (heartbeats still go out)
        if not self._suspect or self._recover():
            # Never wait in ``consume``: a wait on one partition (its first fetch, a drained
            # queue) would stall every other partition of this worker. A partition that
            # had nothing sleeps ``poll_s`` through ``next_awake`` instead.
            msgs = self._consumer.consume(self._poll_size(), timeout=0)
            self._awake_at = None if msgs else after(int(self._source.poll_s * 1000))
            if self._suspect:
                # error_cb fired during this call: the broker went away; what came back may
                # come from a restarted log, so check first (the cursor covers none of it)
                msgs = []
                self._source.broker_lost()
        first = None
        last = None
        next_offset = self._cursor.offset
        errs = [m.error() for m in msgs]
        records = [m for m, e in zip(msgs, errs) if e is None] if any(errs) else msgs
        for err in errs:
            if err is None:
                continue
            if err.code() == KafkaError._PARTITION_EOF:
                self._eof = self._source.bounded
                continue
            raise RuntimeError(f"kafka error on {self._topic}:{self._partition}: {err}")
        dead: list[DeadLetter] = []
        if records and self._rewarm_at >= 0:
            records = self._rewarm(records)
        if records:
            first, last = records[0].offset(), records[-1]
            next_offset = last.offset() + 1
            cols, offsets, dead, messages = self._decode(records)
        if first is None:
            if self._eof:
                if (self._source.idle_timeout_ms is not None and not self._idle
                        and self._cursor.max_ts <= NO_TIME):
                    # bounded, and it ended without an event: it holds no watermark back
                    self._idle = True
                    log.info("source.partition_idle", topic=self._topic,
                             partition=self._partition, reason="ended without an event")
                    return [self._heartbeat(IDLE_WATERMARK)]
                raise StopIteration()
            now = time.monotonic()
            idle_ms = self._source.idle_timeout_ms
            if idle_ms is not None and self._tail and (now - self._records_at) * 1000 >= idle_ms \
                    and (now - self._idle_since) * 1000 >= min(idle_ms, 1_000):
                # Flink's withIdleness, kept safe: the partition's running maximum follows
                # the wall clock less the timeout, so the events it may send later and that
                # the others' watermark has passed are classified late here, never folded
                # into blocks that were sealed without them
                self._idle_since = now
                wall = int(time.time() * 1000) - idle_ms
                if wall > self._cursor.max_ts:
                    self._cursor = PartitionCursor(offset=self._cursor.offset, max_ts=wall,
                                                   last_fp=self._cursor.last_fp)
                if not self._idle:
                    self._idle = True
                    log.info("source.partition_idle", topic=self._topic,
                             partition=self._partition, idle_s=round(now - self._records_at),
                             reason="no events for the idle timeout")
                return [self._heartbeat(self._cursor.max_ts - self._source.lateness)]
            if self._tail and not self._suspect and \
                    now - self._quiet_since >= self.VERIFY_IDLE_S:
                self._quiet_since = now
                self._idle_check()
            beat = self._source.idle_heartbeat_ms
            if beat is not None and (time.monotonic() - self._idle_since) * 1000 >= beat:
                # an empty batch: lets downstream timers (sink commits) run while idle
                self._idle_since = time.monotonic()
                wm = self._cursor.max_ts
                reset, self._reset_pending = self._reset_pending, False
                return [SourceBatch(
                    topic=self._topic, partition=self._partition,
                    columns=empty_columns(self._topic), late=np.zeros(0, dtype=bool),
                    watermark=wm - self._source.lateness if wm > NO_TIME else NO_TIME,
                    first_offset=self._cursor.offset, next_offset=self._cursor.offset,
                    offsets=np.zeros(0, np.int64), log_reset=reset)]
            return []
        self._idle_since = self._quiet_since = self._records_at = time.monotonic()
        if self._idle:
            self._idle = False
            log.info("source.partition_active", topic=self._topic, partition=self._partition)
        ts = np.asarray(cols.columns["event_ts"], dtype=np.int64)
        if self._source.validate:
            bad, reasons = invalid_events(cols, int(time.time() * 1000),
                                          self._source.max_future_ms)
            if bad.any():
                idx = np.flatnonzero(bad)
                full, ok = (messages.full_columns(self._topic, idx) if messages is not None
                            else (cols.take(idx), np.ones(len(idx), dtype=bool)))
                dead += rejected_deadletters(self._topic, self._partition, full,
                                             offsets[idx[ok]],
                                             [reasons[i] for i in idx[ok].tolist()])
                keep = np.flatnonzero(~bad)
                cols, offsets, ts = cols.take(keep), offsets[keep], ts[keep]
                messages = messages.take(keep) if messages is not None else None
        duplicates = 0
        if self._seen is not None and len(ts):
            fresh = admit_event_ids(self._seen, cols, ts, first)
            duplicates = int(len(fresh) - np.count_nonzero(fresh))
            if duplicates:
                keep = np.flatnonzero(fresh)
                cols, offsets, ts = cols.take(keep), offsets[keep], ts[keep]
                messages = messages.take(keep) if messages is not None else None
        late, new_max = classify_late(self._cursor.max_ts, ts, self._source.lateness)
        self._cursor = PartitionCursor(
            offset=next_offset, max_ts=new_max,
            last_fp=message_fingerprint(last) if self._tail else None)
        stop = self._source.stop_at_ts
        if stop is not None and new_max - self._source.lateness >= stop:
            self._eof = True  # every later on-time event is at or after stop_at_ts
        reset, self._reset_pending = self._reset_pending, False
        return [SourceBatch(
            topic=self._topic, partition=self._partition, columns=cols, late=late,
            watermark=new_max - self._source.lateness if new_max > NO_TIME else NO_TIME,
            first_offset=first, next_offset=next_offset, deadletters=dead,
            offsets=offsets, log_reset=reset, messages=messages, duplicates=duplicates,
        )]

    def _rewarm(self, records: list[Any]) -> list[Any]:
        """Admit the event ids of the records read again below the resumed ``offset``
        (rebuilding the deduplication memory a restart lost); return the records after it.

        Their events were emitted (and their dead letters sent) before the restart: only
        ids are taken, of the events that were valid then.
        """
        end = self._cursor.offset
        if not self._rewarmed:
            self._rewarm_t0 = time.monotonic()
        offsets = np.fromiter((m.offset() for m in records), np.int64, len(records))
        split = int(np.searchsorted(offsets, end))
        again, rest = records[:split], records[split:]
        if again:
            cols, _, _, _ = self._decode(again)
            ts = np.asarray(cols.columns["event_ts"], dtype=np.int64)
            if self._source.validate and len(ts):
                bad, _ = invalid_events(cols, int(time.time() * 1000), self._source.max_future_ms)
                keep = np.flatnonzero(~bad)
                cols, ts = cols.take(keep), ts[keep]
            if len(ts):
                admit_event_ids(self._seen, cols, ts, int(offsets[0]))
            self._rewarmed += len(again)
            # reading, not idle: a long rebuild must not let the idle timeout move the
            # partition's watermark to the wall clock
            self._records_at = self._idle_since = self._quiet_since = time.monotonic()
            self._rewarm_at = int(offsets[split - 1]) + 1
        if rest or self._rewarm_at >= end:
            log.info("source.dedup_rebuilt", topic=self._topic, partition=self._partition,
                     messages=self._rewarmed, ids=len(self._seen), offset=end,
                     took_s=round(time.monotonic() - self._rewarm_t0, 2) if self._rewarmed
                     else 0.0)
            self._rewarm_at = -1
        return rest

    def _poll_size(self) -> int:
        """Messages to ask for: about ``batch_events`` events, at most ``batch_messages``."""
        src = self._source
        if src.batch_events is None:
            return src.batch_messages
        return max(1, min(src.batch_messages, int(src.batch_events / self._events_per_message)))

    def _decode(self, records: list[Any]
                ) -> tuple[EventColumns, np.ndarray, list[DeadLetter], MessageRows | None]:
        """Decode the messages of one poll at once.

        Returns the columns (only the source's ``fields`` of this topic, when it projects),
        each event's offset, the dead letters, and the raw messages of a projected read.
        """
        payloads = [m.value() or b"" for m in records]
        fields = self._source.fields.get(self._topic) if self._source.fields else None
        decoded = (decode_messages(payloads, self._topic) if fields is None
                   else decode_messages(payloads, self._topic, fields=fields))
        offsets = np.fromiter((m.offset() for m in records), np.int64, len(records))
        dead = []
        if decoded.errors:
            now = int(time.time() * 1000)
            for i, reason in sorted(decoded.errors.items()):
                dead.append(DeadLetter(
                    topic=self._topic, partition=self._partition, offset=int(offsets[i]),
                    payload=payloads[i], key=records[i].key(), reason=reason, stage="decode",
                    failed_ts=now))
        events = len(decoded.columns) + len(dead)
        self._events_per_message = max(1.0, 0.5 * self._events_per_message
                                       + 0.5 * events / len(records))
        src = decoded.source_index
        messages = None
        if fields is not None:
            first = np.searchsorted(src, src)  # rows of one message are consecutive
            messages = MessageRows(payloads, src, np.arange(len(src), dtype=np.int64) - first)
        return decoded.columns, offsets[src], dead, messages

    def next_awake(self) -> datetime | None:
        return self._awake_at

    def snapshot(self) -> PartitionCursor:
        if self._seen is None:
            return self._cursor
        if self._rewarm_at >= 0:  # still rebuilding: the restored cursor's start holds
            return replace(self._cursor, dedup_from=self._rewarm_from)
        oldest = self._seen.oldest_offset
        return replace(self._cursor, dedup_from=-1 if oldest is None else oldest)

    def close(self) -> None:
        self._drop_consumer()


class KafkaBatchSource(FixedPartitionedSource[SourceBatch, PartitionCursor]):
    """Read ``topics`` as columnar ``SourceBatch`` items, one Bytewax partition per Kafka one.

    Args:
        bootstrap: Kafka bootstrap servers.
        topics: topics to read.
        lateness: allowed lateness in ms (events further behind their partition's running
            maximum are marked late).
        bounded: stop each partition at its end instead of tailing.
        batch_messages: at most this many messages per consume call.
        batch_events: aim for about this many events per consume call (a batch envelope
            carries many: the message count adapts to the events per message seen); None
            asks for ``batch_messages`` every time.
        start_offsets: optional ``{"topic:p": offset}`` for a first run (replay).
        stop_at_ts: end a partition once its watermark passes this event time (replay of a
            range): every on-time event after it is at or after ``stop_at_ts``.
        idle_heartbeat_ms: when a partition has had nothing to read for this long, emit an
            empty batch so timers downstream (sink commits) run while the topic is idle.
        idle_timeout_ms: a partition with no event for this long stops holding the
            watermark back (``features.watermarks``): tailing, its watermark follows the wall
            clock less this timeout (later events behind it are late); bounded, a partition
            that ends without an event reports ``IDLE_WATERMARK``. None: off.
        max_future_ms: events whose time is further than this ahead of the wall clock are
            dead-lettered instead of read (None: no check). Counted, one such event would
            move its partition's watermark into the future and make later events late.
        validate: dead-letter invalid events (see :func:`invalid_events`: future-dated,
            over-long ids) instead of passing them on; off, every decoded event is read.
        fields: per topic, the only fields to decode (a projection: the others are skipped
            in the bulk decode); batches then keep their raw messages so that
            ``SourceBatch.full_columns`` gives every field of late or rejected events.
        deduplicate: per topic, a horizon (ms of event time): an event whose ``event_id``
            the partition admitted within it is dropped and counted
            (``SourceBatch.duplicates``; ``features.dedup.SeenIds``). The ids are not in
            the snapshot; its ``dedup_from`` is where they start in the log, and a resumed
            partition reads the log again from there to its offset, admitting ids only:
            a copy after a restart is dropped like one within a run.
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
        idle_timeout_ms: int | None = None,
        max_future_ms: int | None = None,
        validate: bool = False,
        batch_events: int | None = None,
        fields: Mapping[str, Sequence[str]] | None = None,
        deduplicate: Mapping[str, int] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = tuple(topics)
        self.lateness = int(lateness)
        self.bounded = bounded
        self.batch_messages = batch_messages
        self.batch_events = batch_events
        self.deduplicate = dict(deduplicate or {})
        # a deduplicated topic's projection must carry its event ids
        self.fields = {t: tuple(dict.fromkeys([*f, "event_id"])) if t in self.deduplicate
                       else tuple(f) for t, f in (fields or {}).items()}
        self.poll_s = poll_s
        self.start_offsets = dict(start_offsets or {})
        self.consumer_overrides = dict(consumer_overrides or {})
        self.stop_at_ts = stop_at_ts
        self.idle_heartbeat_ms = idle_heartbeat_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.max_future_ms = max_future_ms
        self.validate = validate
        # the tailing partitions built by each worker thread: a broker outage seen by one
        # closes every consumer of that thread at once (see ``_KafkaPartition.next_batch``)
        self._tailing: dict[int, list[_KafkaPartition]] = {}

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
        part = _KafkaPartition(self, topic, int(p), cursor)
        log.info("source.partition_open", topic=topic, partition=int(p), offset=cursor.offset,
                 resumed=resume_state is not None)
        if not self.bounded:
            self._tailing.setdefault(threading.get_ident(), []).append(part)
        return part

    def broker_lost(self) -> None:
        """Close every consumer of this worker thread now; each checks its log before reading.

        A consumer left open while the broker restarts can crash the process (librdkafka
        2.12, see the module docstring), and only the consumer being polled hears of the
        outage, so one partition's error closes them all.
        """
        for part in self._tailing.get(threading.get_ident(), ()):
            part._set_suspect()
            part._drop_consumer()


def utc_now() -> datetime:
    """Current time, timezone-aware (Bytewax notifications need aware datetimes)."""
    return datetime.now(UTC)


def after(ms: int) -> datetime:
    """The aware datetime ``ms`` milliseconds from now."""
    return utc_now() + timedelta(milliseconds=ms)


def aligned_after(ms: int) -> datetime:
    """The next instant, at most ``ms`` from now, that is a whole multiple of ``ms`` since the
    epoch: timers set with it in one interval fire together (one write for all of them)."""
    now = utc_now()
    step = max(int(ms), 1)
    at = (int(now.timestamp() * 1000) // step + 1) * step
    return datetime.fromtimestamp(at / 1000, UTC)
