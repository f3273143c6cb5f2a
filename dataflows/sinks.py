"""Bytewax sinks of the dataflows: online store, Iceberg tables, dead-letter topic."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from bytewax.outputs import (
    DynamicSink,
    FixedPartitionedSink,
    StatefulSinkPartition,
    StatelessSinkPartition,
)

from dataflows.memory import release_free_memory
from features.blockstate import ShardFlush
from features.store.base import BlockBatchWrite
from features.store.blockbatch import BlockBatch, chunks_by_key
from features.store.errors import StoreError, StoreUnavailableError
from tessera.logs import get_logger

log = get_logger("dataflows.sinks")


WRITE_CHUNK_ENTITIES = 20_000
"""Entities per write chunk, one record merge each (a store groups chunks into its own
transactions)."""

SWEEP_INTERVAL_S = 60.0
"""Seconds between sweeps of expired blocks, where the store sweeps (Aerospike; a sweep
starts only once the last one ended). A block past retention is never read
(``features.tiling.retention``): a record keeps those that expired since the last sweep."""

RELEASE_AFTER_ROWS = 1_000_000
"""Rows in a store write after which the worker hands freed memory back to the system: a
catch-up flush's millions of rows, not the small writes of a live flow (the next large
allocation faults the pages in again, so trimming after every write would cost CPU)."""

#: seconds between tries of a store write while the store is unreachable (doubling up to
#: the last)
STORE_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def write_until_stored(what: str, write: Callable[[], None]) -> None:
    """Call ``write`` until it succeeds, waiting out ``StoreUnavailableError``.

    A store that is down (an Aerospike node restarting, a network partition) stalls the
    flow here instead of crashing the worker: the source stops being polled, so nothing is
    read that could be lost, and the write is repeated when the store is back. Every store
    write of the flows is idempotent (blocks are upserts, sequence appends dedupe on event
    id, watermarks only rise), so a write that was partly applied is safe to repeat. Each
    failed try is logged (``store.unavailable``) with the attempt and the error.
    """
    attempt = 0
    down_since = None
    while True:
        try:
            write()
        except StoreUnavailableError as exc:
            down_since = down_since or time.monotonic()
            wait = STORE_RETRY_S[min(attempt, len(STORE_RETRY_S) - 1)]
            attempt += 1
            log.warning("store.unavailable", write=what, attempt=attempt, retry_in_s=wait,
                        down_s=round(time.monotonic() - down_since, 1), error=str(exc)[:300])
            time.sleep(wait)
            continue
        if attempt:
            log.info("store.available", write=what, attempts=attempt,
                     down_s=round(time.monotonic() - down_since, 1))
        return


@dataclass
class ShardOutput:
    """What one shard flush produced: blocks to write and the shard's watermark."""

    entity_type: str
    family: str
    flush: ShardFlush
    watermark_key: str
    watermark: int
    #: the shard (``<topic>/<entity field>/<n>``): a block it seals ends by ``watermark``
    shard: str = ""


def sealed_table(entity_type: str, batch: BlockBatch, keep: np.ndarray) -> pa.Table:
    """The blocks table rows of ``batch``'s blocks where ``keep`` is set, as columns
    (``entity_type, entity_id, feature_key, start_ms, size_ms, rep``): Arrow gathers the ids,
    keys and reps, with no Python object per block."""
    idx = pa.array(np.flatnonzero(keep))
    n = len(idx)
    reps = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(batch),
        [None, pa.py_buffer(np.ascontiguousarray(batch.offsets, np.int64)),
         pa.py_buffer(batch.blob)])
    return pa.table({
        "entity_type": pa.repeat(pa.scalar(entity_type, pa.large_string()), n),
        "entity_id": pa.array(batch.entity_ids, pa.large_string()).take(
            pa.array(batch.entity_idx).take(idx)),
        "feature_key": pa.array(batch.feature_keys, pa.large_string()).take(
            pa.array(batch.feature_idx).take(idx)),
        "start_ms": pa.array(batch.starts, pa.int64()).take(idx),
        "size_ms": pa.array(batch.sizes, pa.int64()).take(idx),
        "rep": reps.take(idx),
    })


