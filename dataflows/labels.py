"""The label-join dataflow: impressions + engagements -> Iceberg ``training_examples``.

    kafka impressions, engagements (KafkaBatchSource: decode, late mask, partition watermark)
      ├─ dead letters ───────────────────────────────────▶ deadletter topic
      ├─ late events ────────────────────────────────────▶ Iceberg late_events
      └─ route: on-time events by crc32(impression_id) % shards
                 (every shard also gets the batch's partition watermark)
                     └─▶ stateful LabelJoin per shard ──▶ TrainingSink: micro-batched appends
                                                           to training_examples

The flow is thin: the join rules live in ``features.labeljoin``. A shard's event-time
watermark is the minimum over every partition of both topics (a partition never heard
from holds it back, as for blocks). An example is emitted when that watermark passes
``impression ts + label_window_ms``.

Bounded mode: at the end of the topics only matured examples are emitted. Impressions
whose window the final watermark has not passed stay unwritten (a later run over more
data, or the tailing worker, emits them); nothing immature is ever written, so a row's
labels are always final.

Delivery, exactly once on disk: the sink is a ``FixedPartitionedSink`` whose snapshot is
its not yet committed rows, so rows emitted by the join survive a crash with the join state
that no longer holds them, and the table's data sequence number after its last commit. A
crash after a commit and before the next snapshot replays rows it already committed; on
resume the sink reads the ``(impression_id, version)`` of every file added after that
sequence number (``TrainingTables.keys_added_after``: the commits since the snapshot, a few
files) and never appends those rows again. The reads' deduplication
(``TrainingTables.scan_examples``) stays as a second guard.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulLogic
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from dataflows.blocks import shard_of
from dataflows.kafka_source import KafkaBatchSource, SourceBatch
from dataflows.progress import FlowProgress
from dataflows.sinks import DeadLetterSink, output_late_events
from features.labeljoin import LabelJoin, LabelJoinConfig
from features.offline.training import BASE_VERSION, TrainingTables
from schemas.columnar import EventColumns
from tessera.logs import get_logger

log = get_logger("dataflows.labels")

LABEL_TOPICS: tuple[str, ...] = ("impressions", "engagements")
KEY_PREFIX = "labels/"


@dataclass(frozen=True, kw_only=True)
class LabelFlowConfig:
    """Everything a label-join worker needs; frozen and validated at definition.

    Args:
        bootstrap: Kafka bootstrap servers.
        warehouse: Iceberg warehouse (local directory or URL) of ``training_examples``.
        label_window_ms: engagements up to this long after an impression label it.
        lateness_ms: allowed lateness of the source watermarks.
        bounded: stop at the end of the topics (emitting matured examples only).
        shards: stateful shards of impression ids (the unit of parallelism).
        commit_interval_ms: how often the sink commits its buffered rows to Iceberg.
        sink_parts: sink partitions (each commits on its own); 1 suits one Iceberg table.
        table_version: the ``version`` stamped on the rows.
        deadletter_topic: where undecodable events go.
        batch_messages: Kafka messages per consume call.
        start_offsets: optional ``{"topic:p": offset}`` for a first run.
    """

    bootstrap: str
    warehouse: Path | str
    label_window_ms: int = 30 * 60_000
    lateness_ms: int = 60_000
    bounded: bool = False
    shards: int = 8
    commit_interval_ms: int = 5_000
    sink_parts: int = 1
    table_version: str = BASE_VERSION
    deadletter_topic: str = "deadletter"
    batch_messages: int = 500
    #: events further ahead of the wall clock are dead-lettered (None: no check)
    max_future_ms: int | None = 3_600_000
    #: a partition with no event for this long stops holding the watermark back (an empty
    #: engagements partition held labels back forever); None: never
    idle_timeout_ms: int | None = 300_000
    start_offsets: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, minimum in (("shards", 1), ("sink_parts", 1), ("batch_messages", 1),
                              ("commit_interval_ms", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if not self.table_version:
            raise ValueError("table_version must be a non-empty string, got ''")
        self.join_config()  # validates label_window_ms and lateness_ms

    def join_config(self) -> LabelJoinConfig:
        """The engine-agnostic join settings."""
        return LabelJoinConfig(label_window_ms=self.label_window_ms, lateness_ms=self.lateness_ms)


@dataclass
class LabelInput:
    """The on-time events of one source batch that belong to one shard, plus the watermark."""

    part: str
    columns: EventColumns
    watermark: int


def route(config: LabelFlowConfig, batch: SourceBatch) -> list[tuple[str, LabelInput]]:
    """Split a batch's on-time events by shard of ``impression_id``; every shard gets the watermark."""
    on_time = batch.columns.filter(~batch.late) if batch.late.any() else batch.columns
    col = on_time.columns["impression_id"]
    dict_shard = np.append(shard_of(col.dictionary, config.shards), -1)
    ev_shard = dict_shard[np.asarray(col.codes)]
    out = []
    for s in range(config.shards):
        idx = np.flatnonzero(ev_shard == s)
        out.append((f"{KEY_PREFIX}{s}", LabelInput(batch.part, on_time.take(idx), batch.watermark)))
    return out