class _StorePartition(StatelessSinkPartition[Any]):
    def __init__(self, store_url: str, warehouse: Path | None, writer: str,
                 retention: dict[tuple[str, str], dict[int, int]], progress: Any = None):
        from features.store import open_store

        self.store = open_store(store_url)
        self.progress = progress
        self.warehouse = warehouse
        self.writer = writer
        self.tables = None
        #: {shard: watermark} through which the shard's sealed blocks are in the table
        self.sealed_through: dict[str, int] | None = None
        self.blocks_written = 0
        self.retention = retention
        #: a store that sweeps (``OnlineStore.sweeps_expired``): {(entity_type, family):
        #: (newest keep_after, the features written since the last sweep)}
        self.to_sweep: dict[tuple[str, str], tuple[dict[int, int], set[str]]] = {}
        self.swept_at = time.monotonic()

    def write_batch(self, items: list[tuple[str, ShardOutput]]) -> None:
        by_record: dict[tuple[str, str], list[BlockBatch]] = {}
        record_wm: dict[tuple[str, str], int] = {}
        watermarks: dict[str, int] = {}
        sealed: list[tuple[str, BlockBatch, np.ndarray]] = []
        for _key, out in items:
            batch = out.flush.batch
            if len(batch):
                group = (out.entity_type, out.family)
                by_record.setdefault(group, []).append(batch)
                record_wm[group] = min(record_wm.get(group, out.watermark), out.watermark)
                if self.warehouse is not None and out.flush.sealed.any():
                    sealed.append((out.entity_type, batch, self._not_committed(out)))
            if out.watermark > watermarks.get(out.watermark_key, -(2**62)):
                watermarks[out.watermark_key] = out.watermark
        families = []
        for (entity_type, family), batches in by_record.items():
            wm = record_wm[(entity_type, family)]
            keep = self.retention.get((entity_type, family))
            keep_after = ({size: wm - ms for size, ms in keep.items()}
                          if keep and wm > -(2**61) else None)
            if keep_after and self.store.sweeps_expired:
                feats = self.to_sweep.get((entity_type, family), ({}, set()))[1]
                feats.update(k for b in batches for k in b.feature_keys)
                self.to_sweep[(entity_type, family)] = (keep_after, feats)
                keep_after = None  # dropped by the next sweep, not by every record's write
            families.append((entity_type, family, batches, keep_after))

        def writes() -> Iterator[BlockBatchWrite]:
            """The write, chunk by chunk, made as the store takes it: one chunk's copy of
            the rows exists at a time. The shards of a family spread over its whole key
            range: written in key-range chunks across them, each page of records is
            rewritten once, not once a shard."""
            for entity_type, family, batches, keep_after in families:
                for chunk in chunks_by_key(batches, WRITE_CHUNK_ENTITIES):
                    yield BlockBatchWrite(entity_type, family, chunk, keep_after)

        # Sealed rows are stamped now, before this write publishes them online: a batch
        # correction of the same block (``tessera batch blocks``, which waits for this
        # watermark) is stamped after, so the offline table keeps its version, as the online
        # store does.
        stamp = int(time.time() * 1000)
        # one call: few transactions, and the watermarks only after the blocks they vouch for
        write_until_stored("blocks", lambda: self.store.put_block_batches(writes(), watermarks))
        written = sum(len(b) for _, _, batches, _ in families for b in batches)
        self.blocks_written += written
        if self.progress is not None:
            self.progress.add_blocks(written)
        if written >= RELEASE_AFTER_ROWS:
            release_free_memory()  # a large flush's transient arrays: back to the system
        if sealed:
            self._commit_sealed(sealed, {out.shard: out.watermark for _k, out in items
                                         if out.shard}, stamp)
        if self.to_sweep and time.monotonic() - self.swept_at >= SWEEP_INTERVAL_S \
                and not self._still_sweeping():
            self._sweep()

    def _still_sweeping(self) -> bool:
        try:
            return self.store.sweeping()
        except StoreError:  # the job's state is unknown: start again (or log why not)
            return False

    def _sweep(self) -> None:
        """Start dropping the blocks retention expires from the records of every family
        written since the last sweep (a store that ``sweeps_expired``: server-side jobs the
        flow does not wait for; the next starts once they ended)."""
        self.swept_at = time.monotonic()
        for (entity_type, family), (keep_after, feats) in list(self.to_sweep.items()):
            try:
                self.store.drop_expired(entity_type, family, feats, keep_after, wait=False)
            except StoreError as exc:  # maintenance: never stops the flow; tried again later
                log.warning("store.sweep_failed", entity_type=entity_type, family=family,
                            error=str(exc)[:300], retry_in_s=SWEEP_INTERVAL_S)
                continue
            del self.to_sweep[(entity_type, family)]
            log.info("store.sweep_started", entity_type=entity_type, family=family,
                     features=len(feats))

    def _not_committed(self, out: ShardOutput) -> np.ndarray:
        """Which blocks of ``out`` seal now and are not in the table yet (a replay after a
        crash seals again what the table's marks already cover)."""
        batch = out.flush.batch
        keep = np.asarray(out.flush.sealed, dtype=bool)
        if self.sealed_through is None:
            self.sealed_through = self._tables().sealed_marks(self.writer)
        mark = self.sealed_through.get(out.shard)
        if mark is not None:
            keep = keep & (batch.starts + batch.sizes > mark)
        return keep

    def _tables(self):
        if self.tables is None:
            from features.offline.tables import OfflineTables

            self.tables = OfflineTables.open(self.warehouse)
        return self.tables

    def _commit_sealed(self, sealed: list[tuple[str, BlockBatch, np.ndarray]],
                       through: dict[str, int], stamp: int) -> None:
        """Append this write's sealed blocks in one commit that also raises the shards' marks.

        The commit happens before ``write_batch`` returns, so the epoch a snapshot closes
        never holds a sealed block that is only in memory: exactly once on disk.
        """
        rows = pa.concat_tables([sealed_table(entity_type, batch, keep)
                                 for entity_type, batch, keep in sealed])
        if not rows.num_rows:
            return
        self._tables().append_blocks(rows, written_ms=stamp, writer=self.writer,
                                     sealed_through=through)
        for shard, wm in through.items():
            self.sealed_through[shard] = max(self.sealed_through.get(shard, wm), wm)
        log.info("sealed_blocks_committed", rows=rows.num_rows, shards=len(through))

    def close(self) -> None:
        if self.to_sweep:
            self._sweep()  # a bounded run's last expired blocks: dropped after it ends
        self.store.close()


class StoreSink(DynamicSink[Any]):
    """Write shard flushes to the online store; sealed blocks also to the Iceberg blocks table.

    Block writes are full-rep overwrites, so a replay after a crash converges to the same
    store contents. Sealed blocks reach Iceberg exactly once: each write's sealed blocks
    are committed before the write returns, with each shard's watermark as a mark in the
    same commit (``OfflineTables.append_blocks``); a replay leaves out the blocks the
    marks of ``writer`` cover. ``retention`` ({(entity_type, family): {size: ms}}) drops,
    as records are rewritten, blocks older than any window can read
    (``features.tiling.retention``) behind the watermark.
    """

    def __init__(
        self,
        store_url: str,
        warehouse: Path | None,
        writer: str = "blocks",
        retention: dict[tuple[str, str], dict[int, int]] | None = None,
        progress: Any = None,
    ):
        self.store_url = store_url
        self.warehouse = warehouse
        self.writer = writer
        self.retention = dict(retention or {})
        self.progress = progress  # a FlowProgress: counts the blocks written

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StorePartition:
        return _StorePartition(self.store_url, self.warehouse, self.writer, self.retention,
                               self.progress)


class _DeadLetterPartition(StatelessSinkPartition[Any]):
    """Produces dead letters; one whose delivery failed is produced again, not dropped.

    librdkafka retries a message until ``message.timeout.ms``; past that (the broker away
    for minutes, or the topic missing: producers never create topics) the delivery report
    carries the error, and the message is kept here and sent again with the next batch.
    ``close`` tries ``CLOSE_ROUNDS`` more times, then logs how many it could not deliver.
    The kept messages are in memory: as many as dead letters failed (malformed input is
    rare, and each is one small message).
    """

    #: how many times ``close`` re-sends failed dead letters before it gives up (and logs
    #: each one it could not deliver)
    CLOSE_ROUNDS = 3

    def __init__(self, bootstrap: str, topic: str, **producer_overrides: Any):
        from confluent_kafka import Producer

        from tessera.topics import producer_config

        self.topic = topic
        self.producer = Producer(producer_config(bootstrap, **producer_overrides))
        self.count = 0
        #: (value, key) of dead letters whose delivery failed, sent again
        self.failed: list[tuple[bytes, bytes | None]] = []
        self.delivery_failures = 0

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is None:
            return
        self.failed.append((msg.value(), msg.key()))
        self.delivery_failures += 1
        if self.delivery_failures == 1 or self.delivery_failures % 1000 == 0:
            log.error("dead_letter_delivery_failed", topic=self.topic, error=str(err),
                      failures=self.delivery_failures, action="sent again")

    def _produce(self, value: bytes, key: bytes | None) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value, key=key, on_delivery=self._delivered)
                return
            except BufferError:  # the local queue is full: let deliveries drain
                self.producer.poll(0.1)

    def _resend_failed(self) -> None:
        retry, self.failed = self.failed, []
        for value, key in retry:
            self._produce(value, key)

    def write_batch(self, items: list[Any]) -> None:
        # Never wait on the broker here: a flush while it is away would stall the whole
        # flow (the sources stop polling, so they cannot see the outage either).
        # librdkafka keeps the messages queued and retries them; ``close`` flushes.
        self._resend_failed()
        for dl in items:
            self._produce(dl.encode(), dl.key)
            self.count += 1
            log.warning("dead_letter", topic=dl.topic, partition=dl.partition,
                        offset=dl.offset, reason=dl.reason[:200])
        self.producer.poll(0)

    def close(self) -> None:
        self.producer.flush(30)
        for _ in range(self.CLOSE_ROUNDS):
            if not self.failed:
                return
            self._resend_failed()
            self.producer.flush(30)
        if self.failed:
            log.error("dead_letters_undelivered", topic=self.topic, messages=len(self.failed),
                      fix=f"create the topic ({self.topic!r}) and replay the source range")