class LabelShardLogic(StatefulLogic[LabelInput, list[dict[str, Any]], dict[str, Any]]):
    """Bytewax glue around ``LabelJoin``: fold items, emit matured examples as they mature.

    Examples mature only when a watermark moves, which happens only with items, so no
    timer is needed; ``on_eof`` emits what the final watermark matured (nothing immature).
    """

    def __init__(self, join: LabelJoin, parts: list[str]):
        self.join = join
        self.parts = parts

    def _emit(self, always: bool = False) -> tuple[list[list[dict[str, Any]]], bool]:
        rows = self.join.flush(self.join.watermark(self.parts))
        return ([rows] if rows or always else []), StatefulLogic.RETAIN

    def on_item(self, value: LabelInput):
        self.join.add_columns(value.columns)
        self.join.advance(value.part, value.watermark)
        # an empty (heartbeat) batch still reaches the sink, so it commits while idle
        return self._emit(always=len(value.columns) == 0)

    def on_eof(self):
        out = self._emit()
        log.info("label_shard_eof", watermark=self.join.watermark(self.parts),
                 open_keys=len(self.join.keys), **self.join.counters)
        return out

    def snapshot(self) -> dict[str, Any]:
        return self.join.snapshot()


class _TrainingPartition(StatefulSinkPartition[list[dict[str, Any]], dict[str, Any]]):
    def __init__(self, warehouse: Path | str, version: str, commit_interval_ms: int,
                 state: dict[str, Any] | list[dict[str, Any]] | None):
        self.warehouse = warehouse
        self.version = version
        self.commit_interval_s = commit_interval_ms / 1000
        if isinstance(state, list):  # a snapshot from before the sequence number was kept
            state = {"pending": state, "sequence": None}
        self.pending: list[dict[str, Any]] = list((state or {}).get("pending") or [])
        self.tables = TrainingTables.open(warehouse)
        #: the table's data sequence number after this partition's last commit (or when it
        #: started): files added later are commits the snapshot does not know about
        self.sequence: int = self.tables.last_sequence_number()
        #: rows committed after the restored snapshot (before a crash): never appended again
        self.committed_keys: set[tuple[str, str]] = set()
        if state is not None:
            after = state.get("sequence")
            if after is None:
                after = 0  # an old snapshot: check every live file once
            self.committed_keys = self.tables.keys_added_after(int(after))
            log.info("training_sink_resumed", after_sequence=after,
                     rows_committed_since=len(self.committed_keys),
                     pending=len(self.pending))
        self.last_commit = time.monotonic()
        self.written = 0
        self.skipped = 0

    def write_batch(self, values: list[list[dict[str, Any]]]) -> None:
        for rows in values:
            self.pending.extend(rows)
        if self.pending and time.monotonic() - self.last_commit >= self.commit_interval_s:
            self._commit()

    def _commit(self) -> None:
        if not self.pending:
            return
        rows = self.pending
        if self.committed_keys:  # replayed after a crash: drop what is already on disk
            done = self.committed_keys
            rows = [r for r in rows if (r["impression_id"], self.version) not in done]
            self.skipped += len(self.pending) - len(rows)
        n = self.tables.append_rows(rows, self.version) if rows else 0
        if n:
            self.sequence = self.tables.last_sequence_number()
        self.written += n
        log.info("training_examples_committed", rows=n, total=self.written,
                 skipped_as_committed=self.skipped)
        self.pending = []
        self.last_commit = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        return {"pending": list(self.pending), "sequence": self.sequence}

    def close(self) -> None:
        self._commit()