class DeadLetterSink(DynamicSink[Any]):
    """Produce dead letters (original bytes, where they came from, why) to the DLQ topic."""

    def __init__(self, bootstrap: str, topic: str = "deadletter"):
        self.bootstrap = bootstrap
        self.topic = topic

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DeadLetterPartition:
        return _DeadLetterPartition(self.bootstrap, self.topic)


LATE_PART = "late"
"""The late-event sink's one partition: every worker's late events reach one writer, so a
flow makes one Iceberg commit an epoch whatever its worker count."""

LATE_FLUSH_ROWS = 50_000
"""Late rows buffered before a commit within an epoch (memory bound under a flood)."""

LATE_FLUSH_S = 5.0
"""Age of the oldest buffered late row after which the next batch commits (a flow without
recovery has 10-minute epochs)."""


def output_late_events(step_id: str, batches: Any, warehouse: Path, writer: str) -> None:
    """Send the late events of ``batches`` (``SourceBatch``es) to ``LateEventSink``."""
    import bytewax.operators as op

    keyed = op.map(f"{step_id}_key", batches, lambda b: (LATE_PART, b))
    op.output(step_id, keyed, LateEventSink(warehouse, writer))


class _LatePartition(StatefulSinkPartition[Any, None]):
    def __init__(self, warehouse: Path, writer: str):
        self.warehouse = warehouse
        self.writer = writer
        self.tables = None
        #: partitions whose Kafka log was reset under the source while this worker ran
        self.reset: set[str] = set()
        self.rows: list[tuple] = []
        self.first_at = 0.0

    def write_batch(self, items: list[Any]) -> None:
        from schemas.codec import encode
        from schemas.columnar import columns_to_records

        now = int(time.time() * 1000)
        for batch in items:
            if batch.log_reset:
                self.reset.add(batch.part)
            idx = batch.late.nonzero()[0]
            if not len(idx):
                continue  # a reset log's first batch without late events: only noted
            late_cols, ok = batch.full_columns(idx)
            idx = idx[ok]
            offsets = batch.offsets[idx] if batch.offsets is not None else [-1] * len(idx)
            if not self.rows:
                self.first_at = time.monotonic()
            for rec, off in zip(columns_to_records(late_cols), list(offsets)):
                self.rows.append((batch.topic, batch.partition, int(off), int(rec["event_ts"]),
                                  str(rec.get("event_id", "")), encode(batch.topic, rec), now))
        if len(self.rows) >= LATE_FLUSH_ROWS or (
                self.rows and time.monotonic() - self.first_at >= LATE_FLUSH_S):
            self._commit()

    def _commit(self) -> None:
        if not self.rows:
            return
        if self.tables is None:
            from features.offline.tables import OfflineTables

            self.tables = OfflineTables.open(self.warehouse)
        rows, self.rows = self.rows, []
        written = self.tables.append_late_events(rows, writer=self.writer, reset=self.reset)
        log.info("late_events_kept", rows=written, skipped_as_committed=len(rows) - written)

    def snapshot(self) -> None:
        # The epoch's offsets are committed only after every step's snapshot: committing
        # the buffered rows here means no epoch ever passes a late event not yet kept.
        self._commit()
        return None

    def close(self) -> None:
        self._commit()


class LateEventSink(FixedPartitionedSink[Any, None]):
    """Keep late events in the Iceberg ``late_events`` table for batch correction, exactly
    once: ``writer`` names the flow (``blocks``, ``labels``), whose highest committed offset
    per partition each commit records; a replay after a crash skips what is at or below it
    (a source partition's events reach the sink in offset order).

    Rows are buffered and committed when the epoch ends (``snapshot``, before Bytewax
    commits the epoch's source offsets), at the end of a bounded run, and within an epoch
    after ``LATE_FLUSH_ROWS`` rows or ``LATE_FLUSH_S`` seconds: a commit an epoch, not one
    per batch. Items are ``(LATE_PART, batch)``: use ``output_late_events``.
    """

    def __init__(self, warehouse: Path, writer: str):
        self.warehouse = warehouse
        self.writer = writer

    def list_parts(self) -> list[str]:
        return [LATE_PART]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _LatePartition:
        return _LatePartition(self.warehouse, self.writer)