class TrainingSink(FixedPartitionedSink[list[dict[str, Any]], dict[str, Any]]):
    """Append example rows to ``training_examples``, committing every ``commit_interval_ms``.

    Its snapshot is the rows not yet committed and the table's sequence number after its
    last commit, so a crash loses none of them and appends none twice (see the module
    docstring for the delivery guarantee).
    """

    def __init__(self, warehouse: Path | str, *, version: str = BASE_VERSION,
                 commit_interval_ms: int = 5_000, parts: int = 1):
        self.warehouse = warehouse
        self.version = version
        self.commit_interval_ms = commit_interval_ms
        self.parts = parts

    def list_parts(self) -> list[str]:
        return [f"training-{i}" for i in range(self.parts)]

    def part_fn(self, item_key: str) -> int:
        return zlib.crc32(item_key.encode())

    def build_part(self, step_id: str, for_part: str,
                   resume_state: dict[str, Any] | list[dict[str, Any]] | None
                   ) -> _TrainingPartition:
        return _TrainingPartition(self.warehouse, self.version, self.commit_interval_ms,
                                  resume_state)


def build_label_flow(config: LabelFlowConfig, progress: FlowProgress | None = None
                     ) -> Dataflow:
    """Return the Bytewax dataflow for ``config`` (run it with ``dataflows.runner.run_flow``);
    ``progress`` counts what it reads and logs ``labels.progress`` every few seconds."""
    source = KafkaBatchSource(
        bootstrap=config.bootstrap, topics=LABEL_TOPICS, lateness=config.lateness_ms,
        bounded=config.bounded, batch_messages=config.batch_messages,
        start_offsets=config.start_offsets,
        idle_heartbeat_ms=None if config.bounded else min(1_000, config.commit_interval_ms),
        max_future_ms=config.max_future_ms, validate=True,
        idle_timeout_ms=config.idle_timeout_ms,
    )
    parts = source.partition_keys()
    join_config = config.join_config()
    # Create the catalog and tables here, once: sink partitions of several workers opening
    # a fresh SQLite catalog at the same time race to create its tables.
    TrainingTables.open(config.warehouse)

    flow = Dataflow("tessera_labels")
    batches = op.input("kafka", flow, source)
    counter = progress or FlowProgress("labels")
    op.inspect("progress", batches, lambda _step, b: counter.observe(b))
    dead = op.flat_map("deadletters", batches, lambda b: b.deadletters)
    op.output("deadletter_out", dead, DeadLetterSink(config.bootstrap, config.deadletter_topic))
    # batches with late events, and a reset log's first batch (its offsets restart)
    late = op.filter_map("late", batches, lambda b: b if b.late.any() or b.log_reset else None)
    output_late_events("late_out", late, config.warehouse, "labels")  # type: ignore[arg-type]
    keyed = op.flat_map("route", batches, lambda b: route(config, b))
    examples = op.stateful(
        "join", keyed, lambda state: LabelShardLogic(join_config.build(state), parts)
    )
    op.output("training_out", examples,
              TrainingSink(config.warehouse, version=config.table_version,
                           commit_interval_ms=config.commit_interval_ms,
                           parts=config.sink_parts))
    return flow


__all__ = [
    "LABEL_TOPICS",
    "LabelFlowConfig",
    "LabelInput",
    "LabelShardLogic",
    "TrainingSink",
    "build_label_flow",
    "route",
]
